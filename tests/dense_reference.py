"""Dense float64 references written straight from the paper's formulas (verl_eopd/core/objective.py docstring).

Deliberately naive: full-vocabulary log_softmax, no chunking, no custom autograd, no masking tricks.
"""

from __future__ import annotations

import math
from fractions import Fraction

import torch

from verl_eopd import EOPDSettings


def dense_teacher(teacher_logits: torch.Tensor, sampled_ids: torch.Tensor, k: int) -> dict:
    logp = torch.log_softmax(teacher_logits.double(), dim=-1)
    vals, ids = logp.topk(k, dim=-1)
    return {
        "topk_ids": ids,
        "topk_logprobs": vals,
        "entropy": -(logp.exp() * logp).sum(-1),
        "token_logprobs": logp.gather(-1, sampled_ids.unsqueeze(-1)).squeeze(-1),
    }


def dense_gate(teacher_entropy, mask, s: EOPDSettings):
    H = teacher_entropy.double()
    tau, quantile = s.entropy_threshold, s.gate_quantile
    if s.gate == "hard":
        g = (H > tau).double()
    elif s.gate == "soft":
        g = 1.0 / (1.0 + torch.exp(-(H - tau) / s.gate_temperature))
    else:  # quantile: the ceil(q n) largest entropies among valid tokens (ties included)
        vals = sorted(H[mask.bool()].tolist(), reverse=True)
        n = math.ceil(Fraction(str(quantile)) * len(vals))  # exact ceil(q n)
        cut = vals[n - 1] if n > 0 else float("inf")
        g = (H >= cut).double()
    return g * mask.double()


def dense_eopd_loss(
    student_logits, sampled_ids, old_log_probs, teacher_topk_ids, teacher_topk_logprobs, mask,
    teacher_entropy, teacher_token_logprobs, s: EOPDSettings,
):
    """L = (1/N) sum_t m_t [max(-r A, -clip(r) A) + alpha g FKL], all in float64. Returns (loss, per-token fkl)."""
    V = student_logits.shape[-1]
    logq = torch.log_softmax(student_logits.double(), dim=-1)
    ids = teacher_topk_ids.long()
    keep = ids < V  # teacher ids beyond the student's vocabulary (padding rows) leave the top-k set
    lq_topk = logq.gather(-1, torch.where(keep, ids, torch.zeros_like(ids)))
    p = teacher_topk_logprobs.double().exp() * keep
    p_tilde = p / p.sum(-1, keepdim=True)
    fkl = torch.where(keep, p_tilde * (p_tilde.log() - lq_topk), torch.zeros_like(p)).sum(-1)
    logp = logq.gather(-1, sampled_ids.long().unsqueeze(-1)).squeeze(-1)
    old = old_log_probs.double()
    A = teacher_token_logprobs.double() - old
    r = torch.exp(logp - old)
    rkl = torch.maximum(-r * A, -torch.clamp(r, 1 - s.clip_ratio_low, 1 + s.clip_ratio_high) * A)
    g = dense_gate(teacher_entropy, mask, s)
    m = mask.double()
    loss = ((rkl + s.fkl_coef * g * fkl) * m).sum() / m.sum().clamp_min(1)
    return loss, fkl


def dense_topk_entropy(topk_logprobs, vocab_size: int):
    """(midpoint, lower, upper) of the full-vocabulary entropy given only the top-k, row by row in Python floats,
    from the bounds' derivation (not from verl_eopd.core.topk): with top-k probabilities p_i (mass m, -inf =
    padding), tail mass r = 1 - m over n = V - k other tokens, each at most p_min,
        upper = H_K + r ln(n / r)                        (the tail spread evenly: the most entropy it can carry)
        lower = H_K + sum of -q ln q over the tail packed greedily into tokens of c = min(p_min, r) each
                (as many full tokens as fit, then the remainder): the least entropy it can carry.
    Returns three float64 tensors of topk_logprobs.shape[:-1]."""
    rows = topk_logprobs.double().reshape(-1, topk_logprobs.shape[-1]).tolist()
    lo, hi = [], []
    for row in rows:
        p = [math.exp(v) for v in row if math.isfinite(v)]
        h_k = -sum(x * math.log(x) for x in p if x > 0)
        r, n = max(1.0 - sum(p), 0.0), vocab_size - len(p)
        if r <= 0 or n <= 0:
            lo.append(h_k)
            hi.append(h_k)
            continue
        hi.append(h_k + r * math.log(n / r))
        c, left, tail = min(min(p), r), r, 0.0
        for _ in range(n):  # greedy packing, one token at a time (r <= n p_min: n tokens always suffice)
            if left <= 1e-15:
                break
            q = min(c, left)
            tail -= q * math.log(q)
            left -= q
        lo.append(h_k + min(tail, r * math.log(n / r)))
    shape = topk_logprobs.shape[:-1]
    lo_t = torch.tensor(lo, dtype=torch.float64).reshape(shape)
    hi_t = torch.tensor(hi, dtype=torch.float64).reshape(shape)
    return (lo_t + hi_t) / 2, lo_t, hi_t


def dense_topk_token_logprob(topk_ids, topk_logprobs, sampled_ids, vocab_size: int):
    """log pi_T(y_t) from the top-k alone, row by row: exact when y_t is a (finite) top-k entry, else the
    uniform-tail value min(ln(r / (V - k)), ln p_min). Returns a float64 tensor of sampled_ids.shape."""
    K = topk_ids.shape[-1]
    ids, lps = topk_ids.reshape(-1, K).tolist(), topk_logprobs.double().reshape(-1, K).tolist()
    ys = sampled_ids.reshape(-1).tolist()
    out = []
    for row_ids, row_lp, y in zip(ids, lps, ys):
        hit = [lp for i, lp in zip(row_ids, row_lp) if i == y and math.isfinite(lp)]
        if hit:
            out.append(hit[0])
            continue
        p = [math.exp(v) for v in row_lp if math.isfinite(v)]
        r = max(1.0 - sum(p), 1e-12)
        out.append(min(math.log(r / (vocab_size - len(p))), math.log(min(p))))
    return torch.tensor(out, dtype=torch.float64).reshape(sampled_ids.shape)
