"""Entropy-Aware On-Policy Distillation (EOPD): the maths, in pure torch (no verl import).

Notation (DESIGN.md section 2, paper arXiv 2603.07079). The student pi_theta sampled y ~ pi_old; at a
response position t the context is c_t = (x, y_<t) and y_t is the sampled id. The teacher pi_T sees the
same ids.

    teacher entropy   H_t   = -sum_{v in V} pi_T(v|c_t) log pi_T(v|c_t)             (nats, temperature 1)
    advantage         A_t   = sg[ log pi_T(y_t|c_t) - log pi_old(y_t|c_t) ]
    ratio             r_t   = exp( log pi_theta(y_t|c_t) - log pi_old(y_t|c_t) )
    reverse-KL term   RKL_t = max( -r_t A_t , -clip(r_t, 1-eps_low, 1+eps_high) A_t )
    forward-KL term   FKL_t = sum_{i in S_t} p~_i (log p~_i - log q_i)
                      S_t = teacher top-k ids, p~_i = p_i / sum_{j in S_t} p_j (teacher renormalised),
                      log q_i = full-vocabulary student log-softmax at i (NOT renormalised)
    gate              g_t   = 1[H_t > tau]                    (hard, the paper; soft/quantile variants)
    objective         L     = (1/N) sum_t m_t [ RKL_t + alpha g_t FKL_t ],   N = sum_t m_t

Everything from the teacher, A_t, g_t and pi_old is detached; the gradient reaches the student through
r_t (sampled token) and through log q on the teacher's top-k (which touches every student logit through
the log-softmax normaliser). FKL_t >= KL(p~ || q~) >= 0 because q sums to at most 1 on S_t, so it needs
no clamping.

Memory: nothing here materialises an fp32 copy of a [tokens, V] tensor. Student and teacher logits are
visited in chunks of rows (`chunk_bytes` of fp32 per chunk, in buffers reused across chunks, through
torch's fused (log_)softmax kernels); the student side is a custom autograd function that saves nothing
but its inputs and recomputes the softmax chunk by chunk in the backward pass.
"""

from __future__ import annotations

import math
from typing import Optional

import torch

__all__ = [
    "GATES",
    "ENTROPY_ESTIMATORS",
    "DEFAULT_CHUNK_BYTES",
    "teacher_stats",
    "entropy_from_topk",
    "token_logprob_from_topk",
    "student_logprobs_at",
    "fkl_topk",
    "entropy_gate",
    "ppo_clipped_rkl",
    "eopd_token_losses",
    "eopd_stats",
    "eopd_loss",
]

GATES = ("hard", "soft", "quantile")
ENTROPY_ESTIMATORS = ("midpoint", "lower", "upper")
DEFAULT_CHUNK_BYTES = 64 * 2**20  # fp32 bytes of logits visited at once (~110 rows at V = 151,936)
_LOG_RATIO_CLAMP = 20.0  # same guard as verl's vanilla PPO loss: exp(+-20) stays finite in fp32
_TAIL_MASS_FLOOR = 1e-12  # smallest tail mass used by the outside-top-k token log-prob fallback


