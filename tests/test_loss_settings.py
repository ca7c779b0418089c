"""Promised loss behaviour (README "Config keys" and "Metrics", docs/topk_route.md), each against a float64 hand
computation on a case small enough to follow on paper:

* `entropy_estimator=lower|upper|midpoint` (top-k-only entropy, the server route) gates on the chosen bound;
* `teacher_vocab_size` enters the top-k estimates (the V - k tail) and so the loss;
* `actor/eopd/rkl_surrogate_mean` and `actor/eopd/pg_clipfrac` on a batch where the clip acts on some tokens;
* verl's `rollout_is_weights` multiply the reverse-KL (policy-gradient) term only, as verl's PPO losses do.
"""

from __future__ import annotations

import math
import types

import pytest
import torch

from verl_eopd import EOPDSettings, eopd_loss
from tolerances import (U32, U64, assert_within, fp32_loss_bound, fp32_mean_bound, gamma, log_softmax_rounding,
                        ppo_rkl_fp32_bound, topk_entropy_estimate_bound, topk_logprob_rounding)

pytestmark = pytest.mark.unit

# Two response tokens of one sequence, student vocabulary V = 20, teacher top-3.
#   token A: top-3 {0.4, 0.15, 0.1} at ids (3, 7, 11), sampled y = 7
#   token B: top-2 {0.45, 0.2} at ids (5, 9) and a -inf pad, sampled y = 9 (or 2, outside the top-k)
V = 20
TOPK_IDS = torch.tensor([[[3, 7, 11], [5, 9, 0]]])
TOPK_P = [[0.4, 0.15, 0.1], [0.45, 0.2]]
TOPK_LP = torch.log(torch.tensor([[[0.4, 0.15, 0.1], [0.45, 0.2, 0.0]]], dtype=torch.float64)).float()
LOGITS = torch.tensor([[[0.3 * ((7 * v + 3 * t) % 11) - 1.0 for v in range(V)] for t in range(2)]])
OLD_SHIFT = [0.1, -0.3]  # log pi_old = log pi_theta - shift: r = exp(shift) != 1


def _log_softmax(row):
    m = max(row)
    lse = m + math.log(sum(math.exp(z - m) for z in row))
    return [z - lse for z in row]


def _bounds(p, n_vocab):
    """(lower, upper) by hand: H_K plus the tail r over n = V - k tokens packed into tokens of c = min(p_min, r)
    (lower) or spread evenly (upper)."""
    h_k, r, n = -sum(x * math.log(x) for x in p), 1 - sum(p), n_vocab - len(p)
    c = min(min(p), r)
    # j = floor(r / c) in float64, no snapping to a near integer: where r / c lies within rounding (a few u64) of an
    # integer, floor takes j - 1 with rho ~ c or j with rho ~ 0, and the lower bound is continuous there (j h(c) +
    # h(c) = (j + 1) h(c) + h(0), h(x) = -x ln x), so either choice moves it by <= 2 h(4 u64) = 3.1e-14, far below the
    # fp32 bounds it is compared with (>= 7e-6); here r / c = 3.5 and 1.75 (rho = 0.05, 0.15)
    j = math.floor(r / c)
    rho = max(r - j * c, 0.0)
    return h_k - j * c * math.log(c) - (rho * math.log(rho) if rho > 0 else 0.0), h_k + r * math.log(n / r)


