"""The EOPD maths against dense float64 references, on values and on gradients (no verl needed)."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tolerances import (
    U32,
    U64,
    assert_grads_close,
    assert_within,
    entropy_bound,
    fp32_loss_bound,
    fp32_mean_bound,
    gamma,
    log_softmax_bound,
    log_softmax_rounding,
    topk_entropy_bounds_error,
    topk_entropy_estimate_bound,
)
from dense_reference import dense_eopd_loss, dense_gate, dense_teacher, dense_topk_entropy, dense_topk_token_logprob
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

U_BF16 = 2.0**-8  # unit roundoff of bfloat16 (8 significant bits): |fl(x) - x| <= U_BF16 |x|
U_FP32 = 2.0**-24  # unit roundoff of float32


def _assert_within(got: torch.Tensor, ref: torch.Tensor, tol: torch.Tensor, what: str) -> None:
    """|got - ref| <= tol entry by entry (tol: a derived bound of the same shape), with the worst entry named."""
    err = (got.double() - ref).abs()
    ratio = torch.where(tol > 0, err / tol.clamp_min(1e-300), torch.where(err > 0, torch.inf, 0.0))
    w = int(ratio.reshape(-1).argmax())
    e, t, r = (v.reshape(-1)[w].abs().item() for v in (err, tol, ref))
    assert ratio.max() <= 1.0, f"{what}: entry {w} off by {e:.3e}, bound {t:.3e} (|ref| = {r:.3e})"


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
    # fp32 against float64 on the same logits (sides=1): log-probs within log_softmax_rounding (|z| <= 10.6, V = 97:
    # 1.1e-5), entropies within entropy_bound; observed 8.2e-7
    eps = log_softmax_rounding(float(teacher_logits.abs().max()), 97)
    for key in ("topk_logprobs", "entropy", "token_logprobs"):
        tol = entropy_bound(eps, ref[key], 97, sides=1) if key == "entropy" else eps
        assert_within(got[key], ref[key], tol, key)


def test_teacher_stats_bf16_input_computed_in_fp32():
    _, teacher_logits, ids, _, _, _ = _batch(V=257)
    t16 = teacher_logits.bfloat16()
    got = teacher_stats(t16, ids, 6, chunk_bytes=5 * 257 * 4)
    ref = dense_teacher(t16.double(), ids, 6)  # same bf16 values, exact maths
    # the same bf16 values on both sides, the kernel's maths in fp32: as above (V = 257); observed 7.2e-7
    eps = log_softmax_rounding(float(t16.double().abs().max()), 257)
    assert_within(got["entropy"], ref["entropy"], entropy_bound(eps, ref["entropy"], 257, sides=1), "entropy")
    assert_within(got["token_logprobs"], ref["token_logprobs"], eps, "token_logprobs")
    assert got["topk_logprobs"].dtype == torch.float32


def test_teacher_stats_handles_minus_inf_logits():
    logits = torch.randn(2, 3, 20)
    logits[..., 10:] = -math.inf  # a teacher that masks part of its vocabulary
    out = teacher_stats(logits, torch.zeros(2, 3, dtype=torch.long), 4)
    ref = dense_teacher(logits[..., :10], torch.zeros(2, 3, dtype=torch.long), 4)
    # fp32 over the 20 entries (the 10 masked ones add zeros) against float64 over the 10 finite ones; observed 2.0e-7
    eps = log_softmax_rounding(float(logits[..., :10].abs().max()), 20)
    assert_within(out["entropy"], ref["entropy"], entropy_bound(eps, ref["entropy"], 20, sides=1), "entropy")


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
    # lower <= H <= upper at the exact log-probs; the float64 side is within eps64 = log_softmax_rounding(u64) of them
    # (H within entropy_bound(u64)), and the kernel reads them rounded to fp32 (u |lp|) and computes in fp32, so its
    # bounds lie within topk_entropy_bounds_error (the small-tail term dr ln n + h(dr), dr ~ (k + 3) u, instead of a
    # relative error that grows as 1/r): bounds 4.1e-9 .. 5.5e-5 over 400 draws of these strategies, 1.2e-5 where
    # the tail is 5e-12 (zipf, scale 12, V = 400); observed lower - H and H - upper <= 2.4e-6 (where the bounds are
    # attained: K = V or a vanishing tail), at most 0.23 of the row's bound
    eps64 = log_softmax_rounding(float(logits.abs().max()), V, U64)
    d_lo, d_hi, _ = topk_entropy_bounds_error(topk, V, U32 * topk.abs() + eps64)
    b64 = entropy_bound(eps64, exact, V, sides=1, u=U64)
    assert (lo.double() <= exact + d_lo + b64).all(), (lo, exact, d_lo)
    assert (hi.double() >= exact - d_hi - b64).all(), (hi, exact, d_hi)
    assert ((lo <= est) & (est <= hi)).all()


def test_entropy_bounds_are_exact_when_topk_covers_the_vocabulary():
    logp = torch.log_softmax(torch.randn(5, 12, dtype=torch.float64), -1)
    exact = -(logp.exp() * logp).sum(-1)
    est, lo, hi = entropy_from_topk(logp, 12)
    # no tail: both bounds are H_K = -sum p log p in fp32 from the float64 log-probs rounded once (u |log p|):
    # entropy_bound over the 12 terms (3.3e-6), observed 2.8e-7
    bound = entropy_bound(U32 * float(logp.abs().max()), float(exact.max()), 12, sides=1)
    assert_within(lo, exact, bound, "lower")
    assert_within(hi, exact, bound, "upper")


def test_entropy_bounds_hand_computed_case():
    # top-2 = {0.5, 0.3}, tail r = 0.2 over V - K = 8 tokens, each <= 0.3:
    # H_K = -(0.5 ln 0.5 + 0.3 ln 0.3); upper adds 0.2 ln(8 / 0.2); lower: cap = min(0.3, 0.2) = 0.2 ->
    # one tail token of 0.2, adds -0.2 ln 0.2.
    topk = torch.log(torch.tensor([[0.5, 0.3]], dtype=torch.float64)).float()  # fl(log p): u |log p|
    est, lo, hi = entropy_from_topk(topk, 10)
    h_k = -(0.5 * math.log(0.5) + 0.3 * math.log(0.3))
    want_hi = h_k + 0.2 * math.log(8 / 0.2)
    bound = topk_entropy_estimate_bound([0.5, 0.3], 10, want_hi)  # 7.8e-6; observed 5.9e-8
    assert_within(lo, torch.tensor([h_k - 0.2 * math.log(0.2)]), bound, "lower")
    assert_within(hi, torch.tensor([want_hi]), bound, "upper")
    # the midpoint of the two fp32 values: one fp32 addition (x 0.5 is exact): u |est|; observed 0
    assert_within(est, (lo.double() + hi.double()) / 2, U32 * est.abs(), "midpoint")


def test_entropy_bounds_hand_computed_case_with_a_split_tail():
    """A tail that packs into several capped tokens and a remainder (j = 3, rho = 0.05), and a row with padding.

    Row 1: top-3 {0.4, 0.15, 0.1} of V = 20: tail r = 0.35 over n = 17 tokens, each <= p_min = 0.1.
      upper = H_K + 0.35 ln(17 / 0.35); lower = H_K - 3 (0.1 ln 0.1) - 0.05 ln 0.05 (three tokens of 0.1, one of
      0.05); the estimate is their midpoint. The exact entropy of two distributions with this top-3 (the
      extremes the bounds describe, and one in between) lies inside.
    Row 2: top-2 {0.45, 0.2} and a -inf pad: r = 0.35 over n = 18, cap 0.2: one token of 0.2 and one of 0.15."""
    h1 = -(0.4 * math.log(0.4) + 0.15 * math.log(0.15) + 0.1 * math.log(0.1))
    lo1, hi1 = h1 - 3 * 0.1 * math.log(0.1) - 0.05 * math.log(0.05), h1 + 0.35 * math.log(17 / 0.35)
    h2 = -(0.45 * math.log(0.45) + 0.2 * math.log(0.2))
    lo2, hi2 = h2 - 0.2 * math.log(0.2) - 0.15 * math.log(0.15), h2 + 0.35 * math.log(18 / 0.35)
    topk = torch.log(torch.tensor([[0.4, 0.15, 0.1], [0.45, 0.2, 0.0]], dtype=torch.float64))
    for estimator, want in (("midpoint", [(lo1 + hi1) / 2, (lo2 + hi2) / 2]), ("lower", [lo1, lo2]),
                            ("upper", [hi1, hi2])):
        got, lo, hi = L.estimated_entropy(topk, 20, estimator)
        # the kernel rounds the float64 top-k log-probs to fp32 (u |log p|): topk_entropy_estimate_bound per row
        # (7.3e-6, 9.0e-6; observed <= 2.4e-7); the estimators differ by >= 0.25
        bound = torch.tensor([topk_entropy_estimate_bound(p, 20, h) for p, h in
                              (([0.4, 0.15, 0.1], hi1), ([0.45, 0.2], hi2))])
        assert_within(got, torch.tensor(want), bound, estimator)
        assert_within(lo, torch.tensor([lo1, lo2]), bound, "lower")
        assert_within(hi, torch.tensor([hi1, hi2]), bound, "upper")

    def H(p):
        return -sum(x * math.log(x) for x in p if x > 0)

    packed = [0.4, 0.15, 0.1, 0.1, 0.1, 0.1, 0.05] + [0.0] * 13
    spread = [0.4, 0.15, 0.1] + [0.35 / 17] * 17
    between = [0.4, 0.15, 0.1, 0.1, 0.05] + [0.2 / 15] * 15
    # float64 on both sides: two orders of the same <= 20-term sums differ by <= 2 gamma_20(u64) x the sum of
    # |terms| (<= 3 here: H <= ln 20), ~1.3e-14; the sum of 20 masses lies within gamma_20(u64) of 1
    b64 = 2 * gamma(20, U64) * 3
    for dist in (packed, spread, between):
        assert abs(sum(dist) - 1.0) <= gamma(20, U64) and max(dist[3:]) <= 0.1
        assert lo1 - b64 <= H(dist) <= hi1 + b64
    assert abs(H(packed) - lo1) <= b64 and abs(H(spread) - hi1) <= b64  # both bounds are attained


def test_token_logprob_from_topk_exact_inside_fallback_outside():
    logp = torch.log_softmax(torch.randn(2, 50, dtype=torch.float64) * 3, -1)
    vals, ids = logp.topk(5, -1)
    inside = ids[:, 2]
    lp, in_topk = token_logprob_from_topk(ids, vals, inside, 50)
    assert in_topk.all()
    want = logp.gather(-1, inside[:, None]).squeeze(-1)  # the top-k value itself, rounded once to fp32 at most:
    assert_within(lp, want, U32 * want.abs(), "inside")  # u |log p|; observed 1.1e-7 at |log p| 3.1
    outside = logp.argmin(-1)
    lp, in_topk = token_logprob_from_topk(ids, vals, outside, 50)
    assert not in_topk.any()
    r = 1 - vals.exp().sum(-1)
    expected = torch.minimum(torch.log(r / 45), vals[:, -1])  # uniform tail, capped at p_min
    # in fp32: the tail mass r = 1 - sum of K exps (each 2u, the K-term sum gamma_K, the subtraction u) has relative
    # error ((gamma_K + 2u) m + u) / r (m the top-k mass); log(r / 45) adds the division and the log (3u |log|);
    # observed 2.5e-7
    m = vals.exp().sum(-1)
    assert_within(lp, expected, ((gamma(5) + 2 * U32) * m + U32) / r + 3 * U32 * expected.abs(), "outside")
    # capped at p_min = exp(fl32(log p_K)) in fp32: log(exp(x)) returns x within 2u (exp's relative error) + 2u |x|
    # (log's rounding), after x's own rounding u |x|: gamma_3 |log p_K| + gamma_2 (6.8e-7, 1.3e-6 here); observed
    # lp - log p_K = -2.3, -2.5 (the uniform tail lies below the cap in these rows)
    cap = gamma(3) * vals[:, -1].abs() + gamma(2)
    assert (lp.double() <= vals[:, -1] + cap).all()
    # a row where the cap binds (top-2 {0.3, 0.1} of V = 4: the tail's 0.6 over 2 tokens would exceed p_min): the
    # fallback is log p_min, within the same gamma_3 |log 0.1| + gamma_2 (5.3e-7); observed 3.2e-8
    top = torch.log(torch.tensor([[0.3, 0.1]], dtype=torch.float64))
    lp, in_topk = token_logprob_from_topk(torch.tensor([[0, 1]]), top, torch.tensor([3]), 4)
    assert not in_topk.any()
    assert_within(lp, top[:, -1], gamma(3) * top[:, -1].abs() + gamma(2), "capped")


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
    # against float64 on the same inputs (sides=1); the kernel works in fp32 for either dtype (a float64 x here holds
    # fp32 values, observed 1.9e-6 in both dtypes), so u = 2^-24: log-probs within
    # log_softmax_rounding (|z| <= 13: 2.6e-5 in fp32); the gradient w_k - p_v sum_k w_k per entry within
    # (2 u R + gamma_{V+K} + 4u) sum_k |w_k| (p_v + 1[v in idx]) (p_v's max-shift, exp, V-term sum and division;
    # the K-term scatter-add of duplicates); entropies within entropy_bound. Observed fp32 1.9e-6 (log-probs),
    # 1.7e-7 (grad), 3.7e-7 (entropy)
    u = U32
    zmax = float(x.detach().double().abs().max())
    eps = log_softmax_rounding(zmax, 97, u)
    assert_within(lq, ref.detach(), eps, "log-probs")
    logp = torch.log_softmax(xr.detach(), -1)
    in_idx = torch.zeros_like(logp).scatter_(-1, idx, 1.0)
    rng = 2 * zmax
    grad_tol = (2 * u * rng + gamma(97 + 7, u) + 4 * u) * w.abs().sum(-1, keepdim=True) * (logp.exp() + in_idx)
    assert_within(x.grad, xr.grad, grad_tol, "grad")
    dense_ent = -(logp.exp() * logp).sum(-1)
    assert_within(ent, dense_ent, entropy_bound(eps, dense_ent, 97, sides=1, u=u), "entropy")
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
    # the same bf16 values, the kernel's maths in fp32: log_softmax_rounding (|z| <= 10, V = 300: 2.3e-5); observed
    # 5.9e-7
    assert_within(lq16, torch.log_softmax(xr.detach(), -1).gather(-1, idx),
                  log_softmax_rounding(float(xr.detach().abs().max()), 300), "log-probs")
    # The kernel computes d_v = c_v - K p_v in fp32 (c_v: how often v is in idx; K = 5 = sum of the upstream
    # gradient, exact) and casts it to bf16 once. fp32 error: p_v through max-shift, exp, a V-term sum and a
    # division is within (V + 3) U_FP32 p_v relatively, the scale by K and the scatter-add one rounding each, so
    # |d32 - g| <= e32 = K p_v (V + 5) U_FP32; the bf16 cast adds U_BF16 |d32| <= U_BF16 (|g| + e32). Hence
    #     |g_bf16 - g| <= U_BF16 |g| + (1 + U_BF16) K p_v (V + 5) U_FP32,
    # relative to each entry (75% of the entries are below 1e-2, so an absolute 1e-2 could not see a wrong
    # softmax weight; this bound fails for a 1% change of any term).
    K, V = idx.shape[-1], x16.shape[-1]
    p = torch.softmax(xr.detach(), -1)
    tol = U_BF16 * xr.grad.abs() + (1 + U_BF16) * K * p * (V + 5) * U_FP32
    _assert_within(x16.grad, xr.grad, tol, "bf16 gradient of student_logprobs_at")


@HYP
@given(K=st.integers(1, 12), scale=st.floats(0.01, 20.0), tscale=st.floats(0.01, 20.0), seed=st.integers(0, 10_000))
def test_fkl_is_nonnegative(K, scale, tscale, seed):
    g = torch.Generator().manual_seed(seed)
    V = 64
    lq = torch.log_softmax(torch.randn(6, V, generator=g) * scale, -1)
    t_logits = torch.randn(6, V, generator=g) * tscale
    t_logp = torch.log_softmax(t_logits, -1)
    vals, ids = t_logp.topk(K, -1)
    fkl, mass = fkl_topk(lq.gather(-1, ids), vals)
    assert torch.isfinite(fkl).all()
    # float64 on the same fp32 inputs: log p~ = t - logsumexp(t), FKL = sum p~ (log p~ - lq) = KL(p~ || q / Q) - ln Q
    # >= -ln Q, Q = sum_S e^lq (<= 1 up to the student's fp32 log-softmax rounding).
    t, lqs = vals.double(), lq.gather(-1, ids).double()
    log_mass = torch.logsumexp(t, -1, keepdim=True)
    log_pt = t - log_mass
    pt, d = log_pt.exp(), log_pt - lqs
    # fkl_topk in fp32: logsumexp within dm = u (|log m| + max|t - max t| + 2 ln K + 2) + gamma_K (shift, exps, sum,
    # log, shift back); log p~ = t - log m within dm + u |log p~|, p~ = exp(.) relatively within that + 2u, the
    # difference log p~ - lq within that + u |d|, the product u, the K-term sum gamma_K:
    #     B = sum_i p~_i [(|d_i| + 1)(dm + u |log p~_i|) + 4u |d_i|] + gamma_K sum_i p~_i |d_i|
    # (first order; the float64 side's rounding, ~K u64 (1 + |d|), is far below B's 2u terms). B 5.2e-7 .. 4.9e-4
    # over 400 draws of these strategies (large where |log q| ~ 100 at scale 20); observed 2.2e-5, at most 0.21 of
    # the row's B; min FKL observed 9.0e-8
    u = U32
    dm = u * (log_mass.abs() + (t - t.amax(-1, keepdim=True)).abs().amax(-1, keepdim=True) + 2 * math.log(K) + 2) \
        + gamma(K)
    B = (pt * ((d.abs() + 1) * (dm + u * log_pt.abs()) + 4 * u * d.abs())).sum(-1) + gamma(K) * (pt * d.abs()).sum(-1)
    assert_within(fkl, (pt * d).sum(-1), B, "fkl")
    assert (fkl.double() >= -torch.logsumexp(lqs, -1) - B).all(), fkl.min()  # nonnegative up to ln Q and rounding
    # the teacher's top-k mass exp(log m) in fp32: relatively within dm + 2u; <= 1 up to the teacher's log-softmax
    m = log_mass.squeeze(-1).exp()
    assert (mass > 0).all()
    assert_within(mass, m, m * (dm.squeeze(-1) + 2 * u), "mass")
    assert (m <= math.exp(log_softmax_rounding(float(t_logits.abs().max()), V)) * (1 + gamma(K, U64))).all()


def test_fkl_renormalises_teacher_and_not_student():
    # inputs: the float64 logs rounded once to fp32 (u |log x|)
    t = torch.log(torch.tensor([[0.4, 0.2]], dtype=torch.float64)).float()  # teacher top-2 mass 0.6 -> p~ = (2/3, 1/3)
    q = torch.log(torch.tensor([[0.1, 0.3]], dtype=torch.float64)).float()  # student probs at those ids
    fkl, mass = fkl_topk(q, t)
    expected = (2 / 3) * math.log((2 / 3) / 0.1) + (1 / 3) * math.log((1 / 3) / 0.3)
    # FKL = sum p~ (log p~ - log q): log q within u max|log q|, log p~ = log p - log sum p within u max|log p| +
    # gamma_4 (the 2-term sum, the log); Lipschitz 1 in log q, 2 max|log p~ - log q| in log p; the 2-term sum's
    # rounding (fp32_loss_bound, one token): 3.4e-6, observed 1.5e-7; a p~ left unnormalised (x 0.6) moves FKL by 0.6
    eps = U32 * math.log(10) + gamma(4)
    gap = max(abs(math.log(2 / 3 / 0.1)), abs(math.log(1 / 3 / 0.3)))
    bound = fp32_loss_bound(eps, 1 + 2 * gap, math.log(2) + math.log(10), tokens=1, k=2, sides=1)
    assert_within(fkl, torch.tensor([expected]), bound, "fkl")
    # mass = sum exp(lp): each exp within u |log p| + 2u relative, the 2-term sum gamma_2: 2.0e-7, observed 2.4e-8
    assert_within(mass, torch.tensor([0.6]), 0.6 * (U32 * math.log(5) + 2 * U32 + gamma(2)), "mass")


# ------------------------------------------------------------------------------------------------ objective


def _loss_scales(student, ids, old, t_tok, mask, eps: float = 0.0, k: int = 6) -> tuple:
    """(lip, absolute): the EOPD loss's per-token constants in the log-probabilities, token-mean of r |A| + 1
    (r = exp(log q_y - old) from float64, moved by eps at most; the FKL's weights sum to 1), and the terms' absolute
    parts, lip + ln k + max |log q| (tests/tolerances.fp32_loss_bound)."""
    logq = torch.log_softmax(student.double(), -1)
    r = torch.exp(logq.gather(-1, ids[..., None]).squeeze(-1) - old.double() + eps)[mask]
    lip = float((r * (t_tok.double()[mask] - old.double()[mask]).abs() + 1.0).mean())
    return lip, lip + math.log(k) + float(logq[mask].abs().max())


def _ref_and_ours(gate="hard", tau=None, fkl_coef=1.0, exact_teacher=True, dtype=torch.float32, **kw):
    student, teacher_logits, ids, old, ts, mask = _batch(dtype=dtype, **kw)
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
    bounds = None
    if not exact_teacher:  # the reference uses what eopd_loss must use: top-k estimates, derived independently
        V = student.shape[-1]
        t_ent, lo, hi = dense_topk_entropy(ts["topk_logprobs"], V)
        bounds = {"teacher_entropy_mean": t_ent, "teacher_entropy_lower_mean": lo, "teacher_entropy_upper_mean": hi}
        # the bounds' formulas contain the exact entropy: both sides in float64 from the float64 log-softmax (within
        # eps64 = log_softmax_rounding(u64) of exact): the bounds within topk_entropy_bounds_error(eps64, u64), H
        # within entropy_bound(u64), the greedy packing's remainder (<= n subtractions) within h(n u64): 1.3e-12;
        # observed lower - H <= -0.011, H - upper <= -2.9e-5 (the upper bound nearly attained on one token)
        dense = dense_teacher(teacher_logits, ids, ts["topk_ids"].shape[-1])  # full distribution, float64
        exact, lp64 = dense["entropy"], dense["topk_logprobs"]
        _, lo64, hi64 = dense_topk_entropy(lp64, V)
        eps64 = log_softmax_rounding(float(teacher_logits.abs().max()), V, U64)
        d_lo, d_hi, _ = topk_entropy_bounds_error(lp64, V, eps64, U64)
        b64 = entropy_bound(eps64, exact, V, sides=1, u=U64) - V * U64 * math.log(V * U64)
        assert ((lo64 <= exact + d_lo + b64) & (exact <= hi64 + d_hi + b64)).all(), "the bounds must contain H"
        t_tok = dense_topk_token_logprob(ts["topk_ids"], ts["topk_logprobs"], ids, V)
    ref, ref_fkl = dense_eopd_loss(xr, ids, old, ts["topk_ids"], ts["topk_logprobs"], mask, t_ent, t_tok, s)
    ref.backward()
    return loss, stats, x.grad, ref, xr.grad, ts, mask, bounds


@pytest.mark.parametrize("gate", ["hard", "soft", "quantile"])
@pytest.mark.parametrize("exact_teacher", [True, False])
def test_eopd_loss_equals_dense_reference(gate, exact_teacher):
    loss, stats, grad, ref, ref_grad, ts, mask, bounds = _ref_and_ours(gate=gate, exact_teacher=exact_teacher)
    if bounds:  # top-k only: the estimate and both bounds, token-mean over the mask
        # the same fp32 top-k log-probs on both sides (eps = 0): the kernel's fp32 formulas within
        # topk_entropy_bounds_error(u32) of their values, the float64 reference's rounding within the same at u64
        # plus its greedy packing's remainder (h(n u64)), then the fp32 token mean (fp32_mean_bound). Bounds
        # 1.0e-5 / 9.5e-6 / 1.0e-5 (midpoint / lower / upper); observed 1.2e-7, 2.3e-7, 3.6e-9
        V = _batch()[0].shape[-1]
        lp = ts["topk_logprobs"].double()
        ours, ref64 = topk_entropy_bounds_error(lp, V, 0.0), topk_entropy_bounds_error(lp, V, 0.0, U64)
        h_greedy = -V * U64 * math.log(V * U64)
        for key, i in (("teacher_entropy_mean", 2), ("teacher_entropy_lower_mean", 0),
                       ("teacher_entropy_upper_mean", 1)):
            elem = (ours[i] + ref64[i] + h_greedy)[mask]
            assert_within(torch.tensor(float(stats[key])), bounds[key][mask].mean(),
                          fp32_mean_bound(elem, bounds[key][mask]), key)
    # fp32 against float64 on the same logits (sides=1): eps = log_softmax_rounding; the loss within fp32_loss_bound
    # (constants r |A| + fkl_coef from the float64 ratios; bound ~1e-4), observed 6.2e-7; gradients gamma_{T+V} T
    # max|g| (the logits are the leaves: no hidden size), observed 1.3e-7 at max|g| 0.96
    student, _, ids, old, _, _ = _batch()
    eps = log_softmax_rounding(float(student.abs().max()), student.shape[-1])
    logq = torch.log_softmax(student.double(), -1)
    r = torch.exp(logq.gather(-1, ids[..., None]).squeeze(-1) - old.double() + eps)[mask]
    t_tok = ts["token_logprobs"] if bounds is None else dense_topk_token_logprob(ts["topk_ids"], ts["topk_logprobs"], ids,
                                                                                  student.shape[-1])
    lip = r * (t_tok.double()[mask] - old.double()[mask]).abs() + 1.0
    absolute = float(lip.mean()) + math.log(6) + float(logq[mask].abs().max())
    tokens = int(mask.sum())
    loss_bound = fp32_loss_bound(eps, float(lip.mean()), absolute, tokens=tokens, k=6, sides=1)
    assert_within(loss.detach(), ref.detach(), loss_bound, "loss")
    assert_grads_close({"x": grad}, {"x": ref_grad}, tokens=student.shape[0] * student.shape[1], vocab=student.shape[-1],
                       hidden=0, sides=1)
    assert 0 < stats["gate_frac"] < 1
    # one mean of (rkl + fkl) against the sum of the two means: two T-term orders and an addition, 2 (gamma_T + u) x
    # the terms' absolute mean; observed 4.8e-7
    assert_within(torch.tensor(float(stats["loss"])), torch.tensor(float(stats["rkl_loss"]) + float(stats["fkl_loss"])),
                  2 * (gamma(tokens) + U32) * absolute, "loss = rkl_loss + fkl_loss")


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
    # two fp32 log-softmaxes of the same logits (the kernel's, torch's): eps = 2 log_softmax_rounding; the loss
    # (policy term only) within fp32_loss_bound on constants r |A|, the gradients within 2 gamma_{T+V} T max|g|.
    # Observed 0 (loss) and 7.5e-9 (grads, max|g| 0.96)
    eps = log_softmax_bound(float(student.abs().max()), student.shape[-1], sides=2)
    lip = float((torch.exp(logp.detach().double() - old.double() + eps) * (ts["token_logprobs"].double() - old.double()).abs())[mask].mean())
    loss_bound = fp32_loss_bound(eps, lip, lip, tokens=int(mask.sum()), k=6)
    assert_within(closed.detach(), opd.detach(), loss_bound, "closed")
    assert_within(off.detach(), opd.detach(), loss_bound, "off")
    n = student.shape[0] * student.shape[1]
    assert_grads_close({"x": x1.grad, "x2": x2.grad}, {"x": x3.grad, "x2": x3.grad}, tokens=n, vocab=student.shape[-1],
                       hidden=0)


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
    # the same logits and log-softmax on both sides; the K- and (K + 1)-term FKL sums and the T-token mean round in
    # other orders: 2 (gamma_{T+K+1} + 6u) x the terms' absolute mean; gradients 2 gamma_{T+V} T max|g|. Observed 0
    # (loss) and 0 (grads)
    _, absolute = _loss_scales(student, ids, old, ts["token_logprobs"], mask, k=7)
    assert_within(loss.detach(), loss2.detach(), fp32_loss_bound(0.0, 0.0, absolute, tokens=int(mask.sum()), k=7),
                  "loss")
    assert_grads_close({"x": x.grad}, {"x": x2.grad}, tokens=ids.numel(), vocab=student.shape[-1], hidden=0)


def test_bf16_inputs_match_the_float64_reference_within_the_bf16_bound():
    """bf16 student logits and teacher log-probs: loss and gradient against the float64 reference on the same
    bf16 values, within bounds derived from the roundings (so dropping the FKL term, or scaling a term by 1.1,
    fails)."""
    student, _, ids, old, ts, mask = _batch(V=301)
    B, T, V = student.shape
    K = ts["topk_ids"].shape[-1]
    s = EOPDSettings(entropy_threshold=float(ts["entropy"][mask].median()))
    x = student.detach().bfloat16().requires_grad_(True)
    t_lp = ts["topk_logprobs"].bfloat16()
    loss, stats = eopd_loss(x, ids, old, ts["topk_ids"], t_lp, mask, s, teacher_entropy=ts["entropy"],
                            teacher_token_logprobs=ts["token_logprobs"])
    loss.backward()
    assert x.grad.dtype == torch.bfloat16 and 0 < stats["gate_frac"] < 1
    xr = x.detach().double().requires_grad_(True)
    ref, _ = dense_eopd_loss(xr, ids, old, ts["topk_ids"], t_lp.double(), mask, ts["entropy"], ts["token_logprobs"], s)
    ref.backward()

    # Per token the loss backpropagates upstream gradients g_j into the K + 1 gathered student log-probs (the
    # FKL weights -alpha gate p~_j / N, the RKL's -A r / N or 0 where clipped), of total size at most
    # S_t = (alpha + |A_t| max(r_t, 1 + eps_high)) / N (0 on masked rows, whose gradient is exactly 0). Each
    # upstream weight is a few fp32 roundings (logsumexp over K, exp, products: <= (4K + 8) U_FP32 relative)
    # and the kernel's c_v - p_v sum_j g_j adds the softmax's (V + 5) U_FP32, so the fp32 gradient is within
    # e32 = (V + 4K + 16) U_FP32 S_t of the exact one, and the single bf16 cast adds U_BF16 |d32|:
    #     |g_bf16 - g| <= U_BF16 |g| + (1 + U_BF16) (V + 4K + 16) U_FP32 S_t.
    logq = torch.log_softmax(xr.detach(), -1)
    logp = logq.gather(-1, ids[..., None]).squeeze(-1)
    A = ts["token_logprobs"].double() - old.double()
    r = torch.exp(logp - old.double())
    N = mask.sum()
    S = torch.where(mask, (s.fkl_coef + A.abs() * r.clamp_min(1 + s.clip_ratio_high)) / N, torch.zeros_like(A))
    tol = U_BF16 * xr.grad.abs() + (1 + U_BF16) * (V + 4 * K + 16) * U_FP32 * S[..., None]
    _assert_within(x.grad, xr.grad, tol, "bf16 gradient of eopd_loss")
    # The loss: every per-token term is a sum of log-probs (each within (V + 3) U_FP32 (1 + L_t) of exact, L_t the
    # largest |log q| or |log p~| involved) weighted by at most S_t N, then a mean over N tokens (N U_FP32):
    #     |loss - ref| <= (V + N + 4K + 16) U_FP32 sum_t S_t (1 + L_t).
    lq_topk = logq.gather(-1, ts["topk_ids"])
    log_pt = t_lp.double() - torch.logsumexp(t_lp.double(), -1, keepdim=True)
    L_t = torch.cat([lq_topk, log_pt, logp[..., None]], -1).abs().amax(-1)
    bound = (V + N + 4 * K + 16) * U_FP32 * float((S * (1 + L_t)).sum())
    assert abs(loss.item() - ref.item()) <= bound, (loss.item(), ref.item(), bound)


def test_chunking_does_not_change_the_result():
    student, _, ids, old, ts, mask = _batch(V=97)
    res = []
    for chunk in (L.DEFAULT_CHUNK_BYTES, 97 * 4):  # one chunk vs one row per chunk
        x = student.clone().requires_grad_(True)
        loss, stats = eopd_loss(x, ids, old, ts["topk_ids"], ts["topk_logprobs"], mask, chunk_bytes=chunk)
        loss.backward()
        res.append((loss.item(), x.grad, stats))
    # row-wise the same ops in either chunking; the sums over tokens round in another order: 2 (gamma_{T+K} + 6u) x
    # the terms' absolute mean (loss); 2 gamma_{T+V} T max|g| (grads). Observed 0 and 0
    _, absolute = _loss_scales(student, ids, old, token_logprob_from_topk(ts["topk_ids"], ts["topk_logprobs"], ids,
                                                                          97)[0], mask)
    assert_within(torch.tensor(res[0][0]), torch.tensor(res[1][0]),
                  fp32_loss_bound(0.0, 0.0, absolute, tokens=int(mask.sum()), k=6), "loss")
    assert_grads_close({"x": res[0][1]}, {"x": res[1][1]}, tokens=ids.numel(), vocab=97, hidden=0)


def test_stats_hold_the_design_metrics_with_correct_values():
    student, teacher_logits, ids, old, ts, mask = _batch()
    tau = float(ts["entropy"][mask].median())
    _, stats = eopd_loss(student, ids, old, ts["topk_ids"], ts["topk_logprobs"], mask, entropy_threshold=tau)
    for key in ("teacher_entropy_mean", "gate_frac", "fkl_mean", "fkl_gated_mean", "rkl_mean", "student_entropy_mean",
                "student_entropy_gated_mean", "teacher_topk_mass_mean", "token_in_topk_frac",
                "teacher_entropy_lower_mean", "teacher_entropy_upper_mean"):
        assert key in stats and math.isfinite(stats[key]), key
    t_tok, in_topk = token_logprob_from_topk(ts["topk_ids"], ts["topk_logprobs"], ids, student.shape[-1])
    # fp32 means of the same per-token values in maybe other orders: 2 (gamma_T + u) mean |x| (T valid tokens); the
    # fraction: one division of the same integer count each (2u |x|); the top-k mass: K exps (2u) and K + T terms
    # summed, 2 (gamma_{K+T} + 2u) mean mass. Bounds about 4e-6, 6e-9, 1.5e-6; observed 1.2e-7, 0, 6.0e-8
    tokens = int(mask.sum())
    rkl_want = (old - t_tok)[mask]
    assert_within(torch.tensor(float(stats["rkl_mean"])), rkl_want.mean(),
                  2 * (gamma(tokens) + U32) * float(rkl_want.double().abs().mean()), "rkl_mean")
    frac = in_topk[mask].float().mean()
    assert_within(torch.tensor(float(stats["token_in_topk_frac"])), frac, 2 * U32 * float(frac), "token_in_topk_frac")
    mass = ts["topk_logprobs"].exp().sum(-1)[mask].mean()
    assert_within(torch.tensor(float(stats["teacher_topk_mass_mean"])), mass,
                  2 * (gamma(6 + tokens) + 2 * U32) * float(mass), "teacher_topk_mass_mean")
    lo, hi = stats["teacher_entropy_lower_mean"], stats["teacher_entropy_upper_mean"]
    assert lo <= stats["teacher_entropy_mean"] <= hi
    # the top-k bounds' token means contain the exact entropies' mean (float64, from dense_teacher), up to how far
    # the kernel's fp32 bounds move from their values at the exact log-probs: the inputs are teacher_stats' fp32
    # top-k log-probs, whose distance from the float64 ones is known here (their own check against
    # log_softmax_rounding is test_teacher_stats_equals_dense_reference's), plus the float64 side's eps64;
    # topk_entropy_bounds_error of that input error per token, then the fp32 token mean (fp32_mean_bound), and
    # the float64 mean of H (gamma_T(u64)). Bounds 1.1e-5 / 1.1e-5; observed lower - H = -0.37, H - upper = -0.22
    # (the containment has room here: this checks its sign, the formulas' own tightness is _ref_and_ours')
    V, tokens = student.shape[-1], int(mask.sum())
    dense = dense_teacher(teacher_logits, ids, 6)
    exact, lp64 = dense["entropy"], dense["topk_logprobs"]
    assert torch.equal(ts["topk_ids"], dense["topk_ids"])  # the same entries on both sides
    eps = (ts["topk_logprobs"].double() - lp64).abs() + log_softmax_rounding(float(teacher_logits.abs().max()), V, U64)
    d_lo, d_hi, _ = topk_entropy_bounds_error(lp64, V, eps)
    _, lo64, hi64 = dense_topk_entropy(lp64, V)
    h_mean = float(exact[mask].mean())
    assert lo <= h_mean + fp32_mean_bound(d_lo[mask], lo64[mask]) + gamma(tokens, U64) * h_mean
    assert h_mean <= hi + fp32_mean_bound(d_hi[mask], hi64[mask]) + gamma(tokens, U64) * h_mean


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
    # fp32 kernel against float64 (sides=1): the fraction one division (u); the FKL mean within fp32_loss_bound
    # (constant 1: the weights sum to 1; absolute parts ln K + max |log q|), the entropy mean within entropy_bound +
    # gamma_T ln V. Bounds 3.1e-5 (FKL) / 8.9e-5 (entropy) / 2.8e-8 (fraction); observed 4.8e-7, 2.3e-7, 0
    n_high = int(high.sum())
    eps = log_softmax_rounding(float(student.abs().max()), student.shape[-1])
    log_q = float(torch.log_softmax(logits, -1).abs().max())
    fkl_bound = fp32_loss_bound(eps, 1.0, math.log(6) + log_q, tokens=n_high, k=6, sides=1)
    lnv = math.log(student.shape[-1])
    ent_bound = entropy_bound(eps, lnv, student.shape[-1], sides=1) + gamma(n_high) * lnv
    for stats in (hard, quant, opd):
        frac = float(high.sum() / mask.sum())
        assert abs(stats["high_entropy_frac"] - frac) <= U32 * frac
        assert abs(stats["fkl_high_entropy_mean"] - float(fkl[high].mean())) <= fkl_bound
        assert abs(stats["student_entropy_high_entropy_mean"] - float(h[high].mean())) <= ent_bound
    # the gated one does move, by more than rounding could
    assert abs(quant["fkl_gated_mean"] - hard["fkl_gated_mean"]) > 2 * fkl_bound


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
    # fp32 over 40 entries (10 masked) against float64: entropy_bound on log_softmax_rounding; observed 3.9e-7
    dense_ent = -(ref * ref.clamp_min(1e-300).log()).sum(-1)
    eps = log_softmax_rounding(float(logits.abs().max()), 40)
    assert_within(ts["entropy"], dense_ent, entropy_bound(eps, dense_ent, 40, sides=1), "entropy")
    for bad_value in (float("nan"), math.inf):
        bad = logits.clone()
        bad[1, 2, 7] = bad_value  # flattened row 1 * 5 + 2 = 7
        with pytest.raises(ValueError, match=r"teacher_logits holds NaN or \+inf logits at row 7"):
            teacher_stats(bad, ids, 4, chunk_bytes=2 * 40 * 4)  # several chunks: checked once, after the loop
        with pytest.raises(ValueError, match=r"student_logits holds NaN or \+inf logits at row 7"):
            student_logprobs_at(bad.requires_grad_(True), ids.unsqueeze(-1), with_entropy=True)
