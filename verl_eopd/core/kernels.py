"""The chunked kernels: full-vocabulary (log-)softmax quantities without an fp32 [tokens, V] tensor.

Student and teacher logits are visited in chunks of rows (`chunk_bytes` of fp32 per chunk, in buffers
reused across chunks, through torch's fused (log_)softmax kernels). The student side is a custom autograd
function that saves nothing but its inputs and recomputes the softmax chunk by chunk in the backward pass.

    teacher_stats:        top-k ids and log-probs, exact entropy H = -sum_v p_v log p_v, log p(y)   (no grad)
    student_logprobs_at:  log softmax(z)[index] (differentiable) and, optionally, the entropy (detached)
The `*_from_hidden` twins take the last hidden states h [N, H] and the lm head W [V, H] instead of z = h W^T:
each chunk's logits are computed from h, used and dropped, and recomputed in backward (one extra lm-head
matmul), so no [N, V] tensor of any dtype exists, in the forward or the backward pass.
"""

from __future__ import annotations

from functools import partial
from typing import Optional

import torch

from .settings import DEFAULT_LOGITS_CHUNK_MB

__all__ = ["DEFAULT_CHUNK_BYTES", "teacher_stats", "teacher_stats_from_hidden", "student_logprobs_at",
           "student_logprobs_at_from_hidden"]

DEFAULT_CHUNK_BYTES = DEFAULT_LOGITS_CHUNK_MB * 2**20


def _rows_per_chunk(vocab_size: int, chunk_bytes: int) -> int:
    if chunk_bytes <= 0:
        raise ValueError(f"chunk_bytes must be > 0, got {chunk_bytes}")
    return max(1, int(chunk_bytes) // (4 * int(vocab_size)))



def _check_rows(name: str, first_col: torch.Tensor) -> None:
    """Raise naming the first row whose log-probs are NaN: a NaN or +inf logit makes its whole row NaN under
    log_softmax. One host sync per call (not per chunk): `first_col` [N] is any column of the row outputs."""
    bad = torch.isnan(first_col)
    if first_col.numel() and bool(bad.any()):
        j = int(bad.nonzero()[0, 0])
        raise ValueError(f"{name} holds NaN or +inf logits at row {j} (of {first_col.numel()} rows, flattened "
                         f"[..., V]; {int(bad.sum())} such rows): refusing to score or train on them. Fix: check the "
                         "model's forward pass (weights, dtype overflow) for that sequence")


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


def _chunk_logp(z: torch.Tensor, buf: _ChunkBuffers, with_entropy: bool, scratch: bool = False):
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
        # scratch: zf (a fresh chunk or the fp32 copy) is free after log_softmax, so p = exp(log p) goes there
        p = torch.exp(logp, out=zf) if scratch else _aten._softmax.out(zf, -1, False, out=buf.probs[:n])
        # in place (the probabilities are not needed afterwards); nansum: 0 log 0 = 0 where a logit is -inf
        # (0 * -inf is NaN). NaN rows from NaN/+inf logits are caught by the callers' _check_rows, once.
        h = -torch.nansum(p.mul_(logp), -1)
    return logp, h




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
    ids = _teacher_ids(sampled_ids, lead, V, k, "teacher_logits.shape[:-1]")
    flat = teacher_logits.reshape(-1, V)
    out = _teacher_rows(lambda s, e: flat[s:e], flat.shape[0], V, flat.device, flat.dtype, ids, k,
                        _rows_per_chunk(V, chunk_bytes), "teacher_logits")
    return {key: t.reshape(*lead, *t.shape[1:]) for key, t in out.items()}


def _teacher_ids(sampled_ids: torch.Tensor, lead, V: int, k: int, lead_name: str) -> torch.Tensor:
    """The teacher functions' checks of k and sampled_ids (shape `lead`, ids in [0, V)); returns the ids flat [N]."""
    if not (isinstance(k, int) and 1 <= k <= V):
        raise ValueError(f"k (teacher top-k) must be an int in [1, V={V}], got {k!r}")
    if tuple(sampled_ids.shape) != tuple(lead):
        raise ValueError(f"sampled_ids shape {tuple(sampled_ids.shape)} must equal {lead_name} {tuple(lead)}")
    ids = sampled_ids.reshape(-1).long()
    if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= V):
        raise ValueError(f"sampled_ids must lie in [0, {V}); got range [{int(ids.min())}, {int(ids.max())}]")
    return ids