def _hand_loss(entropy, sampled, n_vocab, tau):
    """L = (1/2) sum_t [max(-r A, -clip(r, 0.8, 1.2) A) + 1[H_t > tau] FKL_t] in Python floats; returns (L, gates,
    bound): bound = fp32_loss_bound of eopd_loss's fp32 L against this float64 one (see _loss_bound)."""
    total, gates, lip, mag, old_max = 0.0, [], 0.0, 0.0, 0.0
    for t in range(2):
        logq = _log_softmax(LOGITS[0, t].double().tolist())
        p = TOPK_P[t]
        ids = TOPK_IDS[0, t].tolist()[:len(p)]
        pt = [x / sum(p) for x in p]
        fkl = sum(q * (math.log(q) - logq[i]) for q, i in zip(pt, ids))
        y = sampled[t]
        t_tok = math.log(p[ids.index(y)]) if y in ids else min(math.log((1 - sum(p)) / (n_vocab - len(p))),
                                                               math.log(min(p)))
        old = logq[y] - OLD_SHIFT[t]
        A, r = t_tok - old, math.exp(logq[y] - old)
        rkl = max(-r * A, -min(max(r, 0.8), 1.2) * A)
        g = 1.0 if entropy[t] > tau else 0.0
        gates.append(g)
        total += rkl + g * fkl
        # |dl/d inputs|: the RKL's r |A| (logp) + r (|A| + 1) (old) + r (t_tok); the gated FKL's 1 (log q, the p~
        # sum to 1) + 2 max |log p~ - log q| (the teacher's log-probs, through p~ and its renormalisation)
        gap = max(abs(math.log(q) - logq[i]) for q, i in zip(pt, ids))
        lip += 2 * r * (abs(A) + 1) + g * (1 + 2 * gap)
        mag += r * abs(A) + g * (math.log(len(p)) + max(abs(logq[i]) for i in ids))
        old_max = max(old_max, abs(old))
    # every log-prob input within eps of its exact value: the student's fp32 log-softmax (V = 20 terms), the
    # teacher's fp32 top-k log-probs and tail (worst token), log pi_old rounded once to fp32
    eps = (log_softmax_rounding(float(LOGITS.abs().max()), V)
           + max(topk_logprob_rounding(ps, n_vocab) for ps in TOPK_P) + U32 * old_max)
    bound = fp32_loss_bound(eps, lip / 2, mag / 2, tokens=2, k=3, sides=1)
    return total / 2, gates, bound


def _ours(sampled, **settings):
    ids = torch.tensor([sampled])
    logq = torch.log_softmax(LOGITS.double(), -1).gather(-1, ids[..., None]).squeeze(-1)
    old = (logq - torch.tensor([OLD_SHIFT], dtype=torch.float64)).float()
    loss, stats = eopd_loss(LOGITS, ids, old, TOPK_IDS, TOPK_LP, torch.ones(1, 2, dtype=torch.bool),
                            EOPDSettings(**settings))
    return loss.item(), stats


TAU = 1.85


def _entropy_bounds(n_vocab):
    """Per token, how far eopd_loss's fp32 top-k entropy estimates may lie from _bounds' float64 ones
    (topk_entropy_estimate_bound: 7e-6 .. 1e-5 here, from the fp32 top-k log-probs and the tail's cancellation)."""
    return [topk_entropy_estimate_bound(p, n_vocab, _bounds(p, n_vocab)[1]) for p in TOPK_P]


def test_entropy_estimator_gates_on_the_chosen_bound():
    """tau = 1.85 lies between A's lower bound and midpoint, and between B's midpoint and upper bound: `lower`
    gates neither token, `midpoint` gates A, `upper` gates both; each loss equals the hand computation."""
    (loA, hiA), (loB, hiB) = _bounds(TOPK_P[0], V), _bounds(TOPK_P[1], V)
    assert loA < TAU < (loA + hiA) / 2 and (loB + hiB) / 2 < TAU < hiB  # the case's premise
    estimates = {"lower": (loA, loB), "midpoint": ((loA + hiA) / 2, (loB + hiB) / 2), "upper": (hiA, hiB)}
    want_gates = {"lower": [0.0, 0.0], "midpoint": [1.0, 0.0], "upper": [1.0, 1.0]}
    losses = {}
    e_bound = _entropy_bounds(V)
    mean_bound = lambda vals: fp32_mean_bound(e_bound, torch.tensor(vals))  # noqa: E731
    for estimator, entropy in estimates.items():
        # the gates cannot flip by rounding: every estimate lies > 100x its derived bound from tau (margins >= 0.04)
        assert all(abs(h - TAU) > 100 * b for h, b in zip(entropy, e_bound))
        want, gates, bound = _hand_loss(entropy, [7, 9], V, TAU)
        assert gates == want_gates[estimator]
        got, stats = _ours([7, 9], entropy_estimator=estimator, entropy_threshold=TAU)
        # loss: fp32_loss_bound (3e-5 .. 7e-5; observed 4.6e-7 .. 7.3e-7); the estimators' losses differ by >= 0.6
        assert_within(torch.tensor(got), torch.tensor(want), bound, f"loss {estimator}")
        assert stats["gate_frac"] == sum(gates) / 2  # k/2, exact in fp32
        # entropy means: topk_entropy_estimate_bound per token + the mean's rounding (observed <= 1.9e-7)
        assert_within(torch.tensor(stats["teacher_entropy_mean"]), torch.tensor(sum(entropy) / 2),
                      mean_bound(list(entropy)), "teacher_entropy_mean")
        assert_within(torch.tensor(stats["teacher_entropy_lower_mean"]), torch.tensor((loA + loB) / 2),
                      mean_bound([loA, loB]), "teacher_entropy_lower_mean")
        assert_within(torch.tensor(stats["teacher_entropy_upper_mean"]), torch.tensor((hiA + hiB) / 2),
                      mean_bound([hiA, hiB]), "teacher_entropy_upper_mean")
        losses[estimator] = got
    assert len(set(losses.values())) == 3


