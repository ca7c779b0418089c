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
