"""The registered `eopd` loss through verl's real FSDP engine on CPU (tiny random Qwen3, one process, gloo).

The batch is laid out exactly as verl's trainer lays it out for `update_actor`: left-padded prompts,
right-padded responses, teacher top-k `[B, P+R, K]` (row j predicts token j+1, dummy last row), then
verl's own `left_right_2_no_padding` makes the nested micro-batch tensors. The reference is a plain
Hugging Face forward of each sequence with the loss written in float64 from the paper's formula.
"""

from __future__ import annotations

import math
from functools import partial

import pytest
import torch

from conftest import STUDENT_VOCAB
from dense_reference import dense_eopd_loss
from tolerances import (
    U32,
    assert_grads_close,
    assert_within,
    fp32_logit_bound,
    fp32_loss_bound,
    gamma,
    log_softmax_bound,
    model_logit_scale,
)
from verl_eopd import EOPDSettings

pytestmark = pytest.mark.integration

V, K, B, P, R = STUDENT_VOCAB, 8, 4, 6, 7
HIDDEN = 32  # the tiny student's hidden size (tests/tiny.py)


@pytest.fixture(scope="module")
def env(verl_cpu, tiny_models):
    return {"model_path": tiny_models["student"]}


def make_engine(model_path: str, lr: float = 1e-3, *, model_type: str = "language_model",
                use_remove_padding: bool = True, micro: int = 2, dynamic: bool = False, max_token_len: int = 4096,
                clip_grad: float = 1e9, weight_decay: float = 0.0):
    """verl's FSDP2 engine on CPU in fp32 (tests/rank_worker.py and tests/test_hidden_engine.py use it too)."""
    from verl.trainer.config import CheckpointConfig
    from verl.workers.config import FSDPEngineConfig, FSDPOptimizerConfig, HFModelConfig
    from verl.workers.engine import EngineRegistry

    model_cfg = HFModelConfig(path=model_path, enable_gradient_checkpointing=False, use_remove_padding=use_remove_padding,
                              override_config={"attn_implementation": "sdpa"})
    engine = EngineRegistry.new(
        model_type=model_type, backend="fsdp2", model_config=model_cfg,
        engine_config=FSDPEngineConfig(strategy="fsdp2", use_torch_compile=False, use_dynamic_bsz=dynamic,
                                       micro_batch_size_per_gpu=micro, max_token_len_per_gpu=max_token_len,
                                       use_remove_padding=use_remove_padding,
                                       mixed_precision={"param_dtype": "fp32", "reduce_dtype": "fp32",
                                                        "buffer_dtype": "fp32"}),
        optimizer_config=FSDPOptimizerConfig(lr=lr, clip_grad=clip_grad, total_training_steps=4,
                                             weight_decay=weight_decay),
        checkpoint_config=CheckpointConfig(),
    )
    engine.initialize()
    return engine


def actor_config():
    from verl.workers.config import FSDPActorConfig

    return FSDPActorConfig(strategy="fsdp2", rollout_n=1, ppo_mini_batch_size=B, ppo_micro_batch_size_per_gpu=2,
                           use_torch_compile=False, loss_agg_mode="token-mean")