def test_teacher_vocab_size_sets_the_tail_of_the_topk_estimates():
    """teacher_vocab_size = 40 (student V = 20): the tail spreads over 40 - k tokens. Token B's sampled id 2 lies
    outside the top-k, so its teacher log-prob is the uniform-tail min(ln(r / (40 - 2)), ln p_min); the upper
    bound (and the midpoint) grow, which opens A's gate at tau = 2.05. The loss equals the hand computation
    with 40 and differs from the default (the student's V)."""
    tau = 2.05
    results = {}
    for t_vocab in (None, 40):
        n_vocab = V if t_vocab is None else t_vocab
        (loA, hiA), (loB, hiB) = _bounds(TOPK_P[0], n_vocab), _bounds(TOPK_P[1], n_vocab)
        mids, e_bound = [(loA + hiA) / 2, (loB + hiB) / 2], _entropy_bounds(n_vocab)
        assert all(abs(h - tau) > 100 * b for h, b in zip(mids, e_bound))  # no gate flips by rounding
        want, gates, bound = _hand_loss(mids, [7, 2], n_vocab, tau)
        got, stats = _ours([7, 2], teacher_vocab_size=t_vocab, entropy_threshold=tau)
        # fp32_loss_bound (~3e-5), as in the estimator test; the two vocab sizes' losses differ by far more
        assert_within(torch.tensor(got), torch.tensor(want), bound, f"loss teacher_vocab_size={t_vocab}")
        assert_within(torch.tensor(stats["teacher_entropy_upper_mean"]), torch.tensor((hiA + hiB) / 2),
                      fp32_mean_bound(e_bound, torch.tensor([hiA, hiB])), "teacher_entropy_upper_mean")
        results[t_vocab] = (got, gates, bound)
    assert results[None][1] == [0.0, 0.0] and results[40][1] == [1.0, 0.0]
    # the tail's size moves the loss by far more than both sides' bounds (a statement of effect, not of rounding)
    assert abs(results[40][0] - results[None][0]) > 100 * (results[40][2] + results[None][2])


