"""The teacher in verl's reference role, through verl's real worker and FSDP engine on CPU.

Tiny student (vocab 320) and a bigger, differently initialised teacher with a padded vocabulary (352)
share one tokenizer. Every teacher field is compared with a dense Hugging Face forward of the teacher.
"""

from __future__ import annotations

from functools import partial

import pytest
import torch

from conftest import STUDENT_VOCAB, TEACHER_VOCAB
from dense_reference import dense_eopd_loss, dense_teacher
from verl_eopd import EOPDSettings, map_teacher_eos_in_topk, remap_first_eos
from verl_eopd.integration.teacher import TeacherSettings
from tolerances import (
    U32,
    assert_grads_close,
    assert_within,
    entropy_bound,
    fp32_logit_bound,
    fp32_loss_bound,
    log_softmax_bound,
    model_logit_scale,
)

pytestmark = pytest.mark.integration

K = 6
PROMPT_LENS, RESP_LENS = [5, 3, 4, 2], [6, 4, 2, 5]
P, R = max(PROMPT_LENS), max(RESP_LENS)
B = len(PROMPT_LENS)
STUDENT_EOS, TEACHER_EOS = 0, 2  # <|endoftext|>, <|im_end|> in the tiny tokenizer


# ------------------------------------------------------------------------------------------------ EOS remap


def _nested(seqs):
    return torch.nested.nested_tensor_from_jagged(torch.cat(seqs), offsets=torch.tensor([0] + [len(s) for s in seqs]).cumsum(0))


def test_remap_first_eos_only_first_and_only_in_the_response():
    seqs = [torch.tensor([0, 5, 6, 7, 0, 8, 0]), torch.tensor([9, 9, 4, 4]), torch.tensor([0, 0, 3])]
    resp_lens = torch.tensor([4, 2, 1])  # seq 0: response = [7, 0, 8, 0]; seq 2's response has no eos
    out = remap_first_eos(_nested(seqs), resp_lens, STUDENT_EOS, TEACHER_EOS)
    got = [t.tolist() for t in out.unbind()]
    assert got == [[0, 5, 6, 7, 2, 8, 0], [9, 9, 4, 4], [0, 0, 3]]
    assert [t.tolist() for t in _nested(seqs).unbind()][0] == [0, 5, 6, 7, 0, 8, 0]  # input untouched


def test_map_teacher_eos_in_topk_skips_rows_holding_the_student_eos():
    ids = torch.tensor([[2, 5, 7], [0, 2, 9], [4, 5, 6]])
    assert map_teacher_eos_in_topk(ids, STUDENT_EOS, TEACHER_EOS).tolist() == [[0, 5, 7], [0, 2, 9], [4, 5, 6]]


# ------------------------------------------------------------------------------------------------ worker


def _batch(seed=0, eos_at=None):
    """verl's padded update batch: left-padded prompts, right-padded responses."""
    g = torch.Generator().manual_seed(seed)
    S = P + R
    input_ids = torch.zeros(B, S, dtype=torch.long)
    attention_mask = torch.zeros(B, S, dtype=torch.long)
    for b in range(B):
        p0 = P - PROMPT_LENS[b]
        input_ids[b, p0:P + RESP_LENS[b]] = torch.randint(3, STUDENT_VOCAB, (PROMPT_LENS[b] + RESP_LENS[b],), generator=g)
        attention_mask[b, p0:P + RESP_LENS[b]] = 1
    if eos_at is not None:  # (b, t): a student end token in the response, then one more later
        b, t = eos_at
        input_ids[b, P + t] = STUDENT_EOS
        input_ids[b, P + t + 2] = STUDENT_EOS
    return {"input_ids": input_ids, "attention_mask": attention_mask,
            "position_ids": (attention_mask.cumsum(-1) - 1).clamp_min(0), "prompts": input_ids[:, :P].clone(),
            "responses": input_ids[:, P:].clone(), "response_mask": attention_mask[:, P:].clone()}