def make_batch(model_path: str, seed: int = 0):
    """A padded batch, dense per-sequence student log-probs and teacher top-k in verl's padded layout.

    The teacher is a random distribution per position; response token t is sampled from the teacher's
    top-k of the row that predicts it, so most sampled tokens are inside the top-k (a few are forced
    outside to exercise the fallback-free exact path when the exact field is given).
    """
    from transformers import AutoModelForCausalLM

    g = torch.Generator().manual_seed(seed)
    prompt_lens, resp_lens = [6, 3, 5, 4], [7, 5, 2, 6]
    S = P + R
    input_ids = torch.zeros(B, S, dtype=torch.long)
    attention_mask = torch.zeros(B, S, dtype=torch.long)
    teacher_logits = torch.randn(B, S, V, generator=g) * (0.5 + 3 * torch.rand(B, S, 1, generator=g))
    t_logp = torch.log_softmax(teacher_logits.double(), -1)
    t_vals, t_ids = t_logp.topk(K, -1)
    for b in range(B):
        p0 = P - prompt_lens[b]
        input_ids[b, p0:P] = torch.randint(3, V, (prompt_lens[b],), generator=g)
        attention_mask[b, p0:P + resp_lens[b]] = 1
        for t in range(resp_lens[b]):
            row = P + t - 1  # the row that predicts response token t
            choice = torch.randint(0, K, (1,), generator=g).item()
            input_ids[b, P + t] = t_ids[b, row, choice] if t != 1 else torch.randint(3, V, (1,), generator=g).item()
    position_ids = (attention_mask.cumsum(-1) - 1).clamp_min(0)
    response_mask = attention_mask[:, P:].clone()
    # teacher tensors in verl's layout: zeros outside the sequence and on its last row (the dummy row)
    tl = t_vals.float().clone()
    ti = t_ids.clone()
    for b in range(B):
        last = P + resp_lens[b] - 1
        tl[b, last], ti[b, last] = 0.0, 0
    t_entropy = -(t_logp.exp() * t_logp).sum(-1)
    t_token = torch.zeros(B, S, dtype=torch.float64)
    t_token[:, :-1] = t_logp[:, :-1].gather(-1, input_ids[:, 1:, None]).squeeze(-1)

    model = AutoModelForCausalLM.from_pretrained(model_path, torch_dtype=torch.float32, attn_implementation="sdpa")
    with torch.no_grad():
        student_logp = torch.zeros(B, R)
        for b in range(B):
            p0, n = P - prompt_lens[b], prompt_lens[b] + resp_lens[b]
            logits = model(input_ids[b:b + 1, p0:p0 + n]).logits[0]
            lp = torch.log_softmax(logits.double(), -1)
            for t in range(resp_lens[b]):
                student_logp[b, t] = lp[prompt_lens[b] + t - 1, input_ids[b, P + t]]
    return {
        "input_ids": input_ids, "attention_mask": attention_mask, "position_ids": position_ids,
        "prompts": input_ids[:, :P].clone(), "responses": input_ids[:, P:].clone(), "response_mask": response_mask,
        "old_log_probs": student_logp, "teacher_logprobs": tl, "teacher_ids": ti,
        "teacher_entropy": t_entropy.float(), "teacher_token_logprob": t_token.float(),
        "prompt_lens": prompt_lens, "resp_lens": resp_lens,
    }


def to_tensordict(batch: dict, *, topk: bool, distillation_only: bool, use_remove_padding: bool = True,
                  exact_teacher: bool = False, estimator_teacher: bool = False, advantages=None):
    from tensordict import TensorDict
    from verl.utils import tensordict_utils as tu
    from verl.workers.utils.padding import left_right_2_no_padding

    fields = {k: batch[k].clone() for k in ("input_ids", "attention_mask", "position_ids", "prompts", "responses",
                                             "response_mask", "old_log_probs")}
    fields["advantages"] = torch.zeros(B, R) if advantages is None else advantages.clone()
    if topk:
        fields["teacher_logprobs"], fields["teacher_ids"] = batch["teacher_logprobs"], batch["teacher_ids"]
    if estimator_teacher:  # verl's k1/k3 layout: the sampled token's teacher log-prob, [B, S, 1]
        fields["teacher_logprobs"] = batch["teacher_token_logprob"].unsqueeze(-1)
        fields["teacher_ids"] = torch.zeros(B, P + R, 1, dtype=torch.long)
    td = left_right_2_no_padding(TensorDict(fields, batch_size=[B]))
    if exact_teacher:  # the reference-worker route ships exact per-token teacher fields, nested like input_ids
        offsets = td["input_ids"].offsets()
        mask = batch["attention_mask"].bool()
        for key in ("teacher_entropy", "teacher_token_logprob"):
            td[key] = torch.nested.nested_tensor_from_jagged(batch[key][mask], offsets=offsets)
    tu.assign_non_tensor(
        td, temperature=1.0, use_remove_padding=use_remove_padding, use_dynamic_bsz=False,
        micro_batch_size_per_gpu=2, max_token_len_per_gpu=4096, use_fused_kernels=False, calculate_entropy=False,
        distillation_use_topk=topk, distillation_only=distillation_only, global_batch_size=B,
    )
    return td