def _rows_per_chunk(vocab_size: int, chunk_bytes: int) -> int:
    if chunk_bytes <= 0:
        raise ValueError(f"chunk_bytes must be > 0, got {chunk_bytes}")
    return max(1, int(chunk_bytes) // (4 * int(vocab_size)))


def _xlogx(x: torch.Tensor) -> torch.Tensor:
    """x log x with 0 log 0 = 0."""
    return torch.special.xlogy(x, x)


def _entropy_from_logp(logp: torch.Tensor) -> torch.Tensor:
    """H = -sum_v p_v log p_v over the last dim of fp32 log-probs [n, V]; 0 log 0 = 0 (logits of -inf)."""
    p = logp.exp()
    return -(p * torch.where(p > 0, logp, torch.zeros_like(logp))).sum(-1)


class _ChunkBuffers:
    """fp32 work buffers of `rows` rows, reused for every chunk: fresh allocations of this size cost page
    faults on CPU and allocator churn on GPU. `zf` holds an fp32 copy of bf16/fp16 chunks."""

    def __init__(self, rows: int, V: int, device, dtype: torch.dtype, need_probs: bool):
        self.logp = torch.empty(rows, V, dtype=torch.float32, device=device)
        self.probs = torch.empty(rows, V, dtype=torch.float32, device=device) if need_probs else None
        self.zf = None if dtype == torch.float32 else torch.empty(rows, V, dtype=torch.float32, device=device)

    def fp32(self, z: torch.Tensor) -> torch.Tensor:
        """The chunk in fp32 (a view when it already is; one cheap cast copy otherwise)."""
        return z if self.zf is None else self.zf[: z.shape[0]].copy_(z)


_aten = torch.ops.aten


def _chunk_logp(z: torch.Tensor, buf: _ChunkBuffers, with_entropy: bool):
    """log_softmax of one chunk of logits z [n, V] in fp32, and optionally its entropy.

        log p = z - logsumexp(z),   H = -sum_v p_v log p_v
    Uses the fused (log_)softmax kernels writing into the reused buffers. Returns (log p [n, V] (a view of
    buf.logp, valid until the next chunk), H [n] fp32 or None).
    """
    n = z.shape[0]
    zf = buf.fp32(z)
    logp = _aten._log_softmax.out(zf, -1, False, out=buf.logp[:n])
    h = None
    if with_entropy:
        p = _aten._softmax.out(zf, -1, False, out=buf.probs[:n])
        h = -p.mul_(logp).sum(-1)  # in place: the probabilities are not needed afterwards
        if torch.isnan(h).any():  # logits of -inf: 0 * -inf; recompute with 0 log 0 = 0
            h = _entropy_from_logp(logp)
    return logp, h


# --------------------------------------------------------------------------------------------------
# Teacher side
# --------------------------------------------------------------------------------------------------


@torch.no_grad()
def teacher_stats(
    teacher_logits: torch.Tensor,
    sampled_ids: torch.Tensor,
    k: int,
    *,
    chunk_bytes: int = DEFAULT_CHUNK_BYTES,
) -> dict[str, torch.Tensor]:
    """Everything EOPD needs from the teacher, from its full logits at temperature 1.

    Args:
        teacher_logits: [B, T, V] (any float dtype; each chunk is computed in fp32). Row t predicts y_t.
        sampled_ids: [B, T] integer ids y_t in [0, V).
        k: size of the teacher top-k set S_t, 1 <= k <= V.
        chunk_bytes: fp32 bytes of logits processed at once; never more than one chunk is allocated.

    Returns a dict with
        topk_ids [B, T, K] int64, topk_logprobs [B, T, K] fp32 (full-vocabulary log-probs, descending),
        entropy [B, T] fp32 (exact, full vocabulary, nats), token_logprobs [B, T] fp32 (log pi_T(y_t)).
    """
    if teacher_logits.dim() < 2:
        raise ValueError(f"teacher_logits must be [..., V], got shape {tuple(teacher_logits.shape)}")
    V = teacher_logits.shape[-1]
    lead = teacher_logits.shape[:-1]
    if not (isinstance(k, int) and 1 <= k <= V):
        raise ValueError(f"k (teacher top-k) must be an int in [1, V={V}], got {k!r}")
    if tuple(sampled_ids.shape) != tuple(lead):
        raise ValueError(f"sampled_ids shape {tuple(sampled_ids.shape)} must equal teacher_logits.shape[:-1] {tuple(lead)}")
    flat = teacher_logits.reshape(-1, V)
    ids = sampled_ids.reshape(-1).long()
    if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= V):
        raise ValueError(f"sampled_ids must lie in [0, {V}); got range [{int(ids.min())}, {int(ids.max())}]")
    N, dev = flat.shape[0], flat.device
    topk_ids = torch.empty(N, k, dtype=torch.int64, device=dev)
    topk_lp = torch.empty(N, k, dtype=torch.float32, device=dev)
    entropy = torch.empty(N, dtype=torch.float32, device=dev)
    token_lp = torch.empty(N, dtype=torch.float32, device=dev)
    rows = _rows_per_chunk(V, chunk_bytes)
    buf = _ChunkBuffers(min(rows, N), V, dev, flat.dtype, need_probs=True) if N else None
    with torch.autocast(dev.type, enabled=False):
        for s in range(0, N, rows):
            e = min(s + rows, N)
            logp, entropy[s:e] = _chunk_logp(flat[s:e], buf, with_entropy=True)
            vals, idx = logp.topk(k, dim=-1)
            topk_ids[s:e], topk_lp[s:e] = idx, vals
            token_lp[s:e] = logp.gather(-1, ids[s:e, None]).squeeze(-1)
    return {
        "topk_ids": topk_ids.reshape(*lead, k),
        "topk_logprobs": topk_lp.reshape(*lead, k),
        "entropy": entropy.reshape(lead),
        "token_logprobs": token_lp.reshape(lead),
    }


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