@pytest.mark.parametrize("estimator", ["lower", "midpoint", "upper"])
def test_the_server_routes_processor_uses_the_estimator_and_the_teacher_vocab_size(estimator):
    """The same case through verl's per-token path (`eopd_logits_processor`, top-k payload only): the teacher
    entropy it hands the loss is the chosen bound over teacher_vocab_size, the token log-prob the uniform tail."""
    from verl_eopd.integration.config import EOPDLossConfig
    from verl_eopd.integration.loss import eopd_logits_processor

    offsets = torch.tensor([0, 3])  # one sequence [x, y_A, y_B]: row 0 predicts y_A, row 1 y_B, row 2 is a dummy
    nested = lambda x: torch.nested.nested_tensor_from_jagged(x, offsets=offsets)  # noqa: E731
    data = {"input_ids": nested(torch.tensor([1, 7, 2])),
            "teacher_logprobs": nested(torch.cat([TOPK_LP[0], torch.zeros(1, 3)])),
            "teacher_ids": nested(torch.cat([TOPK_IDS[0], torch.zeros(1, 3, dtype=torch.long)]).int())}
    logits = torch.cat([LOGITS[0], torch.zeros(1, V)]).unsqueeze(0)
    cfg = types.SimpleNamespace(strategy="fsdp2")
    dcfg = types.SimpleNamespace(distillation_loss=EOPDLossConfig(topk=3, teacher_route="server",
                                                                  entropy_estimator=estimator, teacher_vocab_size=40))
    out = eopd_logits_processor(cfg, dcfg, data, logits)
    pick = {"lower": lambda lo, hi: lo, "upper": lambda lo, hi: hi, "midpoint": lambda lo, hi: (lo + hi) / 2}[estimator]
    want = [pick(*_bounds(p, 40)) for p in TOPK_P]
    # topk_entropy_estimate_bound per token (~1e-5; observed <= 2e-7)
    assert_within(out["eopd_teacher_entropy"][0, :2], torch.tensor(want), torch.tensor(_entropy_bounds(40)),
                  "eopd_teacher_entropy")
    # A's y = 7 is in the top-k: the payload's own fp32 value, gathered (exact); B's y = 2 takes the uniform tail
    # ln(0.35 / 38), within topk_logprob_rounding of the float64 value
    assert out["eopd_teacher_token_logprob"][0, 0].item() == TOPK_LP[0, 0, 1].item()
    assert_within(out["eopd_teacher_token_logprob"][0, 1], torch.tensor(math.log(0.35 / 38)),
                  topk_logprob_rounding(TOPK_P[1], 40), "tail token log-prob")
    assert out["eopd_token_fallback"][0, :2].tolist() == [0.0, 1.0]


# ------------------------------------------------------------------------------------------------ verl's loss call


def _verl_batch(rollout_is_weights=None):
    """Two sequences (prompts of 2 and 1 tokens, responses of 3 and 3), packed as verl's no-padding micro-batch.

    Per response token (log pi_theta - log pi_old, A = log pi_T - log pi_old), eps = 0.2:
      (0.3, +1.0) r = 1.35 > 1.2, A > 0: clipped, RKL = -1.2 A     (0.5, -0.5) r = 1.65, A < 0: not clipped, -r A
      (-0.4, -2.0) r = 0.67 < 0.8, A < 0: clipped, RKL = -0.8 A    (0.0, 0.7) r = 1: not clipped, -A
      (0.1, 0.2) not clipped (masked out)                          (-0.1, 0.4) not clipped, -r A
    """
    from tensordict import TensorDict

    P, R = [2, 1], [3, 3]
    shift = torch.tensor([[0.3, -0.4, 0.1], [0.5, 0.0, -0.1]], dtype=torch.float64)
    adv = torch.tensor([[1.0, -2.0, 0.2], [-0.5, 0.7, 0.4]], dtype=torch.float64)
    mask = torch.tensor([[1, 1, 0], [1, 1, 1]], dtype=torch.bool)
    t_ent = torch.tensor([[1.5, 0.2, 3.0], [0.9, 0.1, 2.0]])  # tau 0.8: gated = H > 0.8
    fkl = torch.tensor([[0.25, 0.5, 0.75], [1.5, 2.0, 0.125]])
    old = torch.tensor([[-1.0, -2.0, -0.5], [-1.5, -0.7, -3.0]], dtype=torch.float64)
    logp, t_tok = old + shift, old + adv

    def packed(resp_values, fill=0.0):  # [B, R] response values -> [nnz] rows, row j predicting token j + 1
        rows = []
        for b in range(2):
            seq = torch.full((P[b] + R[b],), fill, dtype=torch.float32)
            seq[P[b] - 1:P[b] - 1 + R[b]] = torch.as_tensor(resp_values[b], dtype=torch.float32)
            rows.append(seq)
        return torch.cat(rows)

    offsets = lambda lens: torch.tensor([0, *torch.tensor(lens).cumsum(0).tolist()])  # noqa: E731
    nested = lambda x, lens: torch.nested.nested_tensor_from_jagged(x, offsets=offsets(lens))  # noqa: E731
    seq_lens = [p + r for p, r in zip(P, R)]
    data = TensorDict({
        "prompts": nested(torch.ones(sum(P), dtype=torch.long), P),
        "responses": nested(torch.ones(sum(R), dtype=torch.long), R),
        "response_mask": mask.to(torch.int64), "old_log_probs": old.float(),
        "teacher_entropy": nested(packed(t_ent), seq_lens),
        "teacher_token_logprob": nested(packed(t_tok), seq_lens),
    }, batch_size=[2])
    if rollout_is_weights is not None:
        data["rollout_is_weights"] = rollout_is_weights
    model_output = {"eopd_fkl": packed(fkl).requires_grad_(True), "eopd_logp": packed(logp).requires_grad_(True),
                    "eopd_topk_mass": packed(torch.full((2, 3), 0.9)), "eopd_student_entropy": packed(torch.ones(2, 3))}
    return data, model_output, dict(logp=logp, old=old, adv=adv, mask=mask, t_ent=t_ent, fkl=fkl, shift=shift)