def _teacher_rows(chunk, N: int, V: int, dev, dtype, ids: torch.Tensor, k: int, rows: int, name: str,
                  scratch: bool = False) -> dict:
    """teacher_stats over N rows whose logits [e - s, V] (dtype) come from `chunk(s, e)`, `rows` at a time: flat
    [N, ...] outputs. `scratch`: each chunk is a fresh tensor the kernel may overwrite (one buffer fewer)."""
    topk_ids = torch.empty(N, k, dtype=torch.int64, device=dev)
    topk_lp = torch.empty(N, k, dtype=torch.float32, device=dev)
    entropy = torch.empty(N, dtype=torch.float32, device=dev)
    token_lp = torch.empty(N, dtype=torch.float32, device=dev)
    buf = _ChunkBuffers(min(rows, N), V, dev, dtype, need_probs=not scratch) if N else None
    with torch.autocast(dev.type, enabled=False):
        for s in range(0, N, rows):
            e = min(s + rows, N)
            logp, entropy[s:e] = _chunk_logp(chunk(s, e), buf, with_entropy=True, scratch=scratch)
            vals, idx = logp.topk(k, dim=-1)
            topk_ids[s:e], topk_lp[s:e] = idx, vals
            token_lp[s:e] = logp.gather(-1, ids[s:e, None]).squeeze(-1)
    _check_rows(name, token_lp)
    return {"topk_ids": topk_ids, "topk_logprobs": topk_lp, "entropy": entropy, "token_logprobs": token_lp}


def _check_lm_head(hidden: torch.Tensor, weight: torch.Tensor, temperature: float) -> tuple[int, int]:
    """(H, V) of hidden [..., H] and an lm head weight [V, H] (no bias), or a ValueError naming the tensor."""
    if weight.dim() != 2:
        raise ValueError(f"weight (the lm head) must be [V, H], got {tuple(weight.shape)}")
    V, H = weight.shape
    if hidden.dim() < 2 or hidden.shape[-1] != H:
        raise ValueError(f"hidden must be [..., H] with H = weight.shape[1] = {H}, got {tuple(hidden.shape)}")
    if hidden.dtype != weight.dtype:
        raise ValueError(f"hidden ({hidden.dtype}) and weight ({weight.dtype}) must share a dtype (the lm head's)")
    if not (isinstance(temperature, (int, float)) and temperature > 0 and temperature != float("inf")):
        raise ValueError(f"temperature must be a finite number > 0, got {temperature!r}")
    return H, V


def _logits_chunk(hidden: torch.Tensor, weight: torch.Tensor, temperature: float, s: int, e: int) -> torch.Tensor:
    """Logits of rows s:e, as `(hidden @ weight.T) / temperature` computes them (matmul and division in the
    lm head's dtype)."""
    z = hidden[s:e] @ weight.T
    return z if temperature == 1.0 else z.div_(temperature)


