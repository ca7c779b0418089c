"""Cost of the EOPD teacher pass versus verl's plain reference log-prob pass, same model, same batch.

Both go through verl's FSDP engine (`infer_batch`, forward only) with one model: the EOPD teacher engine
with `eopd_topk` set (top-k ids and log-probs, exact entropy, sampled-token log-prob, chunked over
tokens) and the same engine without it (verl's own `log_probs` path, what the reference worker runs).
The model is a small Qwen3 body with the real Qwen3 vocabulary (151,936) so that the logits side, the
part EOPD changes, has its real size. Prints a table of times and the ratio (target <= 1.10x).

    python scripts/bench_teacher.py                     # CPU, defaults below
    python scripts/bench_teacher.py --tokens 4096 --reps 7
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time

import torch


def build_model(out: str, vocab: int, hidden: int, layers: int):
    from verl_eopd.cpu.embedded import build_tiny_qwen3, build_tokenizer

    tok = build_tokenizer(os.path.join(out, "tok"))
    build_tiny_qwen3(out, tok, vocab_size=vocab, hidden=hidden, layers=layers, seed=0)


def make_batch(batch: int, seqlen: int, prompt: int, vocab: int):
    from tensordict import TensorDict
    from verl.utils import tensordict_utils as tu
    from verl.workers.utils.padding import left_right_2_no_padding

    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, vocab, (batch, seqlen), generator=g)
    mask = torch.ones(batch, seqlen, dtype=torch.long)
    td = TensorDict({
        "input_ids": ids, "attention_mask": mask, "position_ids": torch.arange(seqlen).expand(batch, seqlen).clone(),
        "prompts": ids[:, :prompt].clone(), "responses": ids[:, prompt:].clone(),
        "response_mask": mask[:, prompt:].clone(),
    }, batch_size=[batch])
    td = left_right_2_no_padding(td)
    tu.assign_non_tensor(td, temperature=1.0, use_remove_padding=True, use_dynamic_bsz=False,
                         micro_batch_size_per_gpu=batch, max_token_len_per_gpu=batch * seqlen,
                         use_fused_kernels=False, calculate_entropy=False, compute_loss=False)
    return td


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--vocab", type=int, default=151936)
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--tokens", type=int, default=2048, help="tokens per batch (batch x seqlen)")
    ap.add_argument("--seqlen", type=int, default=256)
    ap.add_argument("--topk", type=int, default=16)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--chunk-mb", type=int, default=64, help="distillation_loss.logits_chunk_mb")
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    from verl_eopd import cpu

    on_gpu = cpu.gpu_available()
    if not on_gpu:
        cpu.install()
    import torch.distributed as dist

    for k, v in {"RANK": "0", "WORLD_SIZE": "1", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29541"}.items():
        os.environ.setdefault(k, v)
    if not dist.is_initialized():
        dist.init_process_group("gloo" if not on_gpu else "nccl", rank=0, world_size=1)
    from verl.trainer.config import CheckpointConfig
    from verl.workers.config import FSDPEngineConfig, HFModelConfig
    from verl.workers.engine import EngineRegistry

    from verl_eopd.integration.teacher import TEACHER_MODEL_TYPE, _teacher_engine_class

    _teacher_engine_class()
    with tempfile.TemporaryDirectory() as d:
        build_model(d, args.vocab, args.hidden, args.layers)
        model_cfg = HFModelConfig(path=d, enable_gradient_checkpointing=False,
                                  override_config={"attn_implementation": "sdpa"})
        model_cfg.model_type = TEACHER_MODEL_TYPE
        engine = EngineRegistry.new(
            model_type=TEACHER_MODEL_TYPE, backend="fsdp2", model_config=model_cfg,
            engine_config=FSDPEngineConfig(strategy="fsdp2", use_torch_compile=False, forward_only=True,
                                           use_dynamic_bsz=False, infer_micro_batch_size_per_gpu=1,
                                           mixed_precision={"param_dtype": "bf16" if on_gpu else "fp32",
                                                            "reduce_dtype": "fp32", "buffer_dtype": "fp32"}),
            optimizer_config=None, checkpoint_config=CheckpointConfig())
        engine.initialize()
        batch = args.tokens // args.seqlen
        times = {"plain": [], "eopd": []}
        from verl.utils import tensordict_utils as tu

        def run(kind):
            td = make_batch(batch, args.seqlen, args.seqlen // 4, args.vocab)
            if kind == "eopd":
                tu.assign_non_tensor(td, eopd_topk=args.topk, eopd_logits_chunk_mb=args.chunk_mb)
            with engine.eval_mode():
                if on_gpu:
                    torch.cuda.synchronize()
                t = time.perf_counter()
                out = engine.infer_batch(td)
                if on_gpu:
                    torch.cuda.synchronize()
                return time.perf_counter() - t, out

        for kind in ("plain", "eopd"):  # warm-up
            run(kind)
        for _ in range(args.reps):  # interleaved so drift hits both
            for kind in ("plain", "eopd"):
                times[kind].append(run(kind)[0])
        _, out = run("eopd")
        mo = out["model_output"]
        payload = sum(mo[k].values().element_size() * mo[k].values()[0].numel() for k in mo) if mo else 0
        plain, eopd = statistics.median(times["plain"]), statistics.median(times["eopd"])
        print(f"device={'cuda' if on_gpu else 'cpu'} threads={args.threads} torch={torch.__version__} "
              f"vocab={args.vocab} hidden={args.hidden} layers={args.layers} tokens={batch * args.seqlen} "
              f"topk={args.topk} chunk_mb={args.chunk_mb} reps={args.reps}")
        print("| pass | median ms | ratio to plain |")
        print("|---|---|---|")
        print(f"| verl reference log-probs (plain) | {plain * 1000:.1f} | 1.00 |")
        print(f"| EOPD teacher (top-k + entropy + token log-prob) | {eopd * 1000:.1f} | {eopd / plain:.3f} |")
        print(f"payload per token: {payload} bytes ({sorted(mo.keys())}); target 8K + 8 = {8 * args.topk + 8}")
        print(f"ratio {eopd / plain:.3f} {'PASS' if eopd / plain <= 1.10 else 'FAIL'} (target <= 1.10)")


if __name__ == "__main__":
    main()