def _hand(h, w=None):
    """Per-token RKL (x w), clipped flags and the per-token loss w RKL + 1[H > 0.8] FKL, in float64."""
    r = h["shift"].exp()
    A = h["adv"]
    rkl = torch.maximum(-r * A, -r.clamp(0.8, 1.2) * A)
    clipped = (-r.clamp(0.8, 1.2) * A) > (-r * A)
    w = torch.ones_like(rkl) if w is None else w.double()
    g = (h["t_ent"] > 0.8).double()
    per_token = torch.where(h["mask"], w * rkl + g * h["fkl"].double(), 0.0)
    return w * rkl, clipped, per_token, g


def _token_bounds(h, w=None):
    """([2, 3] float64 bounds) the fp32 RKL term (ppo_rkl_fp32_bound: the batch's log-probs are fp32 roundings of
    the float64 ones) and the per-token loss w RKL + g FKL: plus the FKL's rounding to fp32 (u |FKL|; g is 0 or 1)
    and the addition (u (|w RKL| + |FKL|))."""
    logp, old = h["logp"], h["old"]
    rkl_bound = ppo_rkl_fp32_bound(logp, old, old + h["adv"], w)
    r, fkl = h["shift"].exp(), h["fkl"].double()
    wa = (torch.ones_like(r) if w is None else w.double()).abs() * torch.maximum(r, r.clamp(0.8, 1.2)) * h["adv"].abs()
    return rkl_bound, rkl_bound + U32 * fkl + U32 * (wa + fkl)


def _config():
    from verl_eopd.integration.config import EOPDLossConfig

    return types.SimpleNamespace(strategy="fsdp2"), types.SimpleNamespace(distillation_loss=EOPDLossConfig(topk=3))


def test_rkl_surrogate_mean_and_pg_clipfrac_by_hand():
    from verl_eopd.integration.loss import eopd_distillation_loss

    data, model_output, h = _verl_batch()
    rkl, clipped, per_token, _ = _hand(h)
    m = h["mask"]
    assert clipped[m].tolist() == [True, True, False, False, False]  # the clip acts on 2 of the 5 valid tokens
    loss, metrics = eopd_distillation_loss(*_config(), model_output, data)
    rkl_bound, tok_bound = _token_bounds(h)
    assert_within(loss.detach(), per_token, tok_bound, "per-token loss")  # bound <= 1.5e-6, observed 1.1e-7
    # by hand: RKL = (-1.2 * 1.0, -0.8 * -2.0, 0.5 e^0.5, -0.7, -0.4 e^-0.1) on the valid tokens (both float64:
    # the same values by two float64 routes, within a few u64 of each other)
    want_rkl = [-1.2, 1.6, 0.5 * math.exp(0.5), -0.7, -0.4 * math.exp(-0.1)]
    assert_within(rkl[m], torch.tensor(want_rkl, dtype=torch.float64), 8 * U64 * rkl[m].abs(), "hand RKL")
    # the mean over the 5 valid tokens: ppo_rkl_fp32_bound per token + gamma_5 mean|RKL| (~1e-6; observed 5.5e-8)
    assert_within(torch.tensor(metrics["eopd/rkl_surrogate_mean"]), torch.tensor(sum(want_rkl) / 5),
                  fp32_mean_bound(rkl_bound[m], rkl[m]), "rkl_surrogate_mean")
    # a boolean mean over 5 tokens: 2 / 5 rounded once to fp32 (the count is exact), compared exactly
    assert metrics["eopd/pg_clipfrac"] == torch.tensor(2 / 5, dtype=torch.float32).item()
    # mean of log pi_old - log pi_T: each input rounded (u |x|), the subtraction (u |A|), the 5-term mean
    # (gamma_5 mean |A|): ~2e-7, observed 3.2e-8
    a_bound = U32 * (h["old"].abs() + (h["old"] + h["adv"]).abs() + h["adv"].abs())
    assert_within(torch.tensor(metrics["eopd/rkl_mean"]), -h["adv"][m].mean(),
                  fp32_mean_bound(a_bound[m], h["adv"][m]), "rkl_mean")


