"""Entropy-Aware On-Policy Distillation (EOPD): the objective, in pure torch (no verl import).

Notation (paper arXiv 2603.07079). The student pi_theta sampled y ~ pi_old; at a response position t the
context is c_t = (x, y_<t) and y_t is the sampled id. The teacher pi_T sees the same ids.

    teacher entropy   H_t   = -sum_{v in V} pi_T(v|c_t) log pi_T(v|c_t)             (nats, temperature 1)
    advantage         A_t   = sg[ log pi_T(y_t|c_t) - log pi_old(y_t|c_t) ]
    ratio             r_t   = exp( log pi_theta(y_t|c_t) - log pi_old(y_t|c_t) )
    reverse-KL term   RKL_t = max( -r_t A_t , -clip(r_t, 1-eps_low, 1+eps_high) A_t )
    forward-KL term   FKL_t = sum_{i in S_t} p~_i (log p~_i - log q_i)             (topk.fkl_topk)
                      S_t = teacher top-k ids, p~_i = p_i / sum_{j in S_t} p_j (teacher renormalised),
                      log q_i = full-vocabulary student log-softmax at i (NOT renormalised)
    gate              g_t   = 1[H_t > tau]                    (hard, the paper; soft/quantile variants)
    objective         L     = (1/N) sum_t m_t [ RKL_t + alpha g_t FKL_t ],   N = sum_t m_t

Everything from the teacher, A_t, g_t and pi_old is detached; the gradient reaches the student through
r_t (sampled token) and through log q on the teacher's top-k (which touches every student logit through
the log-softmax normaliser). The hyper-parameters (tau, alpha, eps, gate, ...) come from one
`EOPDSettings`; functions that take `settings` also accept its fields as keyword overrides.
"""

from __future__ import annotations

import math
from typing import Optional

import torch

from .kernels import HostChecks, host_checks, student_logprobs_at
from .settings import EOPDSettings, resolve_settings
from .topk import estimated_entropy, fkl_topk, token_logprob_from_topk, valid_topk

__all__ = ["entropy_gate", "ppo_clipped_rkl", "eopd_token_losses", "eopd_stats", "eopd_loss", "eopd_loss_from_hidden"]

_LOG_RATIO_CLAMP = 20.0  # same guard as verl's vanilla PPO loss: exp(+-20) stays finite in fp32


# --------------------------------------------------------------------------------------------------
# Gate, reverse-KL surrogate, objective
# --------------------------------------------------------------------------------------------------


def entropy_gate(
    teacher_entropy: torch.Tensor,
    mask: torch.Tensor,
    settings: Optional[EOPDSettings] = None,
    **overrides,
) -> torch.Tensor:
    """FKL weight g_t in [0, 1] per token (0 where mask is False); detached. Reads settings.gate and:

        hard:     g = 1[H > tau]                          (the paper, tau = entropy_threshold)
        soft:     g = sigmoid((H - tau) / gate_temperature)
        quantile: g = 1 for the ceil(q * n) highest-entropy valid tokens of the batch (q = gate_quantile,
                  ties at the cut are all gated), 0 otherwise; tau is not used.
    Args: teacher_entropy [...] nats, mask [...] bool.
    """
    s = resolve_settings(settings, overrides)
    H = teacher_entropy.detach().float()
    m = mask.bool()
    if s.gate == "hard":
        g = (H > s.entropy_threshold).float()
    elif s.gate == "soft":
        g = torch.sigmoid((H - s.entropy_threshold) / s.gate_temperature)
    else:  # quantile (EOPDSettings admits no other value); on the device, no host read
        # ceil(q n) in float64, as Python's math.ceil(q * n - 1e-9) (robust to 0.1 * 30 = 3.0000000000000004)
        n_gate = torch.ceil(s.gate_quantile * m.sum().double() - 1e-9).long()
        ranked = torch.where(m, H, torch.full_like(H, -math.inf)).reshape(-1).sort(descending=True).values
        at = (n_gate - 1).clamp(0, max(ranked.numel() - 1, 0)).reshape(1)
        cut = ranked.gather(0, at).squeeze(0) if ranked.numel() else H.new_zeros(())
        g = ((H >= cut) & (n_gate > 0)).float()
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