def _valid_topk(topk_logprobs: torch.Tensor, topk_ids: Optional[torch.Tensor] = None, vocab_size: Optional[int] = None):
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
        valid = _valid_topk(topk_logprobs)
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
    topk_logprobs: torch.Tensor, vocab_size: int, estimator: str = "midpoint", valid: Optional[torch.Tensor] = None
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
        valid = _valid_topk(topk_logprobs, topk_ids)
    lp = topk_logprobs.float()
    match = valid & (topk_ids == token_ids.unsqueeze(-1))
    in_topk = match.any(-1)
    exact = torch.where(match, lp, torch.full_like(lp, -math.inf)).amax(-1)
    _, _, r, p_min, n_valid = _topk_summary(lp, valid)
    n_tail = (vocab_size - n_valid).clamp_min(1).to(torch.float32)
    fallback = torch.minimum(torch.log(r.clamp_min(_TAIL_MASS_FLOOR) / n_tail), torch.log(p_min))
    return torch.where(in_topk, exact, fallback), in_topk


# --------------------------------------------------------------------------------------------------
# Student side: full-vocabulary log-probs at a few ids per row, chunked, custom backward
# --------------------------------------------------------------------------------------------------


class _GatherLogSoftmax(torch.autograd.Function):
    """log_softmax(logits)[n, index[n, j]] for every row n, without a [N, V] fp32 tensor.

    forward:  out[n, j] = log softmax(z_n)[i_nj]
    backward: dz[n, v] = sum_j g[n, j] 1[v = i_nj] - softmax(z_n)_v sum_j g[n, j]
    Nothing of size [N, V] is saved: the softmax is recomputed chunk by chunk in backward (fp32 gradients
    are computed in place in the gradient tensor). The optional student entropy H_n is a detached
    by-product of the forward pass.
    """

    @staticmethod
    def forward(ctx, logits: torch.Tensor, index: torch.Tensor, rows: int, with_entropy: bool):
        N, V = logits.shape
        dev = logits.device
        out = torch.empty(N, index.shape[1], dtype=torch.float32, device=dev)
        ent = torch.empty(N if with_entropy else 0, dtype=torch.float32, device=dev)
        buf = _ChunkBuffers(min(rows, N), V, dev, logits.dtype, need_probs=with_entropy) if N else None
        with torch.autocast(dev.type, enabled=False):
            for s in range(0, N, rows):
                e = min(s + rows, N)
                logp, h = _chunk_logp(logits[s:e], buf, with_entropy)
                out[s:e] = logp.gather(-1, index[s:e])
                if with_entropy:
                    ent[s:e] = h
        ctx.save_for_backward(logits, index)
        ctx.rows = rows
        ctx.mark_non_differentiable(ent)
        return out, ent

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor, _grad_ent: Optional[torch.Tensor]):
        logits, index = ctx.saved_tensors
        grad = torch.empty_like(logits)
        N, V = logits.shape
        rows = ctx.rows
        fp32 = logits.dtype == torch.float32
        buf = _ChunkBuffers(min(rows, N), V, logits.device, logits.dtype, need_probs=not fp32) if N else None
        grad_out = grad_out.float()
        with torch.autocast(logits.device.type, enabled=False):
            for s in range(0, N, rows):
                e = min(s + rows, N)
                g = grad_out[s:e]
                target = grad[s:e] if fp32 else buf.probs[: e - s]  # fp32: softmax straight into the gradient
                d = _aten._softmax.out(buf.fp32(logits[s:e]), -1, False, out=target)
                d.mul_(-g.sum(-1, keepdim=True))
                d.scatter_add_(-1, index[s:e], g)
                if not fp32:
                    grad[s:e].copy_(d)
        return grad, None, None, None


