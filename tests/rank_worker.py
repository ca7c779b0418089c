"""One rank of the 1-vs-N-rank equivalence runs (tests/test_rank_equivalence.py starts N of these).

Every rank builds the same global batch (seeded), keeps its contiguous 1/N of the sequences (verl's
data-parallel dispatch), and runs verl's real FSDP2 engine over gloo: forward/backward with the EOPD actor loss,
the full gradients (all-gathered), verl's optimizer step (global grad-norm clipping), the updated parameters.
The teacher case runs the EOPD teacher worker on the rank's sequences. Rank 0 collects everything into one file.

    python tests/rank_worker.py OUT.pt WORLD RANK PORT STUDENT TEACHER     (OMP_NUM_THREADS=1)
    conftest.start_ranks(rank_worker.rank_main, (OUT.pt, WORLD, RENDEZVOUS, STUDENT, TEACHER), WORLD)
"""

from __future__ import annotations

import os
import sys
from functools import partial

import torch

V, K, B, P, R, H = 320, 8, 8, 6, 7, 32  # STUDENT_VOCAB of conftest; H: the tiny student's hidden size; 8 sequences: 4 per rank on 2 ranks

# case -> (loss config, batch fields, engine knobs); micro-batches of 2: 4 per mini-batch on 1 rank, 2 per rank on 2
CASES = {
    "eopd": dict(loss=dict(entropy_threshold="median"), micro=2),
    "opd": dict(loss=dict(fkl_coef=0.0), micro=2),
    "quantile": dict(loss=dict(gate="quantile", gate_quantile=0.3), micro=2),
    "eopd_grpo": dict(loss=dict(entropy_threshold="median", use_task_rewards=True, distillation_loss_coef=0.2,
                                clip_ratio_c=3.0), micro=2, task=True),
    "eopd_dynamic_bsz": dict(loss=dict(entropy_threshold="median"), dynamic=True),
    # the soft gate is per token (no batch statistic): equal across layouts even with token-budget micro-batches
    "soft_dynamic_bsz": dict(loss=dict(gate="soft", entropy_threshold="median", gate_temperature=0.3), dynamic=True),
    "quantile_dynamic_bsz": dict(loss=dict(gate="quantile", gate_quantile=0.3), dynamic=True),
    "eopd_micro4": dict(loss=dict(entropy_threshold="median"), micro=4),
}


def make_batch(seed: int = 0) -> dict:
    """A padded global batch in verl's update layout, with exact teacher fields and PPO inputs off-policy
    enough (old log-probs shifted) for the clip to act."""
    g = torch.Generator().manual_seed(seed)
    prompt_lens = torch.randint(2, P + 1, (B,), generator=g).tolist()
    resp_lens = torch.randint(1, R + 1, (B,), generator=g).tolist()
    S = P + R
    input_ids = torch.zeros(B, S, dtype=torch.long)
    attention_mask = torch.zeros(B, S, dtype=torch.long)
    for b in range(B):
        p0 = P - prompt_lens[b]
        input_ids[b, p0:P + resp_lens[b]] = torch.randint(3, V, (prompt_lens[b] + resp_lens[b],), generator=g)
        attention_mask[b, p0:P + resp_lens[b]] = 1
    t_logp = torch.log_softmax(torch.randn(B, S, V, generator=g) * (0.3 + 3 * torch.rand(B, S, 1, generator=g)), -1)
    t_vals, t_ids = t_logp.topk(K, -1)
    t_token = torch.zeros(B, S)
    t_token[:, :-1] = t_logp[:, :-1].gather(-1, input_ids[:, 1:, None]).squeeze(-1)
    return {
        "input_ids": input_ids, "attention_mask": attention_mask,
        "position_ids": (attention_mask.cumsum(-1) - 1).clamp_min(0),
        "prompts": input_ids[:, :P].clone(), "responses": input_ids[:, P:].clone(),
        "response_mask": attention_mask[:, P:].clone(),
        "old_log_probs": -2.0 - torch.rand(B, R, generator=g) * 4,  # ratios on both sides of the clip
        "advantages": (torch.randn(B, 1, generator=g) * 1.5).expand(B, R).clone(),
        "teacher_logprobs": t_vals, "teacher_ids": t_ids,
        "teacher_entropy": -(t_logp.exp() * t_logp).sum(-1), "teacher_token_logprob": t_token,
    }