def reference(batch, model_path, *, tau, fkl_coef=1.0, exact_teacher=False, exact_token=False):
    """Dense float64 loss over the whole mini-batch and the gradients of the HF parameters."""
    from transformers import AutoModelForCausalLM

    from verl_eopd import entropy_from_topk, token_logprob_from_topk

    model = AutoModelForCausalLM.from_pretrained(model_path, torch_dtype=torch.float32, attn_implementation="sdpa")
    logits = torch.zeros(B, R, V, dtype=torch.float64)
    rows = []
    for b in range(B):
        pl, rl = batch["prompt_lens"][b], batch["resp_lens"][b]
        p0 = P - pl
        out = model(batch["input_ids"][b:b + 1, p0:p0 + pl + rl]).logits[0].double()
        rows.append(out[pl - 1:pl - 1 + rl])
    mask = batch["response_mask"].bool()
    logits = torch.stack([torch.cat([r, torch.zeros(R - r.shape[0], V, dtype=r.dtype)]) for r in rows])
    sl = slice(P - 1, P - 1 + R)  # teacher rows predicting the response tokens
    t_ids, t_lp = batch["teacher_ids"][:, sl], batch["teacher_logprobs"][:, sl].double()
    ids = batch["responses"]
    if exact_teacher:
        t_ent, t_tok = batch["teacher_entropy"][:, sl].double(), batch["teacher_token_logprob"][:, sl].double()
    else:
        t_ent, _, _ = entropy_from_topk(t_lp, V)
        t_tok, _ = token_logprob_from_topk(t_ids, t_lp, ids, V)
        if exact_token:  # the server's exact sampled-token column (verl_eopd.integration.server_route)
            t_tok = batch["teacher_token_logprob"][:, sl].double()
    t_ids = torch.where(mask.unsqueeze(-1), t_ids, torch.arange(K).expand(B, R, K))  # padding rows: any valid ids
    t_lp = torch.where(mask.unsqueeze(-1), t_lp, torch.full_like(t_lp, -1.0))
    loss, _ = dense_eopd_loss(logits, ids, batch["old_log_probs"], t_ids, t_lp, mask, t_ent.double(),
                              torch.where(mask, t_tok.double(), torch.zeros_like(t_tok.double())),
                              EOPDSettings(entropy_threshold=tau, fkl_coef=fkl_coef))
    loss.backward()
    # the engine's loss against this one: the student's logits from two fp32 forwards in different layouts
    # (fp32_logit_bound), the engine's log-softmax in fp32 and this one in float64 (sides=1); per-token Lipschitz
    # constants r |A| (the clipped policy term; r = exp(log pi - old) with the engine's log pi within eps of this
    # one's) and fkl_coef (the gated FKL's weights sum to 1); absolute parts r |A| + fkl_coef (ln K + max |log q|)
    zmax = model_logit_scale(model)
    eps = log_softmax_bound(zmax, V, fp32_logit_bound(model, P + R), sides=1)
    with torch.no_grad():
        logq = torch.log_softmax(logits, -1)
        logp = logq.gather(-1, ids.long().unsqueeze(-1)).squeeze(-1)
        r = torch.exp(logp - batch["old_log_probs"].double() + eps)[mask]
        adv = (t_tok.double() - batch["old_log_probs"].double())[mask].abs()
        lip = float((r * adv).mean()) + fkl_coef
        log_q = float(logq[mask].abs().max())
    bound = fp32_loss_bound(eps, lip, lip + fkl_coef * (math.log(K) + log_q), tokens=int(mask.sum()), k=K, sides=1)
    return loss.item(), {n: p.grad.detach().clone() for n, p in model.named_parameters()}, bound


