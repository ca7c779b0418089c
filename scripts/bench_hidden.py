#!/usr/bin/env python
"""EOPD from hidden states vs the logits path vs verl's native top-k forward KL: forward + backward time and
extra peak memory, the lm-head matmuls included, side by side in one run.

Student side (h [1, T, H] and the lm head W [V, H] require grad; loss then backward):
  hidden       verl_eopd.eopd_loss_from_hidden(h, W, ...)          (no [T, V] tensor; one extra lm-head matmul)
  logits       logits = h @ W.T, then verl_eopd.eopd_loss(logits, ...)
  verl_native  logits = h @ W.T, then verl's compute_forward_kl_topk (forward KL only: no RKL, no sampled-token
               log-prob, no entropy, so a conservative baseline)
Teacher side (no grad):
  teacher_hidden   verl_eopd.teacher_stats_from_hidden(h, W, ids, K)
  teacher_logits   teacher_stats(h @ W.T, ids, K)
Each case runs in a fresh subprocess. Extra peak: peak RSS (CPU; VmHWM) or max_memory_allocated (CUDA) minus
the memory after the inputs were built. It includes the lm head's gradient [V, H], which every student path
allocates (the parameter's gradient); the "net" column leaves it out.
Targets (issue 14): hidden's net extra peak <= 0.25 x logits' at T >= 2048; hidden's time <= 1.35 x logits'.

    python scripts/bench_hidden.py                           # CPU grid: H 1024 (T 1k 2k 4k), H 4096 (T 1k), fp32
    python scripts/bench_hidden.py --H 1024 --T 1024 2048 --dtype fp32 bf16 --device cuda
    python scripts/bench_hidden.py --quick                   # V 32768, H 256, T 256 512 (smoke)
    python scripts/bench_hidden.py --paired 8 --grid 1024:1024,2048   # time ratio only, interleaved (below)

--paired N: the time ratio alone, with the machine's drift taken out: one process per cell builds the inputs
once and times the hidden and logits passes alternately (hidden first in even rounds, logits first in odd
ones) for N rounds after a warm-up pass of each; each round's ratio hidden / logits is one observation. Printed:
the mean ratio, its 95% t interval (df = N - 1), and the one-sided p-value of H0 "mean ratio >= 1.35".
Separate processes per case (the default) are kept for memory, where one process would mix the two peaks.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

from bench_loss import GiB, MiB, QWEN3_VOCAB, _PeakRSS, _system_busy_s, machine_info, wait_idle

STUDENT = ("hidden", "logits", "verl_native")
TEACHER = ("teacher_hidden", "teacher_logits")
TARGET_MEM, TARGET_MEM_MIN_T, TARGET_TIME = 0.25, 2048, 1.35


def build(T: int, H: int, V: int, K: int, dtype: str, device: str, teacher: bool):
    import torch

    tdt = {"fp32": torch.float32, "bf16": torch.bfloat16}[dtype]
    g = torch.Generator().manual_seed(0)
    h = (torch.randn(1, T, H, generator=g)).to(device=device, dtype=tdt)
    w = (torch.randn(V, H, generator=g) * (2.0 / H ** 0.5)).to(device=device, dtype=tdt)
    sampled = torch.randint(0, V, (1, T), generator=g).to(device)
    x = dict(h=h, w=w, sampled=sampled)
    if teacher:
        return x
    h.requires_grad_(True)
    w.requires_grad_(True)  # no .grad yet: as FSDP's unsharded lm head at each backward (freed after reduce-scatter)
    x.update(
        old=(-torch.rand(1, T, generator=g) * 4).to(device),
        topk_ids=torch.randint(0, V, (1, T, K), generator=g).to(device),
        topk_lp=(torch.log_softmax(torch.randn(1, T, K, generator=g), -1) - 0.3).to(device),
        teacher_entropy=(torch.rand(1, T, generator=g) * 3.0).to(device),
        teacher_token_lp=(-torch.rand(1, T, generator=g) * 4).to(device),
        mask=torch.ones(1, T, dtype=torch.bool, device=device))
    return x


def step_fn(impl: str, x: dict, K: int, chunk_bytes: int):
    import torch

    from verl_eopd import eopd_loss, eopd_loss_from_hidden, teacher_stats, teacher_stats_from_hidden

    args = lambda: (x["sampled"], x["old"], x["topk_ids"], x["topk_lp"], x["mask"])  # noqa: E731
    kw = lambda: dict(teacher_entropy=x["teacher_entropy"], teacher_token_logprobs=x["teacher_token_lp"],  # noqa: E731
                      chunk_bytes=chunk_bytes)
    if impl == "hidden":
        return lambda: eopd_loss_from_hidden(x["h"], x["w"], *args(), **kw())[0]
    if impl == "logits":
        return lambda: eopd_loss(x["h"] @ x["w"].T, *args(), **kw())[0]
    if impl == "verl_native":
        from verl.trainer.distillation.fsdp.losses import compute_forward_kl_topk
        from verl.workers.config import DistillationConfig, DistillationLossConfig

        cfg = DistillationConfig(distillation_loss=DistillationLossConfig(
            loss_mode="forward_kl_topk", topk=K, use_policy_gradient=False, use_task_rewards=False,
            loss_max_clamp=None, log_prob_min_clamp=None))
        T = x["h"].shape[1]
        off = torch.tensor([0, T], device=x["h"].device)
        lp = torch.nested.nested_tensor_from_jagged(x["topk_lp"][0].contiguous(), offsets=off)
        ids = torch.nested.nested_tensor_from_jagged(x["topk_ids"][0].contiguous(), offsets=off)
        return lambda: compute_forward_kl_topk(x["h"] @ x["w"].T, lp, ids, cfg, data_format="thd")[
            "distillation_losses"].sum() / T
    if impl == "teacher_hidden":
        return lambda: teacher_stats_from_hidden(x["h"][0], x["w"], x["sampled"][0], K, chunk_bytes=chunk_bytes)
    if impl == "teacher_logits":
        return lambda: teacher_stats(x["h"][0] @ x["w"].T, x["sampled"][0], K, chunk_bytes=chunk_bytes)
    raise ValueError(impl)


def worker(impl, T, H, V, K, dtype, device, reps, chunk_bytes) -> dict:
    import gc

    import torch

    torch.set_num_threads(len(os.sched_getaffinity(0)))
    cuda = device == "cuda"
    teacher = impl in TEACHER
    x = build(T, H, V, K, dtype, device, teacher)
    step = step_fn(impl, x, K, chunk_bytes)
    gc.collect()
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base, meter = torch.cuda.memory_allocated(), None
    else:
        meter = _PeakRSS()
        base = meter.rss()
        meter.start()
    times = []
    busy0, own0, wall0 = _system_busy_s(), time.process_time(), time.perf_counter()
    for i in range(1 + reps):
        if cuda:
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        if teacher:
            with torch.no_grad():
                out = step()
            del out
        else:  # gradients set to None each pass, as zero_grad(set_to_none=True) and FSDP's freed unsharded grads
            x["h"].grad = x["w"].grad = None
            loss = step()
            loss.backward()
            del loss
        if cuda:
            torch.cuda.synchronize()
        if i > 0:
            times.append(time.perf_counter() - t0)
    busy1, own1, wall1 = _system_busy_s(), time.process_time(), time.perf_counter()
    others = None if busy0 is None else max(0.0, ((busy1 - busy0) - (own1 - own0)) / (wall1 - wall0))
    peak = torch.cuda.max_memory_allocated() if cuda else meter.peak()
    if meter:
        meter.stop()
    grad_w = 0 if teacher else V * H * x["w"].element_size()
    return {"impl": impl, "T": T, "H": H, "V": V, "K": K, "dtype": dtype, "device": device,
            "time_ms": 1e3 * statistics.median(times), "extra_peak_mib": (peak - base) / MiB,
            "net_extra_peak_mib": (peak - base - grad_w) / MiB,
            "others_cores": others, "chunk_bytes": chunk_bytes}


def paired_worker(T, H, V, K, dtype, device, rounds, chunk_bytes) -> dict:
    """--paired: hidden and logits passes alternated in one process; per-round time ratios hidden / logits."""
    import torch

    from verl_eopd.math.stats import t_quantile, t_two_sided_p

    torch.set_num_threads(len(os.sched_getaffinity(0)))
    x = build(T, H, V, K, dtype, device, teacher=False)
    steps = {impl: step_fn(impl, x, K, chunk_bytes) for impl in ("hidden", "logits")}

    def timed(impl: str) -> float:
        x["h"].grad = x["w"].grad = None
        if device == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        steps[impl]().backward()
        if device == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - t0

    timed("hidden"), timed("logits")  # warm-up
    rounds_ms = []
    for i in range(rounds):
        order = ("hidden", "logits") if i % 2 == 0 else ("logits", "hidden")
        t = {impl: timed(impl) for impl in order}
        rounds_ms.append((1e3 * t["hidden"], 1e3 * t["logits"]))
    ratios = [a / b for a, b in rounds_ms]
    n, mean = len(ratios), statistics.mean(ratios)
    sd = statistics.stdev(ratios) if n > 1 else float("nan")
    half = t_quantile(0.975, n - 1) * sd / n ** 0.5 if n > 1 else float("nan")
    t_stat = (mean - TARGET_TIME) / (sd / n ** 0.5) if n > 1 and sd > 0 else float("nan")
    # one-sided p of H0 mean >= TARGET_TIME (small when the mean is clearly below)
    p_below = t_two_sided_p(t_stat, n - 1) / 2 if t_stat < 0 else 1 - t_two_sided_p(t_stat, n - 1) / 2
    return {"T": T, "H": H, "V": V, "K": K, "dtype": dtype, "device": device, "rounds_ms": rounds_ms,
            "ratios": ratios, "mean_ratio": mean, "ci95": [mean - half, mean + half], "df": n - 1,
            "t_vs_target": t_stat, "p_mean_ge_target": p_below, "chunk_bytes": chunk_bytes}


def engine_worker(path: str, model_dir: str, seqs: int, length: int, reps: int, chunk_bytes: int) -> dict:
    """One actor update (forward + backward over the mini-batch + AdamW step) of verl's FSDP2 engine on a
    Qwen3-shaped model, with the EOPD loss from the logits (verl's engine + the EOPD processor) or from hidden
    states (integration/hidden.py). One process, gloo."""
    import gc
    import tempfile
    from functools import partial

    import torch

    torch.set_num_threads(len(os.sched_getaffinity(0)))
    os.environ.update({"RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1"})
    from verl_eopd.cpu import platform as cpu

    cpu.install()
    import torch.distributed as dist

    fd, store = tempfile.mkstemp()
    os.close(fd)
    os.unlink(store)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=0, world_size=1)
    from tensordict import TensorDict
    from verl.trainer.config import CheckpointConfig
    from verl.utils import tensordict_utils as tu
    from verl.workers.config import (DistillationConfig, FSDPActorConfig, FSDPEngineConfig, FSDPOptimizerConfig,
                                     HFModelConfig)
    from verl.workers.engine import EngineRegistry
    from verl.workers.utils.padding import left_right_2_no_padding

    from verl_eopd.integration.config import EOPDLossConfig
    from verl_eopd.integration.hidden import ACTOR_MODEL_TYPE, actor_engine_class
    from verl_eopd.integration.loss import eopd_ppo_loss

    actor_engine_class()
    K, P = 16, 16
    engine = EngineRegistry.new(
        model_type=ACTOR_MODEL_TYPE if path == "engine_hidden" else "language_model", backend="fsdp2",
        model_config=HFModelConfig(path=model_dir, enable_gradient_checkpointing=False,
                                   override_config={"attn_implementation": "sdpa"}),
        engine_config=FSDPEngineConfig(strategy="fsdp2", use_torch_compile=False, use_dynamic_bsz=False,
                                       micro_batch_size_per_gpu=seqs,
                                       mixed_precision={"param_dtype": "fp32", "reduce_dtype": "fp32",
                                                        "buffer_dtype": "fp32"}),
        optimizer_config=FSDPOptimizerConfig(lr=1e-6, clip_grad=1.0, total_training_steps=10, weight_decay=0.0),
        checkpoint_config=CheckpointConfig())
    engine.initialize()
    V = engine.model_config.hf_config.vocab_size
    g = torch.Generator().manual_seed(0)
    S = P + length
    ids = torch.randint(0, V, (seqs, S), generator=g)
    mask = torch.ones(seqs, S, dtype=torch.long)
    fields = {"input_ids": ids, "attention_mask": mask, "position_ids": (mask.cumsum(-1) - 1),
              "prompts": ids[:, :P], "responses": ids[:, P:], "response_mask": mask[:, P:],
              "old_log_probs": -torch.rand(seqs, length, generator=g) * 4, "advantages": torch.zeros(seqs, length),
              "teacher_ids": torch.randint(0, V, (seqs, S, K), generator=g),
              "teacher_logprobs": torch.log_softmax(torch.randn(seqs, S, K, generator=g), -1) - 0.3}
    td = left_right_2_no_padding(TensorDict(fields, batch_size=[seqs]))
    off = td["input_ids"].offsets()
    td["teacher_entropy"] = torch.nested.nested_tensor_from_jagged(torch.rand(seqs * S, generator=g) * 3, offsets=off)
    td["teacher_token_logprob"] = torch.nested.nested_tensor_from_jagged(-torch.rand(seqs * S, generator=g) * 4,
                                                                         offsets=off)
    tu.assign_non_tensor(td, temperature=1.0, use_remove_padding=True, use_dynamic_bsz=False,
                         micro_batch_size_per_gpu=seqs, max_token_len_per_gpu=S * seqs, use_fused_kernels=False,
                         calculate_entropy=False, distillation_use_topk=True, distillation_only=True,
                         global_batch_size=seqs)
    actor = FSDPActorConfig(strategy="fsdp2", rollout_n=1, ppo_mini_batch_size=seqs, ppo_micro_batch_size_per_gpu=seqs,
                            use_torch_compile=False, loss_agg_mode="token-mean")
    loss_fn = partial(eopd_ppo_loss, config=actor, distillation_config=DistillationConfig(
        distillation_loss=EOPDLossConfig(topk=K, logits_chunk_mb=chunk_bytes // MiB, from_hidden=path == "engine_hidden")))
    times, losses, meter = [], [], None
    for i in range(1 + reps):
        if i == 1:  # the baseline after the warm-up update: AdamW's states and the gradients exist from here on
            gc.collect()
            meter = _PeakRSS()
            base = meter.rss()
            meter.start()
        t0 = time.perf_counter()
        with engine.train_mode():
            out = engine.train_batch(td, loss_function=loss_fn)
        if i > 0:
            times.append(time.perf_counter() - t0)
        losses.append(float(sum(out["loss"]) if isinstance(out["loss"], list) else out["loss"]))
    peak = meter.peak()
    meter.stop()
    return {"impl": path, "T": seqs * length, "H": engine.model_config.hf_config.hidden_size, "V": V, "K": K,
            "dtype": "fp32", "device": "cpu", "time_ms": 1e3 * statistics.median(times),
            "extra_peak_mib": (peak - base) / MiB, "others_cores": None, "losses": losses}


def build_qwen3_shaped(out_dir: str, V: int, H: int, layers: int) -> str:
    """A random Qwen3ForCausalLM with Qwen3's vocabulary and hidden size H (the lm head untied), and a tokenizer."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from verl_eopd.cpu.embedded import build_tokenizer

    tok = build_tokenizer(out_dir, eos_token="<|im_end|>", vocab_size=320)
    tok.save_pretrained(out_dir)
    cfg = AutoConfig.for_model("qwen3", vocab_size=V, hidden_size=H, intermediate_size=3 * H, num_hidden_layers=layers,
                               num_attention_heads=16, num_key_value_heads=8, head_dim=H // 16,
                               max_position_embeddings=8192, tie_word_embeddings=False, torch_dtype="float32",
                               eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(cfg).save_pretrained(out_dir)
    return out_dir


def run_case(args, device, impl, T, H, dtype) -> dict:
    wait_idle(args.wait_idle)
    cmd = [sys.executable, os.path.abspath(__file__), "--worker", impl, str(T), str(H), dtype, "--device", device,
           "--V", str(args.V), "--K", str(args.K), "--reps", str(args.reps), "--chunk-bytes", str(args.chunk_bytes)]
    key = dict(impl=impl, T=T, H=H, dtype=dtype, device=device)
    try:
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=args.timeout)
    except subprocess.TimeoutExpired:
        return {**key, "skipped": f"timeout > {args.timeout:.0f} s"}
    if p.returncode != 0:
        tail = (p.stderr or p.stdout).strip().splitlines()[-1:] or ["?"]
        return {**key, "skipped": f"failed: {tail[0][:80]}"}
    return json.loads(p.stdout.strip().splitlines()[-1])


def table(results: list[dict]) -> str:
    rows = ["| device | dtype | H | T | impl | time (ms) | extra peak (MiB) | net of dW (MiB) | time / logits | "
            "net extra peak / logits | targets |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    index = {(r["device"], r["dtype"], r["H"], r["T"], r["impl"]): r for r in results}
    for r in results:
        base_impl = "teacher_logits" if r["impl"] in TEACHER else "logits"
        base = index.get((r["device"], r["dtype"], r["H"], r["T"], base_impl))
        if "skipped" in r:
            rows.append(f"| {r['device']} | {r['dtype']} | {r['H']} | {r['T']} | {r['impl']} | {r['skipped']} | | | | | |")
            continue
        tr = mr = verdict = ""
        if base and "skipped" not in base and r["impl"] != base_impl:
            t_ratio = r["time_ms"] / base["time_ms"]
            m_ratio = r["net_extra_peak_mib"] / max(base["net_extra_peak_mib"], 1e-9)
            tr, mr = f"{t_ratio:.2f}", f"{m_ratio:.2f}"
            if r["impl"] in ("hidden", "teacher_hidden"):
                ok_t = t_ratio <= TARGET_TIME
                ok_m = m_ratio <= TARGET_MEM or r["T"] < TARGET_MEM_MIN_T
                verdict = f"time {'PASS' if ok_t else 'FAIL'}, memory " + (
                    ("PASS" if ok_m else "FAIL") if r["T"] >= TARGET_MEM_MIN_T else "(T < 2048: no target)")
        rows.append(f"| {r['device']} | {r['dtype']} | {r['H']} | {r['T']} | {r['impl']} | {r['time_ms']:.0f} | "
                    f"{r['extra_peak_mib']:.0f} | {r['net_extra_peak_mib']:.0f} | {tr} | {mr} | {verdict} |")
    return "\n".join(rows)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--worker", nargs=4, metavar=("IMPL", "T", "H", "DTYPE"), help=argparse.SUPPRESS)
    ap.add_argument("--grid", nargs="+", default=["1024:1024,2048,4096", "4096:1024"],
                    help="H:T,T,... pairs (default: H 1024 at T 1k 2k 4k; H 4096 at T 1k)")
    ap.add_argument("--H", type=int, nargs="+", help="with --T: a full H x T grid instead of --grid")
    ap.add_argument("--T", type=int, nargs="+")
    ap.add_argument("--dtype", nargs="+", default=["fp32"], choices=["fp32", "bf16"])
    ap.add_argument("--impl", nargs="+", default=[*STUDENT, *TEACHER], choices=[*STUDENT, *TEACHER])
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--V", type=int, default=QWEN3_VOCAB)
    ap.add_argument("--K", type=int, default=16)
    ap.add_argument("--reps", type=int, default=2)
    ap.add_argument("--chunk-bytes", type=int, default=64 * MiB, help="fp32 bytes of logits per chunk (both paths)")
    ap.add_argument("--wait-idle", type=float, default=0.0)
    ap.add_argument("--timeout", type=float, default=1200.0)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--json")
    ap.add_argument("--engine", action="store_true",
                    help="instead: the whole actor update through verl's FSDP2 engine on a Qwen3-shaped model "
                         "(H 1024, V 151,936, 2 layers), logits vs hidden states, --engine-seqs x --engine-len tokens")
    ap.add_argument("--engine-seqs", type=int, default=4)
    ap.add_argument("--engine-len", type=int, default=512)
    ap.add_argument("--engine-worker", nargs=2, metavar=("PATH", "MODEL_DIR"), help=argparse.SUPPRESS)
    ap.add_argument("--paired", type=int, default=0, metavar="N",
                    help="instead: hidden / logits time ratio from N interleaved rounds in one process per cell")
    ap.add_argument("--paired-worker", nargs=3, metavar=("T", "H", "DTYPE"), help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.paired_worker:
        T, H, dtype = args.paired_worker
        print(json.dumps(paired_worker(int(T), int(H), args.V, args.K, dtype, args.device, args.paired,
                                       args.chunk_bytes)))
        return 0
    if args.engine_worker:
        print(json.dumps(engine_worker(args.engine_worker[0], args.engine_worker[1], args.engine_seqs, args.engine_len,
                                       args.reps, args.chunk_bytes)))
        return 0
    if args.engine:
        import tempfile

        model_dir = build_qwen3_shaped(tempfile.mkdtemp(prefix="qwen3_shaped_"), args.V, 1024, 2)
        results = []
        for path in ("engine_logits", "engine_hidden"):
            cmd = [sys.executable, os.path.abspath(__file__), "--engine-worker", path, model_dir, "--reps",
                   str(args.reps), "--chunk-bytes", str(args.chunk_bytes), "--engine-seqs", str(args.engine_seqs),
                   "--engine-len", str(args.engine_len)]
            p = subprocess.run(cmd, capture_output=True, text=True, timeout=args.timeout)
            if p.returncode != 0:
                print(p.stderr[-3000:], file=sys.stderr)
                return 1
            results.append(json.loads(p.stdout.strip().splitlines()[-1]))
            r = results[-1]
            print(f"  {path}: {r['time_ms']:.0f} ms per actor update, extra peak {r['extra_peak_mib']:.0f} MiB, "
                  f"losses {[round(x, 5) for x in r['losses']]}", flush=True)
        a, b = results
        print(f"engine, {a['T']} tokens, H {a['H']}, V {a['V']}: hidden / logits time {b['time_ms'] / a['time_ms']:.2f}, "
              f"extra peak {b['extra_peak_mib'] / max(a['extra_peak_mib'], 1e-9):.2f}; first-step loss equal: "
              f"{abs(a['losses'][0] - b['losses'][0]) <= 1e-4 * max(1.0, abs(a['losses'][0]))}")
        if args.json:
            with open(args.json, "w") as f:
                json.dump({"machine": machine_info(["cpu"]), "results": results}, f, indent=1)
        return 0
    if args.worker:
        impl, T, H, dtype = args.worker
        print(json.dumps(worker(impl, int(T), int(H), args.V, args.K, dtype, args.device, args.reps, args.chunk_bytes)))
        return 0
    if args.quick:
        args.V, args.grid, args.reps = 32768, ["256:256,512"], 1
    grid = ([(H, T) for H in args.H for T in args.T] if args.H and args.T else
            [(int(h), int(t)) for spec in args.grid for h, ts in [spec.split(":")] for t in ts.split(",")])
    info = machine_info([args.device])
    if args.paired:
        results = []
        for dtype in args.dtype:
            for H, T in grid:
                wait_idle(args.wait_idle)
                cmd = [sys.executable, os.path.abspath(__file__), "--paired-worker", str(T), str(H), dtype,
                       "--paired", str(args.paired), "--device", args.device, "--V", str(args.V), "--K", str(args.K),
                       "--chunk-bytes", str(args.chunk_bytes)]
                p = subprocess.run(cmd, capture_output=True, text=True, timeout=args.timeout)
                if p.returncode != 0:
                    print(p.stderr[-3000:], file=sys.stderr)
                    return 1
                r = json.loads(p.stdout.strip().splitlines()[-1])
                results.append(r)
                lo, hi = r["ci95"]
                print(f"  {dtype} H={H} T={T}: hidden / logits time {r['mean_ratio']:.3f} (95% CI {lo:.3f}-{hi:.3f}, "
                      f"t({r['df']}) = {r['t_vs_target']:.2f} vs {TARGET_TIME}, one-sided p = "
                      f"{r['p_mean_ge_target']:.2g}); rounds " + ", ".join(f"{a:.0f}/{b:.0f}" for a, b in r["rounds_ms"]),
                      flush=True)
                if args.json:
                    with open(args.json, "w") as f:
                        json.dump({"machine": info, "paired": results}, f, indent=1)
        return 0
    print(f"{info['cpu']}, {info['cores']} cores, torch {info['torch']}, git {info.get('git', '?')}; "
          f"V = {args.V}, K = {args.K}, chunk {args.chunk_bytes / MiB:g} MiB, {args.reps} reps (median)", flush=True)
    results = []
    for dtype in args.dtype:
        for H, T in grid:
            for impl in args.impl:
                r = run_case(args, args.device, impl, T, H, dtype)
                results.append(r)
                print(f"  {dtype} H={H} T={T} {impl}: " + (r.get("skipped") or
                      f"{r['time_ms']:.0f} ms, extra peak {r['extra_peak_mib']:.0f} MiB (net of dW "
                      f"{r['net_extra_peak_mib']:.0f}), others "
                      f"{r['others_cores'] or 0:.2f} cores"), flush=True)
                if args.json:  # after every case: an interrupted run keeps what it measured
                    with open(args.json, "w") as f:
                        json.dump({"machine": info, "results": results}, f, indent=1)
    print(table(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