@torch.no_grad()
def teacher_stats_from_hidden(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    sampled_ids: torch.Tensor,
    k: int,
    *,
    temperature: float = 1.0,
    chunk_bytes: int = DEFAULT_CHUNK_BYTES,
) -> dict[str, torch.Tensor]:
    """`teacher_stats(hidden @ weight.T / temperature, sampled_ids, k)` without the [..., V] logits: the lm head
    runs one chunk of rows at a time (`chunk_bytes` of fp32 logits).

    Args: hidden [..., H] (the teacher's last hidden states, row t predicts y_t), weight [V, H] (its lm head, no
    bias; same dtype), sampled_ids [...] in [0, V). Returns the dict of `teacher_stats`.
    """
    H, V = _check_lm_head(hidden, weight, temperature)
    lead = hidden.shape[:-1]
    ids = _teacher_ids(sampled_ids, lead, V, k, "hidden.shape[:-1]")
    flat = hidden.reshape(-1, H)
    out = _teacher_rows(partial(_logits_chunk, flat, weight, float(temperature)), flat.shape[0], V, flat.device,
                        flat.dtype, ids, k, _hidden_rows(V, chunk_bytes), "teacher logits (hidden @ weight.T)",
                        scratch=True)
    return {key: t.reshape(*lead, *t.shape[1:]) for key, t in out.items()}


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
        _check_rows("student_logits", out[:, 0] if out.shape[1] else out.new_zeros(0))
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



HIDDEN_MIN_ROWS = 256  # rows per lm-head chunk at least: a matmul over fewer rows re-reads W for little work


def _hidden_rows(V: int, chunk_bytes: int) -> int:
    """Rows per chunk of the hidden-state kernels: `chunk_bytes` of fp32 logits, but at least HIDDEN_MIN_ROWS."""
    return max(_rows_per_chunk(V, chunk_bytes), HIDDEN_MIN_ROWS)


def _logits_into(out: torch.Tensor, hidden: torch.Tensor, weight: torch.Tensor, temperature: float) -> torch.Tensor:
    """out [n, V] fp32 <- (hidden @ weight.T) / temperature, matmul and division in the lm head's dtype."""
    if hidden.dtype == torch.float32:
        torch.mm(hidden, weight.T, out=out)
        return out if temperature == 1.0 else out.div_(temperature)
    return out.copy_(_logits_chunk(hidden, weight, temperature, 0, hidden.shape[0]))


_IN_PLACE_SOFTMAX_OK: dict = {}  # device type -> whether aten's softmax may write over its input


def _softmax_in_place(z: torch.Tensor) -> torch.Tensor:
    """softmax(z) over the last dim, written over z (fp32). aten's fused softmax writes each element after reading
    the row's max and sum, so out=z is exact; that is not a documented contract, so it is checked once per device
    type against the out-of-place result, falling back to exp(z - logsumexp z) in place (3 passes instead of 1)."""
    ok = _IN_PLACE_SOFTMAX_OK.get(z.device.type)
    if ok is None:
        probe = torch.randn(2, max(z.shape[-1], 2), device=z.device) * 4
        want = torch.softmax(probe, -1)
        ok = bool(torch.equal(_aten._softmax.out(probe, -1, False, out=probe), want))
        _IN_PLACE_SOFTMAX_OK[z.device.type] = ok
    if ok:
        return _aten._softmax.out(z, -1, False, out=z)
    return z.sub_(torch.logsumexp(z, -1, keepdim=True)).exp_()