def engine_grads(engine) -> dict:
    grads = {}
    for name, p in engine.module.named_parameters():
        g = p.grad
        g = g.full_tensor() if hasattr(g, "full_tensor") else g
        grads[name.replace("_fsdp_wrapped_module.", "")] = g.detach().clone()
    return grads


def run_step(engine, td, loss_fn):
    """One forward/backward over the mini-batch (no optimizer step); returns (output, parameter grads)."""
    engine.optimizer_zero_grad()
    with engine.train_mode():
        out = engine.forward_backward_batch(td, loss_fn, forward_only=False)
        grads = engine_grads(engine)
    return out, grads


def eopd_loss_fn(**cfg):
    """The loss function the EOPD worker binds to its actor (integration/trainer.py)."""
    from verl.workers.config import DistillationConfig

    from verl_eopd.integration.config import EOPDLossConfig
    from verl_eopd.integration.loss import eopd_ppo_loss

    dcfg = DistillationConfig(distillation_loss=EOPDLossConfig(topk=K, **cfg))
    return partial(eopd_ppo_loss, config=actor_config(), distillation_config=dcfg)


def _median_teacher_entropy(batch):
    from verl_eopd import entropy_from_topk

    sl = slice(P - 1, P - 1 + R)
    est, _, _ = entropy_from_topk(batch["teacher_logprobs"][:, sl].double(), V)
    return float(est[batch["response_mask"].bool()].median())


def _total_loss(out) -> float:
    losses = out["loss"] if isinstance(out["loss"], list) else [out["loss"]]
    return float(sum(losses))