def _td(batch, use_remove_padding=True, extra=None):
    from tensordict import TensorDict
    from verl.utils import tensordict_utils as tu
    from verl.workers.utils.padding import left_right_2_no_padding

    fields = {k: v.clone() for k, v in batch.items()}
    fields.update(extra or {})
    td = left_right_2_no_padding(TensorDict(fields, batch_size=[B]))
    tu.assign_non_tensor(td, temperature=0.7, compute_loss=False, calculate_entropy=False,
                         use_remove_padding=use_remove_padding, global_token_num=batch["attention_mask"].sum(-1).tolist())
    return td


FP32 = {"param_dtype": "fp32", "reduce_dtype": "fp32", "buffer_dtype": "fp32"}


def _teacher_worker(tiny_models, use_remove_padding=True, eos=(None, None), mixed_precision=FP32, model_dtype="fp32",
                    param_dtype=None, from_hidden=False):
    from verl.trainer.config import CheckpointConfig
    from verl.workers.config import FSDPEngineConfig, HFModelConfig, TrainingWorkerConfig

    from verl_eopd.integration.teacher import teacher_worker_class

    # what ActorRolloutRefWorker.init_model hands its ref worker: the *student's* model config
    model_cfg = HFModelConfig(path=tiny_models["student"], enable_gradient_checkpointing=False,
                              use_remove_padding=use_remove_padding, override_config={"attn_implementation": "sdpa"})
    engine_cfg = FSDPEngineConfig(strategy="fsdp2", use_torch_compile=False, use_dynamic_bsz=False, forward_only=True,
                                  infer_micro_batch_size_per_gpu=2, use_remove_padding=use_remove_padding,
                                  mixed_precision=mixed_precision, model_dtype=model_dtype)
    cfg = TrainingWorkerConfig(model_type="language_model", model_config=model_cfg, engine_config=engine_cfg,
                               optimizer_config=None, checkpoint_config=CheckpointConfig())
    settings = TeacherSettings(model_path=tiny_models["teacher"], topk=K, student_eos_token_id=eos[0],
                               teacher_eos_token_id=eos[1], param_dtype=param_dtype, from_hidden=from_hidden)
    worker = teacher_worker_class()(cfg, teacher=settings)
    worker.reset()
    return worker


def _model_eps(model, vocab: int, *, sides: int = 2) -> float:
    """Derived bound on |log p| between the worker (verl's FSDP engine, packed or padded rows, fp32) and a plain
    HF forward of the same model: two fp32 forwards in different layouts (fp32_logit_bound, sequences <= P + R
    tokens), then each side's log-softmax rounding (tests/tolerances.py; sides=1 when the other side's
    log-softmax is float64)."""
    return log_softmax_bound(model_logit_scale(model), vocab, fp32_logit_bound(model, P + R), sides=sides)