class _HiddenGatherLogSoftmax(torch.autograd.Function):
    """log_softmax(h_n W^T / T)[index[n, j]] for every row n, without the [N, V] logits.

    forward:  z_n = h_n W^T / T (one chunk of rows at a time), out[n, j] = log softmax(z_n)[i_nj]
    backward: z recomputed, p = softmax(z) in place, dz = (scatter(g) - p sum_j g) / T in the lm head's
              dtype, then dh[chunk] = dz W and dW += dz^T h[chunk] (dW accumulated chunk by chunk in W's dtype)
    Saved: hidden, weight, index. Work memory: two fp32 [rows, V] buffers in forward, one in backward (plus one
    [rows, V] in the lm head's dtype when it is not fp32).
    """

    @staticmethod
    def forward(ctx, hidden: torch.Tensor, weight: torch.Tensor, index: torch.Tensor, rows: int, with_entropy: bool,
                temperature: float):
        N, V = hidden.shape[0], weight.shape[0]
        dev = hidden.device
        out = torch.empty(N, index.shape[1], dtype=torch.float32, device=dev)
        ent = torch.empty(N if with_entropy else 0, dtype=torch.float32, device=dev)
        if N:
            zbuf = torch.empty(min(rows, N), V, dtype=torch.float32, device=dev)
            lbuf = torch.empty_like(zbuf)
        with torch.autocast(dev.type, enabled=False):
            for s in range(0, N, rows):
                e = min(s + rows, N)
                z = _logits_into(zbuf[: e - s], hidden[s:e], weight, temperature)
                logp = _aten._log_softmax.out(z, -1, False, out=lbuf[: e - s])
                out[s:e] = logp.gather(-1, index[s:e])
                if with_entropy:  # p log p in z's storage (z is not needed any more); nansum: 0 log 0 = 0
                    ent[s:e] = -torch.nansum(torch.exp(logp, out=z).mul_(logp), -1)
        _check_rows("student logits (hidden @ weight.T)", out[:, 0] if out.shape[1] else out.new_zeros(0))
        ctx.save_for_backward(hidden, weight, index)
        ctx.rows, ctx.temperature = rows, temperature
        ctx.mark_non_differentiable(ent)
        return out, ent

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor, _grad_ent: Optional[torch.Tensor]):
        hidden, weight, index = ctx.saved_tensors
        N, V = hidden.shape[0], weight.shape[0]
        rows, temperature = ctx.rows, ctx.temperature
        need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        grad_h = torch.empty_like(hidden) if need_h else None
        grad_w = torch.zeros_like(weight) if need_w else None
        fp32 = hidden.dtype == torch.float32
        if N:
            zbuf = torch.empty(min(rows, N), V, dtype=torch.float32, device=hidden.device)
            dz_buf = None if fp32 else torch.empty(min(rows, N), V, dtype=hidden.dtype, device=hidden.device)
        grad_out = grad_out.float()
        with torch.autocast(hidden.device.type, enabled=False):
            for s in range(0, N, rows):
                e = min(s + rows, N)
                g = grad_out[s:e]
                d = _softmax_in_place(_logits_into(zbuf[: e - s], hidden[s:e], weight, temperature))
                d.mul_(-g.sum(-1, keepdim=True))
                d.scatter_add_(-1, index[s:e], g)
                if temperature != 1.0:
                    d.div_(temperature)
                dz = d if fp32 else dz_buf[: e - s].copy_(d)  # the logits' gradient in their dtype
                if need_h:
                    torch.mm(dz, weight, out=grad_h[s:e])
                if need_w:
                    grad_w.addmm_(dz.T, hidden[s:e])
        return grad_h, grad_w, None, None, None, None


def student_logprobs_at_from_hidden(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    index: torch.Tensor,
    *,
    temperature: float = 1.0,
    with_entropy: bool = False,
    chunk_bytes: int = DEFAULT_CHUNK_BYTES,
) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """`student_logprobs_at(hidden @ weight.T / temperature, index)` without the [..., V] logits; the gradient
    reaches hidden [..., H] and weight [V, H] (a tied input embedding accumulates it as any other use does)."""
    H, V = _check_lm_head(hidden, weight, temperature)
    lead = hidden.shape[:-1]
    if tuple(index.shape[:-1]) != tuple(lead):
        raise ValueError(f"index shape {tuple(index.shape)} does not match hidden {tuple(hidden.shape)}")
    flat = hidden.reshape(-1, H)
    idx = index.reshape(flat.shape[0], -1).long()
    out, ent = _HiddenGatherLogSoftmax.apply(flat, weight, idx, _hidden_rows(V, chunk_bytes), with_entropy,
                                             float(temperature))
    return out.reshape(*lead, idx.shape[-1]), (ent.reshape(lead) if with_entropy else None)