def _masked_mean(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """sum_t w_t x_t / sum_t w_t (x only where w > 0), 0 when sum_t w_t = 0: a 0-d fp32 tensor (no host read)."""
    w = w.float()
    den = w.sum()
    num = (torch.where(w > 0, x.float(), torch.zeros_like(x, dtype=torch.float32)) * w).sum()
    return torch.where(den > 0, num / torch.where(den > 0, den, torch.ones_like(den)), torch.zeros_like(num))


def _raiser(message: str):
    def fail():
        raise ValueError(message)
    return fail


def eopd_token_losses(
    student_token_logprobs: torch.Tensor,
    old_log_probs: torch.Tensor,
    teacher_token_logprobs: torch.Tensor,
    fkl: torch.Tensor,
    teacher_entropy: torch.Tensor,
    response_mask: torch.Tensor,
    settings: Optional[EOPDSettings] = None,
    *,
    rollout_is_weights: Optional[torch.Tensor] = None,
    **overrides,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Per-token EOPD loss RKL_t * w_t + fkl_coef * g_t * FKL_t (0 outside the mask), all [B, T].

    `rollout_is_weights` (verl's rollout-correction importance weights) multiply the policy-gradient
    term only, as verl does for its PPO losses. Returns (loss [B, T], parts) where parts holds the
    per-token `rkl`, `adv`, `clipped`, `gate` and the bool `mask`.
    """
    s = resolve_settings(settings, overrides)
    m = response_mask.bool()
    zero = torch.zeros((), dtype=torch.float32, device=fkl.device)
    # Masked positions may hold padding garbage (-inf teacher log-probs, ...): neutralise before use.
    tlp = torch.where(m, teacher_token_logprobs.float(), zero)
    old = torch.where(m, old_log_probs.float(), zero)
    with host_checks() as checks:  # one host read here, or none inside an enclosing pass (eopd_loss)
        checks.add(~torch.isfinite(tlp).all(), _raiser("teacher_token_logprobs holds non-finite values at "
                                                        "response_mask positions"),
                   "teacher_token_logprobs finite at response_mask positions")
        checks.add(~torch.isfinite(old).all(), _raiser("old_log_probs holds non-finite values at response_mask "
                                                        "positions"), "old_log_probs finite at response_mask positions")
    rkl, adv, clipped = ppo_clipped_rkl(
        torch.where(m, student_token_logprobs.float(), zero), old, tlp,
        clip_ratio_low=s.clip_ratio_low, clip_ratio_high=s.clip_ratio_high, clip_ratio_c=s.clip_ratio_c,
    )
    if rollout_is_weights is not None:
        rkl = rkl * rollout_is_weights.float().detach()
    g = entropy_gate(teacher_entropy, m, s)
    per_token = rkl + s.fkl_coef * g * torch.where(m, fkl.float(), zero)
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
    host: bool = True,
) -> dict:
    """Diagnostics logged under actor/eopd/ (token means over the mask; *_gated_mean weighted by the gate).

    With `entropy_threshold` (tau) also the gate-independent `*_high_entropy_mean`: means over the tokens
    whose teacher entropy exceeds tau, whatever gate trained the run (OPD, soft or quantile gates), so runs
    with different gates compare on the same tokens; `high_entropy_frac` is their share.

    host=True: floats, all read from the device in one transfer (one host sync); host=False: 0-d tensors that
    stay on the device (for a caller that reads them with its own values, e.g. `eopd_loss`)."""
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
            "n_tokens": m.sum(),
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
    if not host:
        return s
    return dict(zip(s, HostChecks().read(list(s.values()))))


def _check_inputs(checks: HostChecks, B: int, T: int, V: int, sampled_ids, old_log_probs, teacher_topk_ids,
                  teacher_topk_logprobs, response_mask) -> None:
    """Shapes (raised at once) and the sampled ids' range at the response positions (a flag in `checks`)."""
    for name, t in (("sampled_ids", sampled_ids), ("old_log_probs", old_log_probs), ("response_mask", response_mask)):
        if tuple(t.shape) != (B, T):
            raise ValueError(f"{name} must be [B, T] = {(B, T)}, got {tuple(t.shape)}")
    if teacher_topk_ids.shape != teacher_topk_logprobs.shape or tuple(teacher_topk_ids.shape[:2]) != (B, T):
        raise ValueError(
            f"teacher_topk_ids {tuple(teacher_topk_ids.shape)} and teacher_topk_logprobs "
            f"{tuple(teacher_topk_logprobs.shape)} must both be [B, T, K] with [B, T] = {(B, T)}"
        )
    ids = sampled_ids.long()
    checks.add((((ids < 0) | (ids >= V)) & response_mask.bool()).any(),
               _raiser(f"sampled_ids must lie in [0, V={V}) at response_mask positions"), f"sampled_ids in [0, {V})")


def _student_index(sampled_ids, teacher_topk_ids, teacher_topk_logprobs, V: int):
    """(index [B, T, K + 1]: the valid teacher top-k ids then y_t, valid [B, T, K]) for the student pass."""
    t_ids = teacher_topk_ids.long()
    valid = valid_topk(teacher_topk_logprobs, t_ids, V)
    ids = sampled_ids.long().clamp(0, V - 1).unsqueeze(-1)
    return torch.cat([torch.where(valid, t_ids, torch.zeros_like(t_ids)), ids], dim=-1), valid


def _objective(checks: HostChecks, lq, student_entropy, valid, V, sampled_ids, old_log_probs, teacher_topk_ids,
               teacher_topk_logprobs, response_mask, s: EOPDSettings, teacher_entropy, teacher_token_logprobs,
               rollout_is_weights):
    """Everything after the student pass: lq [B, T, K + 1] full-vocabulary student log-probs at the teacher's
    top-k ids and at y_t (differentiable), student_entropy [B, T] or None. Returns (loss, stats); the pass's
    checks and the stats are read from the device in one transfer (`checks.read`)."""
    mask = response_mask.bool()
    ids, t_ids = sampled_ids.long(), teacher_topk_ids.long()
    t_vocab = V if s.teacher_vocab_size is None else int(s.teacher_vocab_size)
    fkl, topk_mass = fkl_topk(lq[..., :-1], teacher_topk_logprobs, valid)
    student_lp = lq[..., -1]

    bounds = None
    if teacher_entropy is None:
        teacher_entropy, lo, hi = estimated_entropy(teacher_topk_logprobs, t_vocab, s.entropy_estimator,
                                                    valid_topk(teacher_topk_logprobs, t_ids))
        bounds = (lo, hi)
    in_topk = None
    if teacher_token_logprobs is None:
        teacher_token_logprobs, in_topk = token_logprob_from_topk(t_ids, teacher_topk_logprobs, ids, t_vocab, valid)

    per_token, parts = eopd_token_losses(student_lp, old_log_probs, teacher_token_logprobs, fkl, teacher_entropy,
                                         mask, s, rollout_is_weights=rollout_is_weights)
    n = mask.sum().clamp_min(1)
    loss = per_token.sum() / n
    stats = eopd_stats(parts, fkl=fkl, teacher_entropy=teacher_entropy, old_log_probs=old_log_probs,
                       teacher_token_logprobs=teacher_token_logprobs, teacher_topk_mass=topk_mass,
                       in_topk=in_topk, student_entropy=student_entropy, teacher_entropy_bounds=bounds,
                       entropy_threshold=s.entropy_threshold, host=False)
    stats["loss"] = loss.detach()
    stats["rkl_loss"] = parts["rkl"].detach().where(mask, 0.0).sum() / n
    stats["fkl_loss"] = (s.fkl_coef * parts["gate"] * fkl.detach().where(mask, 0.0)).sum() / n
    return loss, dict(zip(stats, checks.read(list(stats.values()))))


def eopd_loss(
    student_logits: torch.Tensor,
    sampled_ids: torch.Tensor,
    old_log_probs: torch.Tensor,
    teacher_topk_ids: torch.Tensor,
    teacher_topk_logprobs: torch.Tensor,
    response_mask: torch.Tensor,
    settings: Optional[EOPDSettings] = None,
    *,
    teacher_entropy: Optional[torch.Tensor] = None,
    teacher_token_logprobs: Optional[torch.Tensor] = None,
    rollout_is_weights: Optional[torch.Tensor] = None,
    with_student_entropy: bool = True,
    chunk_bytes: Optional[int] = None,
    **overrides,
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
        settings: the hyper-parameters (default: the paper's); keyword `overrides` are EOPDSettings fields
            (e.g. `fkl_coef=0.0` for OPD, `gate="quantile"`).
        teacher_entropy: [B, T] exact teacher entropy; None -> estimated from the top-k
            (settings.entropy_estimator over the bounds of `entropy_from_topk`).
        teacher_token_logprobs: [B, T] exact log pi_T(y_t); None -> recovered from the top-k (exact when y_t
            is in it, else the uniform-tail fallback of `token_logprob_from_topk`).
        rollout_is_weights: optional [B, T] importance weights on the RKL term.
        chunk_bytes: fp32 bytes of logits per chunk (default: settings.logits_chunk_mb MiB); a kernel knob
            that changes speed and memory, never the values.
    Returns:
        (loss scalar, stats) with the diagnostics of `eopd_stats` plus `loss`, `rkl_loss`, `fkl_loss`.
    """
    s = resolve_settings(settings, overrides)
    if student_logits.dim() != 3:
        raise ValueError(f"student_logits must be [B, T, V], got {tuple(student_logits.shape)}")
    B, T, V = student_logits.shape
    with host_checks() as checks:  # every check of the pass and the stats: one host read, at the end
        _check_inputs(checks, B, T, V, sampled_ids, old_log_probs, teacher_topk_ids, teacher_topk_logprobs,
                      response_mask)
        index, valid = _student_index(sampled_ids, teacher_topk_ids, teacher_topk_logprobs, V)
        # Student: full-vocabulary log q at the teacher's top-k ids and at y_t, in one chunked pass.
        lq, student_entropy = student_logprobs_at(student_logits, index, with_entropy=with_student_entropy,
                                                  chunk_bytes=chunk_bytes or s.chunk_bytes)
        return _objective(checks, lq, student_entropy, valid, V, sampled_ids, old_log_probs, teacher_topk_ids,
                          teacher_topk_logprobs, response_mask, s, teacher_entropy, teacher_token_logprobs,
                          rollout_is_weights)


def eopd_loss_from_hidden(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    sampled_ids: torch.Tensor,
    old_log_probs: torch.Tensor,
    teacher_topk_ids: torch.Tensor,
    teacher_topk_logprobs: torch.Tensor,
    response_mask: torch.Tensor,
    settings: Optional[EOPDSettings] = None,
    *,
    temperature: float = 1.0,
    teacher_entropy: Optional[torch.Tensor] = None,
    teacher_token_logprobs: Optional[torch.Tensor] = None,
    rollout_is_weights: Optional[torch.Tensor] = None,
    with_student_entropy: bool = True,
    chunk_bytes: Optional[int] = None,
    **overrides,
) -> tuple[torch.Tensor, dict[str, float]]:
    """`eopd_loss(hidden @ weight.T / temperature, ...)` without the [B, T, V] logits, forward or backward: the
    student's lm head runs one chunk of rows at a time and again in backward (kernels._HiddenGatherLogSoftmax).

    Args:
        hidden: [B, T, H] (or [1, N, H] packed) the student's last hidden states at the response positions
            (row t predicts y_t); the gradient flows back into it.
        weight: [V, H] the lm head (no bias), the dtype of `hidden`; receives its gradient (with tied
            embeddings the input embedding's other uses add theirs, as autograd does for any shared tensor).
        temperature: the logits are divided by it, as verl does before its losses (1 in the paper).
        The rest: as `eopd_loss`. Same value, gradients and stats as `eopd_loss` on the materialised logits.
    """
    from .kernels import _check_lm_head, student_logprobs_at_from_hidden

    s = resolve_settings(settings, overrides)
    if hidden.dim() != 3:
        raise ValueError(f"hidden must be [B, T, H], got {tuple(hidden.shape)}")
    _, V = _check_lm_head(hidden, weight, temperature)
    B, T, _ = hidden.shape
    with host_checks() as checks:  # as eopd_loss: one host read per pass
        _check_inputs(checks, B, T, V, sampled_ids, old_log_probs, teacher_topk_ids, teacher_topk_logprobs,
                      response_mask)
        index, valid = _student_index(sampled_ids, teacher_topk_ids, teacher_topk_logprobs, V)
        lq, student_entropy = student_logprobs_at_from_hidden(hidden, weight, index, temperature=temperature,
                                                              with_entropy=with_student_entropy,
                                                              chunk_bytes=chunk_bytes or s.chunk_bytes)
        return _objective(checks, lq, student_entropy, valid, V, sampled_ids, old_log_probs, teacher_topk_ids,
                          teacher_topk_logprobs, response_mask, s, teacher_entropy, teacher_token_logprobs,
                          rollout_is_weights)
