"""What the teacher's top-k alone says: valid entries, entropy bounds, the sampled token's log-prob, and
the forward KL over the top-k (teacher renormalised, student at full-vocabulary log-probs).

    FKL_t = sum_{i in S_t} p~_i (log p~_i - log q_i),   p~_i = p_i / sum_{j in S_t} p_j
FKL_t >= KL(p~ || q~) >= 0 because q sums to at most 1 on S_t, so it needs no clamping.
"""

from __future__ import annotations

import math
from typing import Optional

import torch

from .settings import EntropyEstimator

__all__ = ["valid_topk", "entropy_from_topk", "estimated_entropy", "token_logprob_from_topk", "fkl_topk"]

_TAIL_MASS_FLOOR = 1e-12  # smallest tail mass used by the outside-top-k token log-prob fallback


def _xlogx(x: torch.Tensor) -> torch.Tensor:
    """x log x with 0 log 0 = 0."""
    return torch.special.xlogy(x, x)



def _topk_summary(topk_logprobs: torch.Tensor, valid: torch.Tensor):
    """Per-row pieces shared by the top-k entropy bounds and the token log-prob fallback.

    Returns p [.., K] (0 where invalid), mass m [..], tail mass r = max(1 - m, 0) [..] (float rounding
    can push m a hair above 1), smallest valid top-k probability p_min [..] (inf if none is valid),
    number of valid entries [..].
    """
    lp = topk_logprobs.float()
    p = torch.where(valid, lp.exp(), torch.zeros_like(lp))
    m = p.sum(-1)
    r = (1.0 - m).clamp_min(0.0)
    p_min = torch.where(valid, p, torch.full_like(p, math.inf)).amin(-1)
    return p, m, r, p_min, valid.sum(-1)


def valid_topk(topk_logprobs: torch.Tensor, topk_ids: Optional[torch.Tensor] = None, vocab_size: Optional[int] = None):
    """Valid top-k entries: finite log-prob (servers pad with -inf) and, given ids, 0 <= id < vocab_size.

    Ids >= the student's vocabulary come from teacher/student pairs whose embedding tables differ by
    padding (e.g. 152,064 vs 151,936): those rows of the teacher are padding, carry ~0 probability, and
    are dropped from S_t (the teacher is renormalised over the remaining entries).
    """
    valid = torch.isfinite(topk_logprobs)
    if topk_ids is not None:
        valid = valid & (topk_ids >= 0)
        if vocab_size is not None:
            valid = valid & (topk_ids < vocab_size)
    return valid