def test_rollout_is_weights_scale_the_reverse_kl_term_only():
    """verl's rollout-correction weights w_t (data["rollout_is_weights"], nested per response as verl's v1 trainer
    writes them) multiply the PPO-clipped RKL term, as verl's own policy losses multiply their pg_losses; the
    gated FKL, a direct loss with no importance ratio, is not weighted: loss_t = w_t RKL_t + g_t FKL_t, and the
    gradients are w_t dRKL/dlogp and g_t."""
    from verl_eopd.integration.loss import eopd_distillation_loss

    w = torch.tensor([[0.5, 2.0, 3.0], [0.0, 1.5, 0.25]])
    w_nested = torch.nested.as_nested_tensor([w[0], w[1]], layout=torch.jagged)  # verl's response_to_nested
    data, model_output, h = _verl_batch(w_nested)
    rkl_w, _, per_token, g = _hand(h, w)
    loss, metrics = eopd_distillation_loss(*_config(), model_output, data)
    rkl_bound, tok_bound = _token_bounds(h, w)
    assert_within(loss.detach(), per_token, tok_bound, "per-token loss")  # bound <= 2.9e-6, observed 4.8e-8
    # ppo_rkl_fp32_bound per token + the 5-term mean (~2e-6; observed 5.7e-9)
    assert_within(torch.tensor(metrics["eopd/rkl_surrogate_mean"]), rkl_w[h["mask"]].mean(),
                  fp32_mean_bound(rkl_bound[h["mask"]], rkl_w[h["mask"]]), "rkl_surrogate_mean")
    (loss * h["mask"]).sum().backward()
    rows = torch.tensor([1, 2, 3, 5, 6, 7])  # the response rows of the packed batch (prompts of 2 and 1 tokens)
    grad_fkl = model_output["eopd_fkl"].grad[rows].reshape(2, 3).double()
    # the FKL's gradient: g, not w g; exact (products of 1 by the 0/1 mask and gate)
    assert torch.equal(grad_fkl, torch.where(h["mask"], g, 0.0))
    r = h["shift"].exp()
    unclipped = (-r.clamp(0.8, 1.2) * h["adv"]) <= (-r * h["adv"])
    grad_logp = model_output["eopd_logp"].grad[rows].reshape(2, 3).double()
    want = torch.where(h["mask"] & unclipped, -w.double() * r * h["adv"], 0.0)  # d(-w r A)/dlogp = -w r A
    # -w r A by the same fp32 roundings as the forward term: ppo_rkl_fp32_bound (<= 2.6e-6 per entry; observed
    # 4.8e-8); |w r A| >= 0.07 on the checked entries, so a dropped weight or sign is far outside it
    assert_within(grad_logp, want, torch.where(h["mask"] & unclipped, rkl_bound, 0.0), "d loss / d logp")
    data0, model_output0, _ = _verl_batch()  # no weights: the plain objective
    loss0, _ = eopd_distillation_loss(*_config(), model_output0, data0)
    # the weights' effect (>= 0.3 on some token) is far above both sides' bounds (<= 2.9e-6)
    assert float((loss0 - loss).abs().max()) > 1e4 * float(tok_bound.max())