def shard(batch: dict, world: int, rank: int) -> tuple[dict, slice]:
    n = B // world
    rows = slice(rank * n, (rank + 1) * n)
    return {k: v[rows] for k, v in batch.items()}, rows


def to_td(local: dict, *, task: bool, micro: int, dynamic: bool):
    from tensordict import TensorDict
    from verl.utils import tensordict_utils as tu
    from verl.workers.utils.padding import left_right_2_no_padding

    n = local["input_ids"].shape[0]
    plain = {k: local[k].clone() for k in ("input_ids", "attention_mask", "position_ids", "prompts", "responses",
                                           "response_mask", "old_log_probs", "advantages", "teacher_logprobs",
                                           "teacher_ids")}
    td = left_right_2_no_padding(TensorDict(plain, batch_size=[n]))
    mask = local["attention_mask"].bool()
    for key in ("teacher_entropy", "teacher_token_logprob"):
        td[key] = torch.nested.nested_tensor_from_jagged(local[key][mask], offsets=td["input_ids"].offsets())
    tu.assign_non_tensor(td, temperature=1.0, use_remove_padding=True, use_dynamic_bsz=dynamic,
                         micro_batch_size_per_gpu=micro, max_token_len_per_gpu=24, use_fused_kernels=False,
                         calculate_entropy=False, distillation_use_topk=True, distillation_only=not task,
                         global_batch_size=B)
    return td


def make_engine(model_path: str, micro: int, dynamic: bool):
    from test_verl_engine import make_engine as engine

    # clip_grad 0.5 < the gradient norm: the clip uses the global norm over ranks
    return engine(model_path, lr=1e-2, micro=micro, dynamic=dynamic, max_token_len=24, clip_grad=0.5,
                  weight_decay=0.01)


def loss_fn(cfg: dict):
    from verl.workers.config import DistillationConfig, FSDPActorConfig

    from verl_eopd.integration.config import EOPDLossConfig
    from verl_eopd.integration.loss import eopd_ppo_loss

    actor = FSDPActorConfig(strategy="fsdp2", rollout_n=1, ppo_mini_batch_size=B, ppo_micro_batch_size_per_gpu=2,
                            use_torch_compile=False, loss_agg_mode="token-mean", clip_ratio_c=3.0)
    return partial(eopd_ppo_loss, config=actor, distillation_config=DistillationConfig(
        distillation_loss=EOPDLossConfig(topk=K, **cfg)))


def full(t):
    return (t.full_tensor() if hasattr(t, "full_tensor") else t).detach().clone()


def run_case(name: str, spec: dict, batch: dict, world: int, rank: int, student: str) -> dict:
    local, _ = shard(batch, world, rank)
    cfg = dict(spec["loss"])
    if cfg.get("entropy_threshold") == "median":  # a threshold the batch straddles (the same on every rank)
        cfg["entropy_threshold"] = float(batch["teacher_entropy"][:, P - 1:P - 1 + R][batch["response_mask"].bool()]
                                         .median())
    micro, dynamic = spec.get("micro", 2), spec.get("dynamic", False)
    engine = make_engine(student, micro, dynamic)
    engine.optimizer_zero_grad()
    with engine.train_mode():
        out = engine.forward_backward_batch(to_td(local, task=spec.get("task", False), micro=micro, dynamic=dynamic),
                                            loss_fn(cfg), forward_only=False)
        grads = {n.replace("_fsdp_wrapped_module.", ""): full(p.grad) for n, p in engine.module.named_parameters()}
        grad_norm = float(engine.optimizer_step())
        params = {n.replace("_fsdp_wrapped_module.", ""): full(p) for n, p in engine.module.named_parameters()}
    losses = out["loss"] if isinstance(out["loss"], list) else [out["loss"]]
    local_loss = torch.tensor(float(sum(float(x) for x in losses)))
    micro_batches = torch.tensor(float(len(losses)))
    import torch.distributed as dist

    dist.all_reduce(local_loss)  # each rank's sum over its micro-batches is dp_size x (its tokens' share)
    dist.all_reduce(micro_batches)
    return {"loss": float(local_loss) / world, "grad_norm": grad_norm, "grads": grads, "params": params,
            "micro_batches": int(micro_batches)}


