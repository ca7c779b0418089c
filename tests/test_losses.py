"""The EOPD maths against dense float64 references, on values and on gradients (no verl needed)."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from dense_reference import dense_eopd_loss, dense_gate, dense_teacher
from verl_eopd import core as L
from verl_eopd import (
    EOPDSettings,
    entropy_from_topk,
    eopd_loss,
    fkl_topk,
    ppo_clipped_rkl,
    student_logprobs_at,
    teacher_stats,
    token_logprob_from_topk,
)

pytestmark = pytest.mark.unit

HYP = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def _batch(B=3, T=7, V=97, K=6, seed=0, scale=2.0, dtype=torch.float32):
    """Random student/teacher logits, sampled ids, old log-probs (= current, so r = 1), a ragged mask."""
    g = torch.Generator().manual_seed(seed)
    student = (torch.randn(B, T, V, generator=g) * scale).to(dtype)
    teacher_logits = torch.randn(B, T, V, generator=g) * scale * torch.rand(B, T, 1, generator=g) * 2
    ids = torch.randint(0, V, (B, T), generator=g)
    tstats = teacher_stats(teacher_logits, ids, K)
    old = torch.log_softmax(student.double(), -1).gather(-1, ids[..., None]).squeeze(-1).float()
    old = old + 0.3 * torch.randn(B, T, generator=g)  # r != 1 so both clip branches are exercised
    mask = torch.ones(B, T, dtype=torch.bool)
    mask[0, T - 2:] = False
    mask[-1, :2] = False
    return student, teacher_logits, ids, old, tstats, mask


# ------------------------------------------------------------------------------------------------ teacher side


@pytest.mark.parametrize("chunk_bytes", [L.DEFAULT_CHUNK_BYTES, 3 * 97 * 4])  # one chunk / 3-row chunks
def test_teacher_stats_equals_dense_reference(chunk_bytes):
    _, teacher_logits, ids, _, _, _ = _batch()
    got = teacher_stats(teacher_logits, ids, 6, chunk_bytes=chunk_bytes)
    ref = dense_teacher(teacher_logits, ids, 6)
    assert torch.equal(got["topk_ids"], ref["topk_ids"])
    for key in ("topk_logprobs", "entropy", "token_logprobs"):
        torch.testing.assert_close(got[key].double(), ref[key], atol=2e-5, rtol=1e-5)


def test_teacher_stats_bf16_input_computed_in_fp32():
    _, teacher_logits, ids, _, _, _ = _batch(V=257)
    t16 = teacher_logits.bfloat16()
    got = teacher_stats(t16, ids, 6, chunk_bytes=5 * 257 * 4)
    ref = dense_teacher(t16.double(), ids, 6)  # same bf16 values, exact maths
    torch.testing.assert_close(got["entropy"].double(), ref["entropy"], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(got["token_logprobs"].double(), ref["token_logprobs"], atol=1e-5, rtol=1e-5)
    assert got["topk_logprobs"].dtype == torch.float32


def test_teacher_stats_handles_minus_inf_logits():
    logits = torch.randn(2, 3, 20)
    logits[..., 10:] = -math.inf  # a teacher that masks part of its vocabulary
    out = teacher_stats(logits, torch.zeros(2, 3, dtype=torch.long), 4)
    ref = dense_teacher(logits[..., :10], torch.zeros(2, 3, dtype=torch.long), 4)
    torch.testing.assert_close(out["entropy"].double(), ref["entropy"], atol=1e-5, rtol=1e-5)


def test_teacher_stats_rejects_bad_input():
    logits = torch.randn(2, 3, 20)
    with pytest.raises(ValueError, match="k"):
        teacher_stats(logits, torch.zeros(2, 3, dtype=torch.long), 0)
    with pytest.raises(ValueError, match="sampled_ids"):
        teacher_stats(logits, torch.full((2, 3), 20), 4)
    with pytest.raises(ValueError, match="sampled_ids shape"):
        teacher_stats(logits, torch.zeros(2, 4, dtype=torch.long), 4)


@HYP
@given(
    V=st.integers(8, 400), K=st.integers(1, 8), scale=st.floats(0.01, 12.0), seed=st.integers(0, 10_000),
    zipf=st.booleans(),
)
def test_entropy_bounds_contain_exact_entropy(V, K, scale, seed, zipf):
    g = torch.Generator().manual_seed(seed)
    if zipf:  # heavy-tailed, LLM-like
        logits = -scale * torch.log(torch.arange(1, V + 1, dtype=torch.float64))[torch.randperm(V, generator=g)]
        logits = logits.expand(4, V).clone()
    else:
        logits = torch.randn(4, V, generator=g, dtype=torch.float64) * scale
    K = min(K, V)
    logp = torch.log_softmax(logits, -1)
    exact = -(logp.exp() * logp).sum(-1)
    topk = logp.topk(K, -1).values
    est, lo, hi = entropy_from_topk(topk, V)
    tol = 1e-4 * (1 + exact.abs())
    assert (lo.double() <= exact + tol).all(), (lo, exact)
    assert (hi.double() >= exact - tol).all(), (hi, exact)
    assert ((lo <= est) & (est <= hi)).all()


def test_entropy_bounds_are_exact_when_topk_covers_the_vocabulary():
    logp = torch.log_softmax(torch.randn(5, 12, dtype=torch.float64), -1)
    exact = -(logp.exp() * logp).sum(-1)
    est, lo, hi = entropy_from_topk(logp, 12)
    torch.testing.assert_close(lo.double(), exact, atol=1e-5, rtol=0)
    torch.testing.assert_close(hi.double(), exact, atol=1e-5, rtol=0)


def test_entropy_bounds_hand_computed_case():
    # top-2 = {0.5, 0.3}, tail r = 0.2 over V - K = 8 tokens, each <= 0.3:
    # H_K = -(0.5 ln 0.5 + 0.3 ln 0.3); upper adds 0.2 ln(8 / 0.2); lower: cap = min(0.3, 0.2) = 0.2 ->
    # one tail token of 0.2, adds -0.2 ln 0.2.
    topk = torch.log(torch.tensor([[0.5, 0.3]]))
    est, lo, hi = entropy_from_topk(topk, 10)
    h_k = -(0.5 * math.log(0.5) + 0.3 * math.log(0.3))
    assert lo.item() == pytest.approx(h_k - 0.2 * math.log(0.2), abs=1e-6)
    assert hi.item() == pytest.approx(h_k + 0.2 * math.log(8 / 0.2), abs=1e-6)
    assert est.item() == pytest.approx((lo.item() + hi.item()) / 2, abs=1e-6)


def test_token_logprob_from_topk_exact_inside_fallback_outside():
    logp = torch.log_softmax(torch.randn(2, 50, dtype=torch.float64) * 3, -1)
    vals, ids = logp.topk(5, -1)
    inside = ids[:, 2]
    lp, in_topk = token_logprob_from_topk(ids, vals, inside, 50)
    assert in_topk.all()
    torch.testing.assert_close(lp.double(), logp.gather(-1, inside[:, None]).squeeze(-1), atol=1e-6, rtol=0)
    outside = logp.argmin(-1)
    lp, in_topk = token_logprob_from_topk(ids, vals, outside, 50)
    assert not in_topk.any()
    r = 1 - vals.exp().sum(-1)
    expected = torch.minimum(torch.log(r / 45), vals[:, -1])  # uniform tail, capped at p_min
    torch.testing.assert_close(lp.double(), expected, atol=1e-5, rtol=0)
    assert (lp.double() <= vals[:, -1] + 1e-6).all()


# ------------------------------------------------------------------------------------------------ student side


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("chunk_bytes", [L.DEFAULT_CHUNK_BYTES, 2 * 97 * 4])
def test_student_logprobs_at_values_and_gradients(dtype, chunk_bytes):
    g = torch.Generator().manual_seed(1)
    x = (torch.randn(3, 5, 97, generator=g) * 3).to(dtype).requires_grad_(True)
    idx = torch.randint(0, 97, (3, 5, 7), generator=g)
    idx[..., 3] = idx[..., 0]  # duplicate ids must accumulate gradients
    w = torch.randn(3, 5, 7, generator=g, dtype=torch.float64)
    lq, ent = student_logprobs_at(x, idx, with_entropy=True, chunk_bytes=chunk_bytes)
    (lq.double() * w).sum().backward()

    xr = x.detach().double().requires_grad_(True)
    ref = torch.log_softmax(xr, -1).gather(-1, idx)
    (ref * w).sum().backward()
    torch.testing.assert_close(lq.double(), ref.detach(), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(x.grad.double(), xr.grad, atol=1e-5, rtol=1e-5)
    logp = torch.log_softmax(xr.detach(), -1)
    torch.testing.assert_close(ent.double(), -(logp.exp() * logp).sum(-1), atol=1e-5, rtol=1e-5)
    assert x.grad.dtype == dtype


def test_student_logprobs_at_bf16_gradient_matches_fp32():
    g = torch.Generator().manual_seed(2)
    x32 = torch.randn(4, 6, 300, generator=g) * 2
    x16 = x32.bfloat16().requires_grad_(True)
    idx = torch.randint(0, 300, (4, 6, 5), generator=g)
    lq16, _ = student_logprobs_at(x16, idx)
    lq16.sum().backward()
    xr = x16.detach().double().requires_grad_(True)
    torch.log_softmax(xr, -1).gather(-1, idx).sum().backward()
    assert x16.grad.dtype == torch.bfloat16
    torch.testing.assert_close(lq16.double(), torch.log_softmax(xr.detach(), -1).gather(-1, idx), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(x16.grad.double(), xr.grad, atol=1e-2, rtol=1e-2)  # bf16 rounding of the gradient


@HYP
@given(K=st.integers(1, 12), scale=st.floats(0.01, 20.0), tscale=st.floats(0.01, 20.0), seed=st.integers(0, 10_000))
def test_fkl_is_nonnegative(K, scale, tscale, seed):
    g = torch.Generator().manual_seed(seed)
    V = 64
    lq = torch.log_softmax(torch.randn(6, V, generator=g) * scale, -1)
    t_logp = torch.log_softmax(torch.randn(6, V, generator=g) * tscale, -1)
    vals, ids = t_logp.topk(K, -1)
    fkl, mass = fkl_topk(lq.gather(-1, ids), vals)
    assert torch.isfinite(fkl).all()
    assert (fkl >= -1e-6).all(), fkl.min()
    assert ((mass > 0) & (mass <= 1 + 1e-5)).all()


def test_fkl_renormalises_teacher_and_not_student():
    t = torch.log(torch.tensor([[0.4, 0.2]]))  # teacher top-2 mass 0.6 -> p~ = (2/3, 1/3)
    q = torch.log(torch.tensor([[0.1, 0.3]]))  # student full-vocabulary probs at those ids
    fkl, mass = fkl_topk(q, t)
    expected = (2 / 3) * math.log((2 / 3) / 0.1) + (1 / 3) * math.log((1 / 3) / 0.3)
    assert fkl.item() == pytest.approx(expected, abs=1e-6)
    assert mass.item() == pytest.approx(0.6, abs=1e-6)


# ------------------------------------------------------------------------------------------------ objective


def _ref_and_ours(gate="hard", tau=None, fkl_coef=1.0, exact_teacher=True, dtype=torch.float32, **kw):
    student, _, ids, old, ts, mask = _batch(dtype=dtype, **kw)
    if tau is None:
        tau = float(ts["entropy"][mask].median())  # roughly half the tokens gated
    t_ent = ts["entropy"] if exact_teacher else None
    t_tok = ts["token_logprobs"] if exact_teacher else None
    x = student.clone().requires_grad_(True)
    s = EOPDSettings(entropy_threshold=tau, fkl_coef=fkl_coef, gate=gate, gate_quantile=0.3, gate_temperature=0.2)
    loss, stats = eopd_loss(x, ids, old, ts["topk_ids"], ts["topk_logprobs"], mask, s, teacher_entropy=t_ent,
                            teacher_token_logprobs=t_tok)
    loss.backward()
    xr = student.detach().double().requires_grad_(True)
    if not exact_teacher:  # the reference uses what eopd_loss must use: top-k estimates
        est, _, _ = entropy_from_topk(ts["topk_logprobs"].double(), student.shape[-1])
        t_ent = est
        t_tok, _ = token_logprob_from_topk(ts["topk_ids"], ts["topk_logprobs"].double(), ids, student.shape[-1])
    ref, ref_fkl = dense_eopd_loss(xr, ids, old, ts["topk_ids"], ts["topk_logprobs"], mask, t_ent, t_tok, s)
    ref.backward()
    return loss, stats, x.grad, ref, xr.grad, ts, mask


@pytest.mark.parametrize("gate", ["hard", "soft", "quantile"])
@pytest.mark.parametrize("exact_teacher", [True, False])
def test_eopd_loss_equals_dense_reference(gate, exact_teacher):
    loss, stats, grad, ref, ref_grad, ts, mask = _ref_and_ours(gate=gate, exact_teacher=exact_teacher)
    assert loss.item() == pytest.approx(ref.item(), abs=1e-5, rel=1e-5)
    torch.testing.assert_close(grad.double(), ref_grad, atol=1e-6, rtol=1e-5)
    assert 0 < stats["gate_frac"] < 1
    assert stats["loss"] == pytest.approx(stats["rkl_loss"] + stats["fkl_loss"], abs=1e-5)


def test_quantile_gate_gates_the_requested_fraction():
    H = torch.arange(10.0).reshape(2, 5)
    mask = torch.ones(2, 5, dtype=torch.bool)
    g = L.entropy_gate(H, mask, gate="quantile", gate_quantile=0.3)
    assert g.sum().item() == 3 and g.reshape(-1)[-3:].eq(1).all()
    torch.testing.assert_close(g.double(), dense_gate(H, mask, EOPDSettings(gate="quantile", gate_quantile=0.3)))
    g = L.entropy_gate(torch.full((1, 30), 2.0) + torch.arange(30.0) / 100, torch.ones(1, 30, dtype=torch.bool),
                       gate="quantile", gate_quantile=0.1)
    assert g.sum().item() == 3  # ceil(0.1 * 30) = 3, not 4 from 0.1 * 30 = 3.0000000000000004


def test_gate_closed_is_exactly_opd():
    """tau above every entropy, or fkl_coef = 0: loss and gradient are the PPO-clipped RKL alone."""
    student, _, ids, old, ts, mask = _batch()
    x1 = student.clone().requires_grad_(True)
    closed, s1 = eopd_loss(x1, ids, old, ts["topk_ids"], ts["topk_logprobs"], mask, teacher_entropy=ts["entropy"],
                           teacher_token_logprobs=ts["token_logprobs"], entropy_threshold=1e9)
    closed.backward()
    x2 = student.clone().requires_grad_(True)
    off, _ = eopd_loss(x2, ids, old, ts["topk_ids"], ts["topk_logprobs"], mask, teacher_entropy=ts["entropy"],
                       teacher_token_logprobs=ts["token_logprobs"], fkl_coef=0.0)
    off.backward()
    x3 = student.clone().requires_grad_(True)
    logp = torch.log_softmax(x3, -1).gather(-1, ids[..., None]).squeeze(-1)
    rkl, _, _ = ppo_clipped_rkl(logp, old, ts["token_logprobs"])
    opd = (rkl * mask).sum() / mask.sum()
    opd.backward()
    assert s1["gate_frac"] == 0.0
    assert closed.item() == pytest.approx(opd.item(), abs=1e-6) and off.item() == pytest.approx(opd.item(), abs=1e-6)
    torch.testing.assert_close(x1.grad, x3.grad, atol=1e-7, rtol=1e-5)
    torch.testing.assert_close(x2.grad, x3.grad, atol=1e-7, rtol=1e-5)


def test_padding_rows_never_give_nan_or_inf():
    """Servers pad top-k rows with -inf log-probs (or 0 log-probs and id 0); neither may leak NaN/inf."""
    student, _, ids, old, ts, mask = _batch()
    t_ids, t_lp = ts["topk_ids"].clone(), ts["topk_logprobs"].clone()
    t_lp[0, 0] = -math.inf  # whole row of -inf padding at a valid position
    t_lp[1, 2, 3:] = -math.inf  # partial -inf padding
    t_lp[0, -1], t_ids[0, -1] = 0.0, 0  # zero padding at a masked position
    t_lp[2, 0], t_ids[2, 0] = 0.0, 0
    x = student.clone().requires_grad_(True)
    loss, stats = eopd_loss(x, ids, old, t_ids, t_lp, mask)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(x.grad).all()
    assert all(math.isfinite(v) for v in stats.values())


def test_all_masked_batch_gives_zero_loss_and_finite_gradients():
    student, _, ids, old, ts, mask = _batch()
    x = student.clone().requires_grad_(True)
    loss, stats = eopd_loss(x, ids, old, ts["topk_ids"], ts["topk_logprobs"], torch.zeros_like(mask))
    loss.backward()
    assert loss.item() == 0.0
    assert torch.isfinite(x.grad).all() and x.grad.abs().max().item() == 0.0
    assert stats["gate_frac"] == 0.0 and stats["n_tokens"] == 0.0


def test_teacher_ids_beyond_student_vocab_are_dropped_and_teacher_renormalised():
    """Padded-vocab pairs (teacher 152,064 vs student 151,936): ids >= V_student leave S_t."""
    student, _, ids, old, ts, mask = _batch(V=97, K=6)
    t_ids, t_lp = ts["topk_ids"].clone(), ts["topk_logprobs"].clone()
    t_ids[..., -1] = 97 + 5  # last top-k entry points into the teacher's padding rows
    x = student.clone().requires_grad_(True)
    loss, _ = eopd_loss(x, ids, old, t_ids, t_lp, mask, teacher_entropy=ts["entropy"],
                        teacher_token_logprobs=ts["token_logprobs"], entropy_threshold=0.0)
    loss.backward()
    x2 = student.clone().requires_grad_(True)  # the same with the entry removed (top-5)
    loss2, _ = eopd_loss(x2, ids, old, t_ids[..., :-1], t_lp[..., :-1], mask, teacher_entropy=ts["entropy"],
                         teacher_token_logprobs=ts["token_logprobs"], entropy_threshold=0.0)
    loss2.backward()
    assert loss.item() == pytest.approx(loss2.item(), abs=1e-6)
    torch.testing.assert_close(x.grad, x2.grad)


def test_bf16_inputs_agree_with_fp32():
    student, _, ids, old, ts, mask = _batch(V=301)
    tau = float(ts["entropy"][mask].median())
    out = {}
    for dtype in (torch.float32, torch.bfloat16):
        x = student.detach().to(dtype).clone().requires_grad_(True)
        loss, _ = eopd_loss(x, ids, old, ts["topk_ids"], ts["topk_logprobs"].to(dtype), mask,
                            teacher_entropy=ts["entropy"], teacher_token_logprobs=ts["token_logprobs"],
                            entropy_threshold=tau)
        loss.backward()
        out[dtype] = (loss.item(), x.grad.float())
    assert out[torch.bfloat16][0] == pytest.approx(out[torch.float32][0], rel=2e-2, abs=2e-2)
    torch.testing.assert_close(out[torch.bfloat16][1], out[torch.float32][1], atol=2e-3, rtol=5e-2)


def test_chunking_does_not_change_the_result():
    student, _, ids, old, ts, mask = _batch(V=97)
    res = []
    for chunk in (L.DEFAULT_CHUNK_BYTES, 97 * 4):  # one chunk vs one row per chunk
        x = student.clone().requires_grad_(True)
        loss, stats = eopd_loss(x, ids, old, ts["topk_ids"], ts["topk_logprobs"], mask, chunk_bytes=chunk)
        loss.backward()
        res.append((loss.item(), x.grad, stats))
    assert res[0][0] == pytest.approx(res[1][0], abs=1e-6)
    torch.testing.assert_close(res[0][1], res[1][1])


def test_stats_hold_the_design_metrics_with_correct_values():
    student, _, ids, old, ts, mask = _batch()
    tau = float(ts["entropy"][mask].median())
    _, stats = eopd_loss(student, ids, old, ts["topk_ids"], ts["topk_logprobs"], mask, entropy_threshold=tau)
    for key in ("teacher_entropy_mean", "gate_frac", "fkl_mean", "fkl_gated_mean", "rkl_mean", "student_entropy_mean",
                "student_entropy_gated_mean", "teacher_topk_mass_mean", "token_in_topk_frac",
                "teacher_entropy_lower_mean", "teacher_entropy_upper_mean"):
        assert key in stats and math.isfinite(stats[key]), key
    t_tok, in_topk = token_logprob_from_topk(ts["topk_ids"], ts["topk_logprobs"], ids, student.shape[-1])
    assert stats["rkl_mean"] == pytest.approx(float((old - t_tok)[mask].mean()), abs=1e-5)
    assert stats["token_in_topk_frac"] == pytest.approx(float(in_topk[mask].float().mean()), abs=1e-6)
    assert stats["teacher_topk_mass_mean"] == pytest.approx(float(ts["topk_logprobs"].exp().sum(-1)[mask].mean()), abs=1e-5)
    lo, hi = stats["teacher_entropy_lower_mean"], stats["teacher_entropy_upper_mean"]
    assert lo <= stats["teacher_entropy_mean"] <= hi
    assert lo <= float(ts["entropy"][mask].mean()) + 1e-4 and float(ts["entropy"][mask].mean()) <= hi + 1e-4


def test_eopd_loss_rejects_bad_shapes_and_values():
    student, _, ids, old, ts, mask = _batch()
    with pytest.raises(ValueError, match="old_log_probs"):
        eopd_loss(student, ids, old[:, :-1], ts["topk_ids"], ts["topk_logprobs"], mask)
    with pytest.raises(ValueError, match="gate"):
        eopd_loss(student, ids, old, ts["topk_ids"], ts["topk_logprobs"], mask, gate="sigmoid")
    with pytest.raises(ValueError, match="sampled_ids"):
        eopd_loss(student, ids + 1000, old, ts["topk_ids"], ts["topk_logprobs"], mask)
    bad = ts["token_logprobs"].clone()
    bad[0, 0] = -math.inf
    with pytest.raises(ValueError, match="teacher_token_logprobs"):
        eopd_loss(student, ids, old, ts["topk_ids"], ts["topk_logprobs"], mask, teacher_token_logprobs=bad)


def test_high_entropy_metrics_do_not_depend_on_the_gate():
    """fkl_high_entropy_mean / student_entropy_high_entropy_mean average over H_T > tau for any gate."""
    from verl_eopd import fkl_topk

    student, _, ids, old, ts, mask = _batch()
    tau = float(ts["entropy"][mask].median())
    kw = dict(teacher_entropy=ts["entropy"], teacher_token_logprobs=ts["token_logprobs"], entropy_threshold=tau)
    _, hard = eopd_loss(student, ids, old, ts["topk_ids"], ts["topk_logprobs"], mask, **kw)
    _, quant = eopd_loss(student, ids, old, ts["topk_ids"], ts["topk_logprobs"], mask, gate="quantile",
                         gate_quantile=0.1, **kw)
    _, opd = eopd_loss(student, ids, old, ts["topk_ids"], ts["topk_logprobs"], mask, fkl_coef=0.0, **kw)
    high = mask & (ts["entropy"] > tau)
    logits = student.reshape(-1, student.shape[-1]).double()
    index = ts["topk_ids"].reshape(-1, ts["topk_ids"].shape[-1])
    lq = torch.log_softmax(logits, -1).gather(-1, index).reshape(ts["topk_ids"].shape)
    fkl, _ = fkl_topk(lq, ts["topk_logprobs"].double(), torch.ones_like(lq, dtype=torch.bool))
    p = torch.softmax(logits, -1)
    h = -(p * torch.log_softmax(logits, -1)).sum(-1).reshape(ids.shape)
    for stats in (hard, quant, opd):
        assert stats["high_entropy_frac"] == pytest.approx(float(high.sum() / mask.sum()), abs=1e-6)
        assert stats["fkl_high_entropy_mean"] == pytest.approx(float(fkl[high].mean()), rel=1e-4)
        assert stats["student_entropy_high_entropy_mean"] == pytest.approx(float(h[high].mean()), rel=1e-4)
    assert quant["fkl_gated_mean"] != pytest.approx(hard["fkl_gated_mean"], rel=1e-3)  # the gated one does move


def test_nan_or_inf_logits_fail_loudly_naming_the_row():
    """A NaN (or +inf) logit anywhere in a row: the teacher pass and the student pass refuse, naming the row,
    instead of training on NaN; -inf logits (masked vocabulary) stay legal and give finite entropies."""
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 5, 40, generator=g)
    ids = torch.randint(0, 40, (2, 5), generator=g)
    masked = logits.clone()
    masked[..., 30:] = -math.inf  # legal: part of the vocabulary switched off
    ts = teacher_stats(masked, ids.clamp(max=29), 4)
    assert torch.isfinite(ts["entropy"]).all()
    ref = torch.softmax(masked.double(), -1)
    torch.testing.assert_close(ts["entropy"].double(), -(ref * ref.clamp_min(1e-300).log()).sum(-1), atol=1e-5, rtol=1e-5)
    for bad_value in (float("nan"), math.inf):
        bad = logits.clone()
        bad[1, 2, 7] = bad_value  # flattened row 1 * 5 + 2 = 7
        with pytest.raises(ValueError, match=r"teacher_logits holds NaN or \+inf logits at row 7"):
            teacher_stats(bad, ids, 4, chunk_bytes=2 * 40 * 4)  # several chunks: checked once, after the loop
        with pytest.raises(ValueError, match=r"student_logits holds NaN or \+inf logits at row 7"):
            student_logprobs_at(bad.requires_grad_(True), ids.unsqueeze(-1), with_entropy=True)