def _dense_teacher_rows(tiny_models, batch, remap=False):
    """Per sequence, the dense teacher fields of each packed row (row j predicts token j+1)."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_models["teacher"], dtype=torch.float32, attn_implementation="sdpa")
    rows = []
    with torch.no_grad():
        for b in range(B):
            p0, n = P - PROMPT_LENS[b], PROMPT_LENS[b] + RESP_LENS[b]
            ids = batch["input_ids"][b, p0:p0 + n].clone()
            if remap:
                resp = ids[PROMPT_LENS[b]:]
                hits = (resp == STUDENT_EOS).nonzero()
                if len(hits):
                    resp[hits[0, 0]] = TEACHER_EOS
            logits = model(ids[None]).logits[0]
            nxt = torch.cat([ids[1:], ids[:1]])  # last row: dummy label
            rows.append(dense_teacher(logits, nxt, K))
    return rows


@pytest.mark.parametrize("use_remove_padding", [True, False])
def test_teacher_outputs_equal_dense_teacher_forward(verl_cpu, tiny_models, use_remove_padding):
    batch = _batch()
    worker = _teacher_worker(tiny_models, use_remove_padding)
    out = worker.infer_batch(_td(batch, use_remove_padding))
    dense = _dense_teacher_rows(tiny_models, batch)
    assert out["teacher_ids"].dtype == torch.int32 and out["teacher_logprobs"].dtype == torch.float32
    from transformers import AutoModelForCausalLM

    # bound: eps = 2 dz + u (8 Z + 3 ln V + 2) + gamma_V = 1.4e-2, dz = 2 gamma_n Z (fp32_logit_bound: n = 3 (5 H + I
    # + 2 S) + 2 H = 1,170 terms, Z = 51.5 for this teacher); entropies eps (1 + H_row) + (3u + gamma_V) H_row
    # (1.6e-2 to 4.5e-2 on these rows); the dense side's log-softmax is float64 (sides=1).
    # Observed 1.1e-5 (top-k log-probs), 2.7e-6 (entropy), 6.2e-6 (sampled token)
    teacher = AutoModelForCausalLM.from_pretrained(tiny_models["teacher"], dtype=torch.float32)
    eps = _model_eps(teacher, TEACHER_VOCAB, sides=1)
    for b in range(B):
        d, n = dense[b], PROMPT_LENS[b] + RESP_LENS[b]
        ids, lp = out["teacher_ids"][b], out["teacher_logprobs"][b]
        assert ids.shape == (n, K)
        assert torch.equal(ids.long().sort(-1).values, d["topk_ids"].sort(-1).values)
        assert_within(lp, d["topk_logprobs"], eps, "teacher_logprobs")
        assert_within(out["teacher_entropy"][b], d["entropy"], entropy_bound(eps, d["entropy"], TEACHER_VOCAB, sides=1),
                      "teacher_entropy")
        tok = out["teacher_token_logprob"][b][:-1]  # the last row of a sequence is a dummy
        assert_within(tok, d["token_logprobs"][:-1], eps, "teacher_token_logprob")
    # the entropy really varies, so a gate at tau has something to select
    ent = torch.cat([e for e in out["teacher_entropy"].unbind()])
    assert ent.std() > 0.2


def test_bf16_teacher_copy_gives_the_fp32_copys_outputs_at_half_the_memory(verl_cpu, tiny_models):
    """teacher_param_dtype=bf16 (the default): the teacher's parameters, which verl keeps offloaded between passes,
    in bf16; FSDP computes in its param_dtype (bf16 by default) either way, so every output is bit-identical to
    the fp32 copy's, and the RoPE buffers stay fp32. verl's own model_dtype=bf16 would also round the buffers,
    and changes the outputs (the reason for the parameter-only cast)."""
    bf16 = {"param_dtype": "bf16", "reduce_dtype": "fp32", "buffer_dtype": "fp32"}
    batch = _batch(seed=5)
    outs, sizes = {}, {}
    for name, model_dtype, param_dtype in (("fp32", "fp32", None), ("ours", "fp32", "bf16"), ("verl", "bf16", None)):
        worker = _teacher_worker(tiny_models, mixed_precision=bf16, model_dtype=model_dtype, param_dtype=param_dtype)
        module = worker.engine.module
        sizes[name] = sum(p.numel() * p.element_size() for p in module.parameters())
        if name != "verl":
            assert {b.dtype for b in module.buffers()} == {torch.float32}, name
        outs[name] = worker.infer_batch(_td(batch))
    assert sizes["ours"] * 2 == sizes["fp32"]
    for key in ("teacher_ids", "teacher_logprobs", "teacher_entropy", "teacher_token_logprob"):
        for a, b in zip(outs["fp32"][key].unbind(), outs["ours"][key].unbind()):
            assert torch.equal(a, b), key
    diff = max((a - b).abs().max().item() for a, b in zip(outs["fp32"]["teacher_logprobs"].unbind(),
                                                            outs["verl"]["teacher_logprobs"].unbind()))
    assert diff > 1e-3  # bf16 RoPE frequencies


def test_teacher_scores_the_remapped_end_token(verl_cpu, tiny_models):
    batch = _batch(seed=3, eos_at=(0, 1))
    worker = _teacher_worker(tiny_models, eos=(STUDENT_EOS, TEACHER_EOS))
    out = worker.infer_batch(_td(batch))
    dense = _dense_teacher_rows(tiny_models, batch, remap=True)
    pl = PROMPT_LENS[0]
    row = pl + 1 - 1  # row predicting response token 1 (the first student end token)
    from transformers import AutoModelForCausalLM

    # bound eps = 1.4e-2 as in test_teacher_outputs_equal_dense_teacher_forward; observed 7.8e-7
    eps = _model_eps(AutoModelForCausalLM.from_pretrained(tiny_models["teacher"], dtype=torch.float32), TEACHER_VOCAB,
                     sides=1)
    assert_within(out["teacher_token_logprob"][0][row], dense[0]["token_logprobs"][row], eps, "teacher_token_logprob")
    # the teacher saw its own end token there: log pi_T(<|im_end|>), not log pi_T(<|endoftext|>), further from the
    # unmapped token's log-prob than rounding can move it (observed 11)
    unmapped = _dense_teacher_rows(tiny_models, batch, remap=False)[0]["token_logprobs"][row].item()
    assert abs(out["teacher_token_logprob"][0][row].item() - unmapped) > eps
    ids = torch.cat([t for t in out["teacher_ids"].unbind()])
    rows_without_student_eos = ~(ids == STUDENT_EOS).any(-1)
    # teacher end token renamed to the student's wherever the row held only the teacher's
    assert not (ids[rows_without_student_eos] == TEACHER_EOS).any()


def test_actor_update_fed_by_teacher_worker_equals_dense_reference(verl_cpu, tiny_models):
    """Teacher worker fields -> the actor's EOPD update through verl's engine == float64 hand reference."""
    from transformers import AutoModelForCausalLM
    from verl_eopd.integration.loss import eopd_ppo_loss
    from verl.workers.config import DistillationConfig

    from test_verl_engine import HIDDEN, _total_loss, actor_config, make_engine, run_step
    from verl_eopd.integration.config import EOPDLossConfig

    batch = _batch(seed=5)
    worker = _teacher_worker(tiny_models)
    tout = worker.infer_batch(_td(batch))
    student = AutoModelForCausalLM.from_pretrained(tiny_models["student"], dtype=torch.float32, attn_implementation="sdpa")
    resp_logits, old = torch.zeros(B, R, STUDENT_VOCAB, dtype=torch.float64), torch.zeros(B, R)
    rows = slice(P - 1, P - 1 + R)
    fields = ("teacher_ids", "teacher_logprobs", "teacher_entropy", "teacher_token_logprob")
    padded = {k: torch.zeros(B, P + R, *tout[k][0].shape[1:], dtype=torch.float64) for k in fields}
    mask = batch["attention_mask"].bool()
    for k in padded:
        padded[k][mask] = torch.cat([t for t in tout[k].unbind()]).double()
    for b in range(B):
        p0, pl, rl = P - PROMPT_LENS[b], PROMPT_LENS[b], RESP_LENS[b]
        logits = student(batch["input_ids"][b:b + 1, p0:p0 + pl + rl]).logits[0].double()
        resp_logits[b, :rl] = logits[pl - 1:pl - 1 + rl]
        lp = torch.log_softmax(logits.detach(), -1)[pl - 1:pl - 1 + rl]
        old[b, :rl] = lp.gather(-1, batch["responses"][b, :rl, None]).squeeze(-1).float()
    resp_mask = batch["response_mask"].bool()
    t_ent = padded["teacher_entropy"][:, rows]
    tau = float(t_ent[resp_mask].median())

    engine = make_engine(tiny_models["student"])
    extra = {"old_log_probs": old, "teacher_ids": padded["teacher_ids"].long(),
             "teacher_logprobs": padded["teacher_logprobs"].float()}
    td = _td(batch, extra=extra)
    for k in ("teacher_entropy", "teacher_token_logprob"):
        td[k] = tout[k]
    from verl.utils import tensordict_utils as tu

    tu.assign_non_tensor(td, use_dynamic_bsz=False, micro_batch_size_per_gpu=2, max_token_len_per_gpu=4096,
                         use_fused_kernels=False, distillation_use_topk=True, distillation_only=True,
                         global_batch_size=B, temperature=1.0)
    dcfg = DistillationConfig(distillation_loss=EOPDLossConfig(topk=K, entropy_threshold=tau))
    out, grads = run_step(engine, td, partial(eopd_ppo_loss, config=actor_config(), distillation_config=dcfg))

    x = resp_logits.detach().requires_grad_(True)
    t_ids = torch.where(resp_mask[..., None], padded["teacher_ids"][:, rows].long(), torch.arange(K).expand(B, R, K))
    t_lp = torch.where(resp_mask[..., None], padded["teacher_logprobs"][:, rows], torch.full((B, R, K), -1.0, dtype=torch.float64))
    ref, _ = dense_eopd_loss(x, batch["responses"], old, t_ids, t_lp, resp_mask, t_ent,
                             torch.where(resp_mask, padded["teacher_token_logprob"][:, rows], 0.0),
                             EOPDSettings(entropy_threshold=tau))
    # loss: the teacher fields are the same numbers on both sides; the student's logits come from two fp32 forwards
    # (engine vs HF: fp32_logit_bound), log-softmax in fp32 vs float64 (sides=1). Bound eps x mean Lipschitz
    # constant (r |A| + 1, r = exp(log pi - old) <= exp(eps + u |old|), old = the HF student's own log-probs) +
    # (gamma_{T+K} + 6u) x the terms' absolute parts (r |A| + ln K + 2 Z + ln V): 3.4e-2; observed 3.9e-6
    import math

    zmax = model_logit_scale(student)
    eps = _model_eps(student, STUDENT_VOCAB, sides=1)
    adv = (padded["teacher_token_logprob"][:, rows] - old.double())[resp_mask].abs()
    r = math.exp(eps + U32 * float(old[resp_mask].abs().max()))
    lip = r * float(adv.mean()) + 1.0
    loss_bound = fp32_loss_bound(eps, lip, lip + math.log(K) + 2 * zmax + math.log(STUDENT_VOCAB),
                                 tokens=int(resp_mask.sum()), k=K, sides=1)
    assert_within(torch.tensor(_total_loss(out)), ref.detach(), loss_bound, "loss")
    assert (t_ids[resp_mask] >= STUDENT_VOCAB).any(), "the padded teacher vocabulary should reach the top-k here"
    # gradients: the same loss backpropagated through the HF student equals the engine's
    ref_student = AutoModelForCausalLM.from_pretrained(tiny_models["student"], dtype=torch.float32,
                                                       attn_implementation="sdpa")
    logits_rows = []
    for b in range(B):
        p0, pl, rl = P - PROMPT_LENS[b], PROMPT_LENS[b], RESP_LENS[b]
        lg = ref_student(batch["input_ids"][b:b + 1, p0:p0 + pl + rl]).logits[0].double()[pl - 1:pl - 1 + rl]
        logits_rows.append(torch.cat([lg, torch.zeros(R - rl, STUDENT_VOCAB, dtype=lg.dtype)]))
    ref2, _ = dense_eopd_loss(torch.stack(logits_rows), batch["responses"], old, t_ids, t_lp, resp_mask, t_ent,
                              torch.where(resp_mask, padded["teacher_token_logprob"][:, rows], 0.0),
                             EOPDSettings(entropy_threshold=tau))
    ref2.backward()
    # gradients: two fp32 backward passes through the student in different layouts, 2 gamma_{T+V+H} T max|g| per
    # tensor (T = B (P + R) = 44 positions: 2.1e-3 max|g|); observed at most 1.8e-3 of the bound (3.6e-4 at max|g|
    # 109)
    assert_grads_close(grads, {n: p.grad for n, p in ref_student.named_parameters()}, tokens=B * (P + R),
                       vocab=STUDENT_VOCAB, hidden=HIDDEN)
    gate_frac = out["metrics"]["eopd/gate_frac"]  # one value per micro-batch
    assert 0 < sum(gate_frac) / len(gate_frac) < 1