def run_teacher(batch: dict, world: int, rank: int, student: str, teacher: str) -> dict:
    from verl.trainer.config import CheckpointConfig
    from verl.workers.config import FSDPEngineConfig, HFModelConfig, TrainingWorkerConfig

    from verl_eopd.integration.teacher import TeacherSettings, teacher_worker_class

    local, rows = shard(batch, world, rank)
    cfg = TrainingWorkerConfig(
        model_type="language_model",
        model_config=HFModelConfig(path=student, enable_gradient_checkpointing=False, use_remove_padding=True,
                                   override_config={"attn_implementation": "sdpa"}),
        engine_config=FSDPEngineConfig(strategy="fsdp2", use_torch_compile=False, use_dynamic_bsz=False,
                                       forward_only=True, infer_micro_batch_size_per_gpu=2, use_remove_padding=True,
                                       mixed_precision={"param_dtype": "fp32", "reduce_dtype": "fp32",
                                                        "buffer_dtype": "fp32"}),
        optimizer_config=None, checkpoint_config=CheckpointConfig())
    worker = teacher_worker_class()(cfg, teacher=TeacherSettings(model_path=teacher, topk=K, student_eos_token_id=0,
                                                                 teacher_eos_token_id=2))
    worker.reset()
    from tensordict import TensorDict
    from verl.utils import tensordict_utils as tu
    from verl.workers.utils.padding import left_right_2_no_padding

    n = local["input_ids"].shape[0]
    ids = local["input_ids"].clone()
    ids[:, P + 1] = torch.where(local["response_mask"][:, 1].bool(), 0, ids[:, P + 1])  # a student end token
    td = left_right_2_no_padding(TensorDict(
        {"input_ids": ids, "attention_mask": local["attention_mask"].clone(),
         "position_ids": local["position_ids"].clone(), "prompts": ids[:, :P].clone(), "responses": ids[:, P:].clone(),
         "response_mask": local["response_mask"].clone()}, batch_size=[n]))
    tu.assign_non_tensor(td, temperature=0.7, compute_loss=False, calculate_entropy=False, use_remove_padding=True,
                         global_token_num=local["attention_mask"].sum(-1).tolist())
    out = worker.infer_batch(td)
    return {key: [t.clone() for t in out[key].unbind()] for key in
            ("teacher_ids", "teacher_logprobs", "teacher_entropy", "teacher_token_logprob")}


def main(out_path: str, world: int, rank: int, rendezvous: str, student: str, teacher: str) -> None:
    # verl's Worker reads MASTER_ADDR/PORT; the group itself meets through the file rendezvous (no port bound)
    os.environ.update({"RANK": str(rank), "WORLD_SIZE": str(world), "LOCAL_RANK": str(rank),
                       "LOCAL_WORLD_SIZE": str(world), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "0"})
    from verl_eopd.cpu import platform as cpu

    cpu.install()
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{rendezvous}", rank=rank, world_size=world)
    torch.manual_seed(0)
    batch = make_batch()
    results = {name: run_case(name, spec, batch, world, rank, student) for name, spec in CASES.items()}
    teacher_out = run_teacher(batch, world, rank, student, teacher)
    gathered = [None] * world
    dist.all_gather_object(gathered, teacher_out)
    results["teacher"] = {key: [t for part in gathered for t in part[key]] for key in teacher_out}
    if rank == 0:
        torch.save(results, out_path)
    dist.destroy_process_group()


def rank_main(rank: int, out_path: str, world: int, rendezvous: str, student: str, teacher: str) -> None:
    """One rank started by tests/conftest.start_ranks (forked): one intra-op thread, as OMP_NUM_THREADS=1 gives a
    process started from the command line."""
    torch.set_num_threads(1)
    main(out_path, world, rank, rendezvous, student, teacher)


if __name__ == "__main__":
    a = sys.argv[1:]
    main(a[0], int(a[1]), int(a[2]), a[3], a[4], a[5])