def student_logprobs_at(
    student_logits: torch.Tensor,
    index: torch.Tensor,
    *,
    with_entropy: bool = False,
    chunk_bytes: int = DEFAULT_CHUNK_BYTES,
) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """Full-vocabulary student log-probs at `index`, differentiable, memory-lean.

    Args:
        student_logits: [..., V] (any float dtype; computed in fp32 per chunk, gradient in the input dtype).
        index: [..., M] int ids in [0, V) (e.g. the teacher's top-k plus the sampled id).
        with_entropy: also return the student's full-vocabulary entropy [...] (detached).
    Returns: (log q [..., M] fp32, entropy [...] fp32 or None).
    """
    V = student_logits.shape[-1]
    lead = student_logits.shape[:-1]
    if tuple(index.shape[:-1]) != tuple(lead):
        raise ValueError(f"index shape {tuple(index.shape)} does not match student_logits {tuple(student_logits.shape)}")
    flat = student_logits.reshape(-1, V)
    idx = index.reshape(flat.shape[0], -1).long()
    out, ent = _GatherLogSoftmax.apply(flat, idx, _rows_per_chunk(V, chunk_bytes), with_entropy)
    return out.reshape(*lead, idx.shape[-1]), (ent.reshape(lead) if with_entropy else None)


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
        valid = _valid_topk(tl)
    neg_inf = torch.full_like(tl, -math.inf)
    log_mass = torch.logsumexp(torch.where(valid, tl, neg_inf), dim=-1, keepdim=True)
    use = valid & torch.isfinite(log_mass)
    log_pt = torch.where(use, tl - log_mass, torch.zeros_like(tl))
    pt = torch.where(use, log_pt.exp(), torch.zeros_like(tl))
    lq = torch.where(use, student_topk_logprobs.float(), torch.zeros_like(tl))
    fkl = (pt * (log_pt - lq)).sum(-1)
    mass = torch.where(torch.isfinite(log_mass), log_mass.exp(), torch.zeros_like(log_mass)).squeeze(-1)
    return fkl, mass


# --------------------------------------------------------------------------------------------------
# Gate, reverse-KL surrogate, objective
# --------------------------------------------------------------------------------------------------


def entropy_gate(
    teacher_entropy: torch.Tensor,
    mask: torch.Tensor,
    *,
    gate: str = "hard",
    entropy_threshold: float = 0.8,
    gate_temperature: float = 0.1,
    gate_quantile: float = 0.2,
) -> torch.Tensor:
    """FKL weight g_t in [0, 1] per token (0 where mask is False); detached.

        hard:     g = 1[H > tau]                          (the paper, tau = 0.8 nats)
        soft:     g = sigmoid((H - tau) / gate_temperature)
        quantile: g = 1 for the ceil(q * n) highest-entropy valid tokens of the batch (q = gate_quantile,
                  ties at the cut are all gated), 0 otherwise; tau is not used.
    """
    H = teacher_entropy.detach().float()
    m = mask.bool()
    if gate == "hard":
        g = (H > entropy_threshold).float()
    elif gate == "soft":
        g = torch.sigmoid((H - entropy_threshold) / gate_temperature)
    elif gate == "quantile":
        vals = H[m]
        g = torch.zeros_like(H)
        n_gate = math.ceil(gate_quantile * vals.numel() - 1e-9)  # ceil(q n), robust to 0.1 * 30 = 3.0000000000000004
        if n_gate > 0:
            cut = vals.topk(n_gate).values[-1]
            g = (H >= cut).float()
    else:
        raise ValueError(f"gate must be one of {GATES}, got {gate!r}")
    return torch.where(m, g, torch.zeros_like(g))


