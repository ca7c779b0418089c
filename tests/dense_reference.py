"""Dense float64 references written straight from the paper's formulas (DESIGN.md section 2).

Deliberately naive: full-vocabulary log_softmax, no chunking, no custom autograd, no masking tricks.
"""

from __future__ import annotations

import math
from fractions import Fraction

import torch


def dense_teacher(teacher_logits: torch.Tensor, sampled_ids: torch.Tensor, k: int) -> dict:
    logp = torch.log_softmax(teacher_logits.double(), dim=-1)
    vals, ids = logp.topk(k, dim=-1)
    return {
        "topk_ids": ids,
        "topk_logprobs": vals,
        "entropy": -(logp.exp() * logp).sum(-1),
        "token_logprobs": logp.gather(-1, sampled_ids.unsqueeze(-1)).squeeze(-1),
    }


def dense_gate(teacher_entropy, mask, gate="hard", tau=0.8, temperature=0.1, quantile=0.2):
    H = teacher_entropy.double()
    if gate == "hard":
        g = (H > tau).double()
    elif gate == "soft":
        g = 1.0 / (1.0 + torch.exp(-(H - tau) / temperature))
    else:  # quantile: the ceil(q n) largest entropies among valid tokens (ties included)
        vals = sorted(H[mask.bool()].tolist(), reverse=True)
        n = math.ceil(Fraction(str(quantile)) * len(vals))  # exact ceil(q n)
        cut = vals[n - 1] if n > 0 else float("inf")
        g = (H >= cut).double()
    return g * mask.double()


def dense_eopd_loss(
    student_logits, sampled_ids, old_log_probs, teacher_topk_ids, teacher_topk_logprobs, mask,
    teacher_entropy, teacher_token_logprobs, *, tau=0.8, fkl_coef=1.0, eps_low=0.2, eps_high=0.2,
    gate="hard", gate_temperature=0.1, gate_quantile=0.2,
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
    rkl = torch.maximum(-r * A, -torch.clamp(r, 1 - eps_low, 1 + eps_high) * A)
    g = dense_gate(teacher_entropy, mask, gate, tau, gate_temperature, gate_quantile)
    m = mask.double()
    loss = ((rkl + fkl_coef * g * fkl) * m).sum() / m.sum().clamp_min(1)
    return loss, fkl