def entropy_from_topk(
    topk_logprobs: torch.Tensor, vocab_size: int, valid: Optional[torch.Tensor] = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Bounds on, and an estimate of, the full-vocabulary entropy from the teacher's top-k log-probs.

    With top-k probabilities p_1..p_K (full-vocabulary, so they sum to m <= 1), tail mass r = 1 - m spread
    over the n = V - K other tokens, each of which is at most p_min = min_k p_k (they are outside the
    top-k), write H_K = -sum_k p_k log p_k. Then H = H_K + H_tail with H_tail = -sum_tail q log q and:

      upper:  H_tail <= r log(n / r)                      (tail spread as thinly as possible: uniform)
      lower:  H_tail >= j c (-log c) + rho (-log rho)     (tail as concentrated as allowed: j = floor(r/c)
                                                          tokens at the cap c = min(p_min, r), remainder rho)
      estimate: the midpoint of the two, the value with the smallest worst-case error given only the top-k.

    Both bounds hold for any distribution whose k largest probabilities are the given ones (the lower one
    needs the entries to really be the top-k). Rows with no valid entry give [0, log V].

    Args:
        topk_logprobs: [..., K] full-vocabulary log-probs; -inf entries are padding.
        vocab_size: V, the size of the teacher's vocabulary.
        valid: optional [..., K] bool mask of entries to use (default: finite entries).
    Returns: (estimate, lower, upper), each [...] fp32 in nats.
    """
    K = topk_logprobs.shape[-1]
    if vocab_size < K:
        raise ValueError(f"vocab_size ({vocab_size}) must be >= the top-k width K ({K})")
    if valid is None:
        valid = valid_topk(topk_logprobs)
    lp = topk_logprobs.float()
    p, _, r, p_min, n_valid = _topk_summary(lp, valid)
    h_k = -torch.where(valid, p * lp, torch.zeros_like(p)).sum(-1)
    n_tail = (vocab_size - n_valid).to(torch.float32)
    has_tail = (r > 0) & (n_tail > 0)
    safe_r = torch.where(has_tail, r, torch.ones_like(r))
    upper_tail = torch.where(has_tail, safe_r * (torch.log(n_tail.clamp_min(1.0)) - torch.log(safe_r)), torch.zeros_like(r))
    cap = torch.minimum(p_min, safe_r)
    j = torch.floor(safe_r / cap)
    rho = (safe_r - j * cap).clamp_min(0.0)
    lower_tail = torch.where(has_tail, -(j * _xlogx(cap) + _xlogx(rho)), torch.zeros_like(r))
    lower_tail = torch.minimum(lower_tail, upper_tail)  # rounding only; mathematically lower <= upper
    lower, upper = h_k + lower_tail, h_k + upper_tail
    return 0.5 * (lower + upper), lower, upper


def estimated_entropy(
    topk_logprobs: torch.Tensor, vocab_size: int, estimator: EntropyEstimator = "midpoint", valid: Optional[torch.Tensor] = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(the entropy `estimator` picks: "midpoint" | "lower" | "upper", lower bound, upper bound), see
    `entropy_from_topk`."""
    est, lo, hi = entropy_from_topk(topk_logprobs, vocab_size, valid)
    return {"midpoint": est, "lower": lo, "upper": hi}[estimator], lo, hi


def token_logprob_from_topk(
    topk_ids: torch.Tensor,
    topk_logprobs: torch.Tensor,
    token_ids: torch.Tensor,
    vocab_size: int,
    valid: Optional[torch.Tensor] = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Teacher log-prob of the sampled token, recovered from the top-k.

    Exact when y_t is in S_t. Otherwise ("uniform tail" fallback) the tail mass r = 1 - sum_k p_k is taken
    as spread evenly over the V - K tokens outside S_t, capped at the smallest top-k probability (a token
    outside the top-k cannot be more likely than p_min):
        log pi_T(y_t) ~= min( log(max(r, 1e-12) / (V - K)), log p_min ).

    Args: topk_ids/topk_logprobs [..., K], token_ids [...], vocab_size V of the teacher.
    Returns: (log-prob [...] fp32, in_topk [...] bool).
    """
    if valid is None:
        valid = valid_topk(topk_logprobs, topk_ids)
    lp = topk_logprobs.float()
    match = valid & (topk_ids == token_ids.unsqueeze(-1))
    in_topk = match.any(-1)
    exact = torch.where(match, lp, torch.full_like(lp, -math.inf)).amax(-1)
    _, _, r, p_min, n_valid = _topk_summary(lp, valid)
    n_tail = (vocab_size - n_valid).clamp_min(1).to(torch.float32)
    fallback = torch.minimum(torch.log(r.clamp_min(_TAIL_MASS_FLOOR) / n_tail), torch.log(p_min))
    return torch.where(in_topk, exact, fallback), in_topk



def fkl_topk(
    student_topk_logprobs: torch.Tensor,
    teacher_topk_logprobs: torch.Tensor,
    valid: Optional[torch.Tensor] = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Forward KL over the teacher's top-k, teacher renormalised, student at full-vocabulary log-probs.

        FKL = sum_{i in S} p~_i (log p~_i - log q_i),   p~_i = p_i / sum_{j in S} p_j

    Invalid entries (padding, ids outside the student's vocabulary) are excluded from S before
    renormalising; a row with no valid entry has FKL 0.

    Args: student_topk_logprobs [..., K] (differentiable), teacher_topk_logprobs [..., K], valid [..., K].
    Returns: (FKL [...] fp32, teacher top-k mass sum_{i in S} p_i [...]).
    """
    tl = teacher_topk_logprobs.float().detach()
    if valid is None:
        valid = valid_topk(tl)
    neg_inf = torch.full_like(tl, -math.inf)
    log_mass = torch.logsumexp(torch.where(valid, tl, neg_inf), dim=-1, keepdim=True)
    use = valid & torch.isfinite(log_mass)
    log_pt = torch.where(use, tl - log_mass, torch.zeros_like(tl))
    pt = torch.where(use, log_pt.exp(), torch.zeros_like(tl))
    lq = torch.where(use, student_topk_logprobs.float(), torch.zeros_like(tl))
    fkl = (pt * (log_pt - lq)).sum(-1)
    mass = torch.where(torch.isfinite(log_mass), log_mass.exp(), torch.zeros_like(log_mass)).squeeze(-1)
    return fkl, mass