def ppo_clipped_rkl(
    log_probs: torch.Tensor,
    old_log_probs: torch.Tensor,
    teacher_token_logprobs: torch.Tensor,
    *,
    clip_ratio_low: float = 0.2,
    clip_ratio_high: float = 0.2,
    clip_ratio_c: Optional[float] = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-token PPO-clipped reverse-KL surrogate (standard OPD).

        A = sg[log pi_T - log pi_old],  r = exp(clamp(log pi - log pi_old, -20, 20))
        RKL = max(-r A, -clip(r, 1 - eps_low, 1 + eps_high) A)
        with clip_ratio_c = c (dual clip, off in the paper; verl's vanilla PPO uses c = 3):
        RKL = min(RKL, -c A) where A < 0.

    Args: [...] tensors; log_probs carries the gradient. Returns (RKL [...], A [...], clipped [...] bool).
    """
    adv = (teacher_token_logprobs.float() - old_log_probs.float()).detach()
    log_ratio = (log_probs.float() - old_log_probs.float().detach()).clamp(-_LOG_RATIO_CLAMP, _LOG_RATIO_CLAMP)
    ratio = log_ratio.exp()
    l1 = -adv * ratio
    l2 = -adv * ratio.clamp(1.0 - clip_ratio_low, 1.0 + clip_ratio_high)
    loss = torch.maximum(l1, l2)
    clipped = l2 > l1
    if clip_ratio_c is not None:
        loss = torch.where(adv < 0, torch.minimum(loss, -adv * clip_ratio_c), loss)
    return loss, adv, clipped


def _masked_mean(x: torch.Tensor, w: torch.Tensor) -> float:
    den = w.sum()
    return float((torch.where(w > 0, x.float(), torch.zeros_like(x, dtype=torch.float32)) * w).sum() / den) if den > 0 else 0.0


def eopd_token_losses(
    student_token_logprobs: torch.Tensor,
    old_log_probs: torch.Tensor,
    teacher_token_logprobs: torch.Tensor,
    fkl: torch.Tensor,
    teacher_entropy: torch.Tensor,
    response_mask: torch.Tensor,
    *,
    entropy_threshold: float = 0.8,
    fkl_coef: float = 1.0,
    clip_ratio_low: float = 0.2,
    clip_ratio_high: float = 0.2,
    clip_ratio_c: Optional[float] = None,
    gate: str = "hard",
    gate_temperature: float = 0.1,
    gate_quantile: float = 0.2,
    rollout_is_weights: Optional[torch.Tensor] = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Per-token EOPD loss RKL_t * w_t + fkl_coef * g_t * FKL_t (0 outside the mask), all [B, T].

    `rollout_is_weights` (verl's rollout-correction importance weights) multiply the policy-gradient
    term only, as verl does for its PPO losses. Returns (loss [B, T], parts) where parts holds the
    per-token `rkl`, `adv`, `clipped`, `gate` and the bool `mask`.
    """
    m = response_mask.bool()
    zero = torch.zeros((), dtype=torch.float32, device=fkl.device)
    # Masked positions may hold padding garbage (-inf teacher log-probs, ...): neutralise before use.
    tlp = torch.where(m, teacher_token_logprobs.float(), zero)
    old = torch.where(m, old_log_probs.float(), zero)
    if not torch.isfinite(tlp).all():
        raise ValueError("teacher_token_logprobs holds non-finite values at response_mask positions")
    if not torch.isfinite(old).all():
        raise ValueError("old_log_probs holds non-finite values at response_mask positions")
    rkl, adv, clipped = ppo_clipped_rkl(
        torch.where(m, student_token_logprobs.float(), zero), old, tlp,
        clip_ratio_low=clip_ratio_low, clip_ratio_high=clip_ratio_high, clip_ratio_c=clip_ratio_c,
    )
    if rollout_is_weights is not None:
        rkl = rkl * rollout_is_weights.float().detach()
    g = entropy_gate(teacher_entropy, m, gate=gate, entropy_threshold=entropy_threshold,
                     gate_temperature=gate_temperature, gate_quantile=gate_quantile)
    per_token = rkl + fkl_coef * g * torch.where(m, fkl.float(), zero)
    per_token = torch.where(m, per_token, zero)
    return per_token, {"rkl": rkl, "adv": adv, "clipped": clipped, "gate": g, "mask": m}


def eopd_stats(
    parts: dict[str, torch.Tensor],
    *,
    fkl: torch.Tensor,
    teacher_entropy: torch.Tensor,
    old_log_probs: torch.Tensor,
    teacher_token_logprobs: torch.Tensor,
    teacher_topk_mass: Optional[torch.Tensor] = None,
    in_topk: Optional[torch.Tensor] = None,
    student_entropy: Optional[torch.Tensor] = None,
    teacher_entropy_bounds: Optional[tuple[torch.Tensor, torch.Tensor]] = None,
    token_fallback: Optional[torch.Tensor] = None,
    entropy_threshold: Optional[float] = None,
) -> dict[str, float]:
    """Diagnostics of DESIGN.md section 4 (token means over the mask; *_gated_mean weighted by the gate).

    With `entropy_threshold` (tau) also the gate-independent `*_high_entropy_mean`: means over the tokens
    whose teacher entropy exceeds tau, whatever gate trained the run (OPD, soft or quantile gates), so runs
    with different gates compare on the same tokens; `high_entropy_frac` is their share."""
    m, g = parts["mask"].float(), parts["gate"]
    with torch.no_grad():
        s = {
            "teacher_entropy_mean": _masked_mean(teacher_entropy, m),
            "gate_frac": _masked_mean(g, m),
            "fkl_mean": _masked_mean(fkl.detach(), m),
            "fkl_gated_mean": _masked_mean(fkl.detach(), g),
            # k1 estimate of KL(pi_old || pi_T) on the sampled tokens
            "rkl_mean": _masked_mean(old_log_probs.float() - teacher_token_logprobs.float(), m),
            "rkl_surrogate_mean": _masked_mean(parts["rkl"].detach(), m),
            "pg_clipfrac": _masked_mean(parts["clipped"].float(), m),
            "n_tokens": float(m.sum()),
        }
        if student_entropy is not None:
            s["student_entropy_mean"] = _masked_mean(student_entropy, m)
            s["student_entropy_gated_mean"] = _masked_mean(student_entropy, g)
        if teacher_topk_mass is not None:
            s["teacher_topk_mass_mean"] = _masked_mean(teacher_topk_mass, m)
        if in_topk is not None:
            s["token_in_topk_frac"] = _masked_mean(in_topk.float(), m)
        if entropy_threshold is not None:
            high = m * (teacher_entropy > entropy_threshold).float()
            s["high_entropy_frac"] = _masked_mean(high, m)
            s["fkl_high_entropy_mean"] = _masked_mean(fkl.detach(), high)
            if student_entropy is not None:
                s["student_entropy_high_entropy_mean"] = _masked_mean(student_entropy, high)
        if token_fallback is not None:  # sampled tokens whose teacher log-prob is the uniform-tail estimate
            s["teacher_token_fallback_frac"] = _masked_mean(token_fallback.float(), m)
        if teacher_entropy_bounds is not None:
            s["teacher_entropy_lower_mean"] = _masked_mean(teacher_entropy_bounds[0], m)
            s["teacher_entropy_upper_mean"] = _masked_mean(teacher_entropy_bounds[1], m)
    return s


def eopd_loss(
    student_logits: torch.Tensor,
    sampled_ids: torch.Tensor,
    old_log_probs: torch.Tensor,
    teacher_topk_ids: torch.Tensor,
    teacher_topk_logprobs: torch.Tensor,
    response_mask: torch.Tensor,
    *,
    teacher_entropy: Optional[torch.Tensor] = None,
    teacher_token_logprobs: Optional[torch.Tensor] = None,
    entropy_threshold: float = 0.8,
    fkl_coef: float = 1.0,
    clip_ratio_low: float = 0.2,
    clip_ratio_high: float = 0.2,
    clip_ratio_c: Optional[float] = None,
    gate: str = "hard",
    gate_temperature: float = 0.1,
    gate_quantile: float = 0.2,
    entropy_estimator: str = "midpoint",
    teacher_vocab_size: Optional[int] = None,
    rollout_is_weights: Optional[torch.Tensor] = None,
    with_student_entropy: bool = True,
    chunk_bytes: int = DEFAULT_CHUNK_BYTES,
) -> tuple[torch.Tensor, dict[str, float]]:
    """The EOPD objective L = (1/N) sum_t m_t [RKL_t + fkl_coef g_t FKL_t] (see the module docstring).

    Args:
        student_logits: [B, T, V] student logits at the response positions (row t predicts y_t), any float
            dtype; the gradient flows back into it.
        sampled_ids: [B, T] sampled ids y_t.
        old_log_probs: [B, T] log pi_old(y_t) (verl's recomputed `old_log_probs`).
        teacher_topk_ids, teacher_topk_logprobs: [B, T, K] teacher top-k ids and full-vocabulary log-probs.
            -inf log-probs are padding; ids outside [0, V_student) are dropped from S_t.
        response_mask: [B, T] valid response tokens (N = its sum; an all-False mask gives loss 0).
        teacher_entropy: [B, T] exact teacher entropy; None -> estimated from the top-k
            (`entropy_estimator`: "midpoint" of the bounds of `entropy_from_topk`, or "lower"/"upper").
        teacher_token_logprobs: [B, T] exact log pi_T(y_t); None -> recovered from the top-k (exact when y_t
            is in it, else the uniform-tail fallback of `token_logprob_from_topk`).
        entropy_threshold: tau in nats. fkl_coef: alpha (0 gives plain OPD).
        clip_ratio_low/high: PPO clip eps. clip_ratio_c: optional dual clip (None in the paper).
        gate: "hard" | "soft" | "quantile" (see `entropy_gate`).
        teacher_vocab_size: V of the teacher for the top-k estimates (default: the student's V).
        rollout_is_weights: optional [B, T] importance weights on the RKL term.
    Returns:
        (loss scalar, stats) with the diagnostics of `eopd_stats` plus `loss`, `rkl_loss`, `fkl_loss`.
    """
    if student_logits.dim() != 3:
        raise ValueError(f"student_logits must be [B, T, V], got {tuple(student_logits.shape)}")
    B, T, V = student_logits.shape
    for name, t in (("sampled_ids", sampled_ids), ("old_log_probs", old_log_probs), ("response_mask", response_mask)):
        if tuple(t.shape) != (B, T):
            raise ValueError(f"{name} must be [B, T] = {(B, T)}, got {tuple(t.shape)}")
    if teacher_topk_ids.shape != teacher_topk_logprobs.shape or tuple(teacher_topk_ids.shape[:2]) != (B, T):
        raise ValueError(
            f"teacher_topk_ids {tuple(teacher_topk_ids.shape)} and teacher_topk_logprobs "
            f"{tuple(teacher_topk_logprobs.shape)} must both be [B, T, K] with [B, T] = {(B, T)}"
        )
    if gate not in GATES:
        raise ValueError(f"gate must be one of {GATES}, got {gate!r}")
    if entropy_estimator not in ENTROPY_ESTIMATORS:
        raise ValueError(f"entropy_estimator must be one of {ENTROPY_ESTIMATORS}, got {entropy_estimator!r}")
    mask = response_mask.bool()
    ids = sampled_ids.long()
    if bool(((ids < 0) | (ids >= V))[mask].any()):
        raise ValueError(f"sampled_ids must lie in [0, V={V}) at response_mask positions")
    t_vocab = V if teacher_vocab_size is None else int(teacher_vocab_size)
    t_ids = teacher_topk_ids.long()
    valid = _valid_topk(teacher_topk_logprobs, t_ids, V)

    # Student: full-vocabulary log q at the teacher's top-k ids and at y_t, in one chunked pass.
    index = torch.cat([torch.where(valid, t_ids, torch.zeros_like(t_ids)), ids.clamp(0, V - 1).unsqueeze(-1)], dim=-1)
    lq, student_entropy = student_logprobs_at(student_logits, index, with_entropy=with_student_entropy,
                                              chunk_bytes=chunk_bytes)
    fkl, topk_mass = fkl_topk(lq[..., :-1], teacher_topk_logprobs, valid)
    student_lp = lq[..., -1]

    bounds = None
    if teacher_entropy is None:
        teacher_entropy, lo, hi = estimated_entropy(teacher_topk_logprobs, t_vocab, entropy_estimator,
                                                    _valid_topk(teacher_topk_logprobs, t_ids))
        bounds = (lo, hi)
    in_topk = None
    if teacher_token_logprobs is None:
        teacher_token_logprobs, in_topk = token_logprob_from_topk(t_ids, teacher_topk_logprobs, ids, t_vocab, valid)

    per_token, parts = eopd_token_losses(
        student_lp, old_log_probs, teacher_token_logprobs, fkl, teacher_entropy, mask,
        entropy_threshold=entropy_threshold, fkl_coef=fkl_coef, clip_ratio_low=clip_ratio_low,
        clip_ratio_high=clip_ratio_high, clip_ratio_c=clip_ratio_c, gate=gate, gate_temperature=gate_temperature,
        gate_quantile=gate_quantile, rollout_is_weights=rollout_is_weights,
    )
    n = mask.sum().clamp_min(1)
    loss = per_token.sum() / n
    stats = eopd_stats(parts, fkl=fkl, teacher_entropy=teacher_entropy, old_log_probs=old_log_probs,
                       teacher_token_logprobs=teacher_token_logprobs, teacher_topk_mass=topk_mass,
                       in_topk=in_topk, student_entropy=student_entropy, teacher_entropy_bounds=bounds,
                       entropy_threshold=entropy_threshold)
    stats["loss"] = float(loss.detach())
    stats["rkl_loss"] = float(parts["rkl"].detach().where(mask, 0.0).sum() / n)
    stats["fkl_loss"] = float((fkl_coef * parts["gate"] * fkl.detach().where(mask, 0.0)).sum() / n)
    return loss, stats