def _same_forward_scales(model_path: str, batch: dict) -> dict:
    """Scales for comparing two losses computed on one engine forward of the same batch (the same ops on the same
    inputs give the same logits): eps = the two losses' fp32 log-softmaxes (sides=2, dz=0); r = exp(log pi - old) <=
    exp(eps_hf + u |old|), old being the HF student's log-probs (make_batch) and the engine's within eps_hf of them
    (two fp32 forwards, fp32 vs float64 log-softmax); adv = |log pi_T - old| per response token."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32)
    zmax = model_logit_scale(model)
    m = batch["response_mask"].bool()
    old = batch["old_log_probs"].double()
    eps_hf = log_softmax_bound(zmax, V, fp32_logit_bound(model, P + R), sides=1)
    adv = (batch["teacher_token_logprob"][:, P - 1:P - 1 + R].double() - old)[m].abs()
    return {"eps": log_softmax_bound(zmax, V, 0.0, sides=2), "r": math.exp(eps_hf + U32 * float(old[m].abs().max())),
            "adv": adv, "tokens": int(m.sum()), "zmax": zmax}


def _compare_grads(got: dict, ref: dict):
    """The engine's parameter gradients against the HF reference's: two fp32 backward passes through the student
    in different layouts, within 2 gamma_{T+V+H} T max|g| per tensor (tests/tolerances.py), T = B (P + R) = 52
    token positions: 2.5e-3 max|g|."""
    assert_grads_close(got, ref, tokens=B * (P + R), vocab=V, hidden=HIDDEN)


@pytest.mark.parametrize("use_remove_padding", [True, False])
@pytest.mark.parametrize("exact_teacher", [False, True])
def test_eopd_through_fsdp_engine_matches_dense_reference(env, use_remove_padding, exact_teacher):
    batch = make_batch(env["model_path"])
    tau = _median_teacher_entropy(batch)
    engine = make_engine(env["model_path"])
    td = to_tensordict(batch, topk=True, distillation_only=True, use_remove_padding=use_remove_padding,
                       exact_teacher=exact_teacher)
    out, grads = run_step(engine, td, eopd_loss_fn(entropy_threshold=tau))
    ref_loss, ref_grads, bound = reference(batch, env["model_path"], tau=tau, exact_teacher=exact_teacher)
    # loss: reference()'s bound, 4.3e-2 (eps 2.4e-3 x the constants); observed 1.4e-6. Gradients: _compare_grads;
    # observed at most 1.1e-3 of the bound (5.9e-5 at max|g| 21)
    assert_within(torch.tensor(_total_loss(out)), torch.tensor(ref_loss), bound, "loss")
    _compare_grads(grads, ref_grads)
    metrics = out["metrics"]
    for key in ("eopd/teacher_entropy_mean", "eopd/gate_frac", "eopd/fkl_mean", "eopd/fkl_gated_mean", "eopd/rkl_mean",
                "eopd/student_entropy_mean", "eopd/student_entropy_gated_mean", "eopd/teacher_topk_mass_mean"):
        assert key in metrics, key
    assert ("eopd/token_in_topk_frac" in metrics) != exact_teacher
    assert ("eopd/teacher_entropy_lower_mean" in metrics) != exact_teacher


def test_update_on_model_pass_fields_is_the_same_update(env):
    """The EOPD trainer has verl's worker bridge fetch only the fields a model pass reads
    (`integration.trainer.model_pass_fields` on TransferQueue's own field schema of the stored batch): the
    per-sample rollout bookkeeping goes, tensors and multi_modal_inputs stay, and verl's engine gives the same
    loss and gradients on the narrowed batch as on the full one."""
    from tensordict import NonTensorData, NonTensorStack
    from transfer_queue.metadata import extract_field_schema
    from verl.utils import tensordict_utils as tu

    from verl_eopd.integration.trainer import model_pass_fields

    batch = make_batch(env["model_path"], seed=2)
    td = to_tensordict(batch, topk=True, distillation_only=True, exact_teacher=True)
    rollout = {"raw_prompt": [[{"role": "user", "content": f"q{b}"}] for b in range(B)],
               "reward_model": [{"ground_truth": str(b)} for b in range(B)], "data_source": ["tiny"] * B,
               "uid": [f"u{b}" for b in range(B)], "multi_modal_inputs": [{} for _ in range(B)]}
    for key, values in rollout.items():
        tu.assign_non_tensor_stack(td, key, values)
    # verl keeps the batch-level settings (NonTensorData) in the meta's extra_info, not in the stored fields
    settings = [key for key in td.keys() if isinstance(td.get(key), NonTensorData)]
    stored = td.exclude(*settings)
    fields = model_pass_fields(extract_field_schema(stored))
    assert set(stored.keys()) - set(fields) == {"raw_prompt", "reward_model", "data_source", "uid"}
    lean = td.select(*fields, *settings)
    assert isinstance(lean.get("multi_modal_inputs"), NonTensorStack)
    assert isinstance(lean.get("temperature"), NonTensorData) and lean["teacher_ids"] is td["teacher_ids"]
    engine = make_engine(env["model_path"])
    out_full, g_full = run_step(engine, td, eopd_loss_fn())
    out_lean, g_lean = run_step(engine, lean, eopd_loss_fn())
    assert _total_loss(out_lean) == _total_loss(out_full)
    assert set(g_lean) == set(g_full)  # exact by construction: the same engine, ops and tensors
    assert all(torch.equal(g_lean[n], g_full[n]) for n in g_full)


def test_fkl_coef_zero_equals_verls_native_pg_opd(env):
    """fkl_coef = 0: the same loss and gradients as verl's k1 + use_policy_gradient OPD on the same batch.

    verl's native advantage is -(log pi_theta - log pi_T) with the *current* log-prob detached, EOPD's is
    log pi_T - log pi_old (the paper); old_log_probs here equal the current policy, as on the first
    mini-batch of every step, so the two must agree.
    """
    from verl.trainer.distillation.losses import distillation_ppo_loss
    from verl.workers.config import DistillationConfig, DistillationLossConfig

    batch = make_batch(env["model_path"], seed=1)
    engine = make_engine(env["model_path"])
    out_eopd, g_eopd = run_step(engine, to_tensordict(batch, topk=True, distillation_only=True, exact_teacher=True),
                                eopd_loss_fn(fkl_coef=0.0))
    native = DistillationConfig(distillation_loss=DistillationLossConfig(
        loss_mode="k1", topk=None, use_policy_gradient=True, use_task_rewards=False, loss_max_clamp=None,
        log_prob_min_clamp=None, clip_ratio=0.2, clip_ratio_low=0.2, clip_ratio_high=0.2))
    native_fn = partial(distillation_ppo_loss, config=actor_config(), distillation_config=native)
    out_native, g_native = run_step(
        engine, to_tensordict(batch, topk=False, distillation_only=False, estimator_teacher=True), native_fn)
    # one engine forward, two losses: eps (both fp32 log-softmaxes) x the token mean of r |A| + their rounding (the
    # policy term only: fkl_coef = 0): 6.7e-4; observed 9.5e-7
    sc = _same_forward_scales(env["model_path"], batch)
    lip = sc["r"] * float(sc["adv"].mean())
    assert_within(torch.tensor(_total_loss(out_eopd)), torch.tensor(_total_loss(out_native)),
                  fp32_loss_bound(sc["eps"], lip, lip, tokens=sc["tokens"], k=K), "loss")
    assert any(g.abs().max() > 0 for g in g_native.values())
    # fp32, the two losses sum the same per-token terms in another order: bound from tests/tolerances.py
    from tolerances import assert_grads_close

    tokens = int(batch["response_mask"].sum())
    assert_grads_close(g_eopd, g_native, tokens=tokens, vocab=STUDENT_VOCAB, hidden=HIDDEN)


def _task_advantages(batch, seed: int = 3) -> torch.Tensor:
    """GRPO-like per-sequence advantages (+-1 with noise) broadcast over each response, zero on padding."""
    g = torch.Generator().manual_seed(seed)
    adv = (torch.randint(0, 2, (B, 1), generator=g) * 2 - 1 + 0.3 * torch.randn(B, 1, generator=g)).expand(B, R)
    return adv * batch["response_mask"]


@pytest.mark.parametrize("coef", [0.5, 2.0])
def test_eopd_grpo_loss_is_verls_task_ppo_loss_plus_coef_times_eopd(env, coef):
    """algorithm=eopd_grpo's loss through verl's engine, with nonzero task advantages: the loss and every
    gradient equal verl's own PPO loss on those advantages (verl.workers.utils.losses.ppo_loss, the GRPO
    update) plus distillation_loss_coef x the pure EOPD loss on the same batch."""
    from verl.workers.utils.losses import ppo_loss
    from tolerances import assert_grads_close

    batch = make_batch(env["model_path"], seed=2)
    adv = _task_advantages(batch)
    engine = make_engine(env["model_path"])
    out_mix, g_mix = run_step(engine, to_tensordict(batch, topk=True, distillation_only=False, advantages=adv),
                              eopd_loss_fn(use_task_rewards=True, distillation_loss_coef=coef))
    out_pg, g_pg = run_step(engine, to_tensordict(batch, topk=False, distillation_only=False, advantages=adv),
                            partial(ppo_loss, config=actor_config()))
    out_kd, g_kd = run_step(engine, to_tensordict(batch, topk=True, distillation_only=True), eopd_loss_fn())
    assert max(float(g.abs().max()) for g in g_pg.values()) > 1e-3  # the task's policy gradient is exercised
    expected = _total_loss(out_pg) + coef * _total_loss(out_kd)
    # one engine forward, three losses: the mix's per-token constants r |adv| + coef (r |A| + 1) against the same
    # constants spread over the PG and coef x KD losses (eps: two fp32 log-softmaxes), absolute parts plus
    # coef (ln K + max |log q| <= 2 Z + ln V): 6.7e-4 (coef 0.5), 2.4e-3 (coef 2); observed 1.2e-7 at most
    sc = _same_forward_scales(env["model_path"], batch)
    lip = sc["r"] * (float(adv.abs().max()) + coef * float(sc["adv"].mean())) + coef
    log_q = 2 * sc["zmax"] + math.log(V)
    assert_within(torch.tensor(_total_loss(out_mix)), torch.tensor(expected),
                  fp32_loss_bound(sc["eps"], lip, lip + coef * (math.log(K) + log_q), tokens=sc["tokens"], k=K),
                  "loss")
    assert_grads_close(g_mix, {n: g_pg[n] + coef * g_kd[n] for n in g_pg}, tokens=int(batch["response_mask"].sum()),
                       vocab=STUDENT_VOCAB, hidden=HIDDEN)


def test_eopd_trains_with_task_rewards_and_metrics(env):
    """eopd + GRPO-style task loss (nonzero advantages): three real optimizer steps, finite losses, the loss
    falls, metrics reported."""
    batch = make_batch(env["model_path"], seed=2)
    adv = _task_advantages(batch)
    engine = make_engine(env["model_path"], lr=1e-2)
    loss_fn = eopd_loss_fn(use_task_rewards=True, distillation_loss_coef=0.5)
    losses = []
    for _ in range(3):
        td = to_tensordict(batch, topk=True, distillation_only=False, advantages=adv)
        with engine.train_mode():
            out = engine.train_batch(td, loss_function=loss_fn)
        losses.append(_total_loss(out))
        assert math.isfinite(out["metrics"]["grad_norm"])
    assert all(math.isfinite(x) for x in losses)
    assert losses[-1] < losses[0]
    assert "eopd/gate_frac" in out["metrics"] and "actor/pg_loss" in out["metrics"]


def with_token_column(batch, wrong_row=None):
    """The patched servers' [B, S, K + 1] payload: column K = the next token and its exact teacher log-prob
    (id 0 / 0.0 on each sequence's dummy last row), beside the unchanged top-k columns."""
    ids, lp = batch["teacher_ids"], batch["teacher_logprobs"]
    nxt = torch.zeros(B, P + R, dtype=ids.dtype)
    nxt[:, :-1] = batch["input_ids"][:, 1:]
    tok = batch["teacher_token_logprob"].clone()
    for b in range(B):
        last = P + batch["resp_lens"][b] - 1
        nxt[b, last], tok[b, last] = 0, 0.0
    if wrong_row is not None:
        nxt[wrong_row] = (nxt[wrong_row] + 1) % V
    out = dict(batch)
    out["teacher_ids"] = torch.cat([ids, nxt.unsqueeze(-1)], -1)
    out["teacher_logprobs"] = torch.cat([lp, tok.unsqueeze(-1)], -1)
    return out


def test_server_payload_with_exact_token_column_matches_dense_reference(env):
    """Top-k entropy estimate, exact sampled-token log-prob from column K: loss and gradients equal the
    float64 reference built the same way; no token needs the fallback (it would for the plain payload)."""
    batch = make_batch(env["model_path"])
    tau = _median_teacher_entropy(batch)
    engine = make_engine(env["model_path"])
    out, grads = run_step(engine, to_tensordict(with_token_column(batch), topk=True, distillation_only=True),
                          eopd_loss_fn(entropy_threshold=tau))
    ref_loss, ref_grads, bound = reference(batch, env["model_path"], tau=tau, exact_token=True)
    # loss: reference()'s bound, 4.3e-2; observed 1.2e-6. Gradients: _compare_grads; observed < 1.1e-3 of the bound
    assert_within(torch.tensor(_total_loss(out)), torch.tensor(ref_loss), bound, "loss")
    _compare_grads(grads, ref_grads)
    m = out["metrics"]  # one value per micro-batch
    assert m["eopd/teacher_token_fallback_frac"] == [0.0] * len(m["eopd/teacher_token_fallback_frac"])
    assert min(m["eopd/token_in_topk_frac"]) < 1.0  # the batch has sampled tokens outside the top-k
    plain, _ = run_step(engine, to_tensordict(batch, topk=True, distillation_only=True),
                        eopd_loss_fn(entropy_threshold=tau))
    pm = plain["metrics"]
    # count / n and 1 - count / n from integer counts: each fraction rounded at most twice (3u)
    assert_within(torch.tensor(pm["eopd/teacher_token_fallback_frac"]),
                  torch.tensor([1.0 - x for x in pm["eopd/token_in_topk_frac"]]), 3 * U32, "fallback_frac")
    assert max(pm["eopd/teacher_token_fallback_frac"]) > 0.0
    assert abs(_total_loss(plain) - ref_loss) > bound  # the fallback really differs, beyond rounding


def test_token_column_for_other_tokens_is_refused(env):
    batch = make_batch(env["model_path"])
    engine = make_engine(env["model_path"])
    bad = with_token_column(batch, wrong_row=(1, P + 1))
    with pytest.raises(ValueError, match="sampled-token column"):
        run_step(engine, to_tensordict(bad, topk=True, distillation_only=True), eopd_loss_fn())
    wide = dict(batch, teacher_ids=torch.cat([batch["teacher_ids"]] * 2, -1),
                teacher_logprobs=torch.cat([batch["teacher_logprobs"]] * 2, -1))
    with pytest.raises(ValueError, match="columns; expected distillation_loss.topk"):
        run_step(engine, to_tensordict(wide, topk=True, distillation_only=True), eopd_loss_fn())


@pytest.mark.parametrize("clip_ratio_c", [None, 3.0])
def test_rkl_surrogate_matches_verls_vanilla_ppo_loss(clip_ratio_c):
    """With the dual clip at 3 (verl's default), the RKL term is verl's vanilla PPO loss on A = log pi_T - log pi_old."""
    from types import SimpleNamespace

    from verl.trainer.ppo.core_algos import compute_policy_loss_vanilla

    from verl_eopd import ppo_clipped_rkl

    g = torch.Generator().manual_seed(3)
    old = -torch.rand(4, 9, generator=g) * 3
    logp = (old + torch.randn(4, 9, generator=g) * 0.8).requires_grad_(True)  # ratios far outside [0.8, 1.2]
    t_tok = -torch.rand(4, 9, generator=g) * 6  # advantages of both signs, some < -1 / 3 of the dual clip
    mask = torch.rand(4, 9, generator=g) > 0.2
    ours, adv, _ = ppo_clipped_rkl(logp, old, t_tok, clip_ratio_c=clip_ratio_c)
    ours = (ours * mask).sum() / mask.sum()
    ours.backward()
    g_ours = logp.grad.clone()
    logp.grad = None
    cfg = SimpleNamespace(clip_ratio=0.2, clip_ratio_low=0.2, clip_ratio_high=0.2, global_batch_info={},
                          get=lambda k, d=None: {"clip_ratio_c": clip_ratio_c or 1e30}.get(k, d))
    verl_loss, _ = compute_policy_loss_vanilla(old, logp, t_tok - old, mask.float(), "token-mean", cfg)
    verl_loss.backward()
    # fp32 on both sides, a few elementwise ops per token (logp - old, exp, x A, clamp/max exact, / n: 6u relative,
    # and exp's argument error u |logp - old| relative) and a mean over the 36 entries (gamma_36): loss within
    # 2 (gamma_36 + 6u + u max|logp - old|) mean |r A|; each gradient entry -r A / n (or 0 where clipped, on both
    # sides) within 2 (6u + u |logp - old|) |g|. Bounds 1.4e-5 (loss), <= 4.3e-7 (grads); observed 0 (bit-identical)
    d = float((logp.detach() - old).abs().max())
    rel = 6 * U32 + U32 * d
    r_a = (torch.exp(logp.detach().double() - old.double()) * (t_tok - old).double()).abs()
    assert_within(ours.detach(), verl_loss.detach(), 2 * (gamma(36) + rel) * float(r_a[mask].mean()), "loss")
    assert_within(g_ours, logp.grad, 2 * rel * logp.grad.double().abs(), "grad")
