"""The chunked kernels: full-vocabulary (log-)softmax quantities without an fp32 [tokens, V] tensor.

Student and teacher logits are visited in chunks of rows (`chunk_bytes` of fp32 per chunk, in buffers
reused across chunks, through torch's fused (log_)softmax kernels). The student side is a custom autograd
function that saves nothing but its inputs and recomputes the softmax chunk by chunk in the backward pass.

    teacher_stats:        top-k ids and log-probs, exact entropy H = -sum_v p_v log p_v, log p(y)   (no grad)
    student_logprobs_at:  log softmax(z)[index] (differentiable) and, optionally, the entropy (detached)
The `*_from_hidden` twins take the last hidden states h [N, H] and the lm head W [V, H] instead of z = h W^T:
each chunk's logits are computed from h, used and dropped, and recomputed in backward (all but the last chunk,
which the forward leaves in the reused buffer: (k - 1)/k of one extra lm-head matmul for k chunks), so no
[N, V] tensor of any dtype exists, in the forward or the backward pass.
"""

from __future__ import annotations

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
    faults on CPU and allocator churn on GPU. `zf` holds an fp32 copy of bf16/fp16 chunks (then worked on in
    place); `logp` receives log p of fp32 chunks that must stay intact (allocated when `need_logp` and fp32)."""

    def __init__(self, rows: int, V: int, device, dtype: torch.dtype, need_logp: bool):
        fp32 = dtype == torch.float32
        self.logp = torch.empty(rows, V, dtype=torch.float32, device=device) if need_logp and fp32 else None
        self.zf = None if fp32 else torch.empty(rows, V, dtype=torch.float32, device=device)

    def fp32(self, z: torch.Tensor) -> torch.Tensor:
        """The chunk in fp32 (a view when it already is; one cheap cast copy otherwise)."""
        return z if self.zf is None else self.zf[: z.shape[0]].copy_(z)


_aten = torch.ops.aten


def _chunk_logp(z: torch.Tensor, buf: _ChunkBuffers, with_entropy: bool):
    """log_softmax of one chunk of logits z [n, V] in fp32, and optionally its entropy.

        log p = z - logsumexp(z),   H = -sum_v p_v log p_v
    Uses the fused log_softmax kernel, writing into buf.logp (z stays intact), or over the fp32 copy of a 16-bit
    chunk. Returns (log p [n, V], valid until the next chunk; H [n] fp32 or None).
    """
    zf = buf.fp32(z)
    if zf is not z:
        logp = _log_softmax_in_place(zf)
    else:
        logp = _aten._log_softmax.out(zf, -1, False, out=buf.logp[: z.shape[0]])
    return logp, (_entropy_of_logp(logp) if with_entropy else None)


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
    N, rows = flat.shape[0], _rows_per_chunk(V, chunk_bytes)
    buf = _ChunkBuffers(min(rows, N), V, flat.device, flat.dtype, need_logp=True) if N else None
    pieces = ((s, min(s + rows, N), _chunk_logp(flat[s:s + rows], buf, with_entropy=False)[0])
              for s in range(0, N, rows))
    out = _teacher_rows(pieces, N, flat.device, ids, k, "teacher_logits")
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


def _teacher_rows(pieces, N: int, dev, ids: torch.Tensor, k: int, name: str) -> dict:
    """teacher_stats over N rows from `pieces`, which yields (s, e, log p [e - s, V] fp32 of rows s:e, free to
    overwrite): flat [N, ...] outputs."""
    topk_ids = torch.empty(N, k, dtype=torch.int64, device=dev)
    topk_lp = torch.empty(N, k, dtype=torch.float32, device=dev)
    entropy = torch.empty(N, dtype=torch.float32, device=dev)
    token_lp = torch.empty(N, dtype=torch.float32, device=dev)
    with torch.autocast(dev.type, enabled=False):
        for s, e, logp in pieces:
            vals, idx = logp.topk(k, dim=-1)
            topk_ids[s:e], topk_lp[s:e] = idx, vals
            token_lp[s:e] = logp.gather(-1, ids[s:e, None]).squeeze(-1)
            entropy[s:e] = _entropy_of_logp(logp)
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
    N, rows = flat.shape[0], _hidden_rows(V, chunk_bytes, TEACHER_HIDDEN_MIN_ROWS)
    buf = _LmHeadChunk(min(rows, N), V, flat) if N else None

    def pieces():  # each piece's fp32 logits are overwritten with their log p
        for s in range(0, N, rows):
            z = buf.logits(flat[s:s + rows], weight, float(temperature))
            for a, b, zf in buf.fp32_pieces(z):
                yield s + a, s + b, _log_softmax_in_place(zf)

    out = _teacher_rows(pieces(), N, flat.device, ids, k, "teacher logits (hidden @ weight.T)")
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
        buf = _ChunkBuffers(min(rows, N), V, dev, logits.dtype, need_logp=True) if N else None
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
        buf = _ChunkBuffers(min(rows, N), V, logits.device, logits.dtype, need_logp=False) if N else None
        grad_out = grad_out.float()
        with torch.autocast(logits.device.type, enabled=False):
            for s in range(0, N, rows):
                e = min(s + rows, N)
                g = grad_out[s:e]
                if fp32:  # softmax straight into the gradient
                    d = _aten._softmax.out(logits[s:e], -1, False, out=grad[s:e])
                else:  # over the fp32 copy, then cast into the gradient
                    d = _softmax_in_place(buf.fp32(logits[s:e]))
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



# Rows per lm-head chunk at least: every chunk re-reads W [V, H], so a matmul over few rows does little work per
# read (on 2 CPU cores at H 1,024: 2.0 ms per row at 256 rows, 1.7 at 512 for h @ W.T in fp32). The student kernel
# runs three matmuls per chunk in backward and takes 512 (a 16-bit lm head does its fp32 work SUB_ROWS_16BIT rows
# at a time). The teacher (one matmul, no grad) keeps 256, half the memory; docs/benchmarks.md, "EOPD from hidden
# states".
HIDDEN_MIN_ROWS = 512
SUB_ROWS_16BIT = 32
TEACHER_HIDDEN_MIN_ROWS = 256


def _hidden_rows(V: int, chunk_bytes: int, floor: int) -> int:
    """Rows per chunk of the hidden-state kernels: `chunk_bytes` of fp32 logits, but at least `floor`."""
    return max(_rows_per_chunk(V, chunk_bytes), floor)


_IN_PLACE_OK: dict = {}  # (op name, device type) -> whether aten's fused op may write over its input


def _fused_in_place(op: str, z: torch.Tensor) -> bool:
    """Whether aten's fused `_softmax` / `_log_softmax` (op) may write over its input z on z's device. The fused
    kernels read each row's max and sum before writing any element, so out=z is exact; that is not a documented
    contract, so it is checked once per (op, device type) against the out-of-place result."""
    key = (op, z.device.type)
    ok = _IN_PLACE_OK.get(key)
    if ok is None:
        fn = getattr(_aten, op)
        probe = torch.randn(2, max(z.shape[-1], 2), device=z.device) * 4
        want = fn(probe, -1, False)
        ok = bool(torch.equal(fn.out(probe, -1, False, out=probe), want))
        _IN_PLACE_OK[key] = ok
    return ok


def _softmax_in_place(z: torch.Tensor) -> torch.Tensor:
    """softmax(z) over the last dim, written over z (fp32): aten's fused kernel (one pass) where it is exact in
    place, otherwise exp(z - logsumexp z) in place (3 passes)."""
    if _fused_in_place("_softmax", z):
        return _aten._softmax.out(z, -1, False, out=z)
    return z.sub_(torch.logsumexp(z, -1, keepdim=True)).exp_()


def _log_softmax_in_place(z: torch.Tensor) -> torch.Tensor:
    """log_softmax(z) over the last dim, written over z (fp32); the same check and fallback as _softmax_in_place."""
    if _fused_in_place("_log_softmax", z):
        return _aten._log_softmax.out(z, -1, False, out=z)
    return z.sub_(torch.logsumexp(z, -1, keepdim=True))


ENTROPY_ROWS = 8  # rows of p log p formed at once from log p (an [8, V] temporary)


def _entropy_of_logp(logp: torch.Tensor) -> torch.Tensor:
    """H_n = -sum_v p_v log p_v from log p [n, V] fp32, ENTROPY_ROWS rows at a time so that log p needs no
    [n, V] twin. nansum: 0 log 0 = 0 where a logit is -inf (0 * -inf is NaN); NaN rows from NaN/+inf logits are
    caught by the callers' _check_rows."""
    ent = torch.empty(logp.shape[0], dtype=torch.float32, device=logp.device)
    for s in range(0, logp.shape[0], ENTROPY_ROWS):
        lp = logp[s:s + ENTROPY_ROWS]
        ent[s:s + ENTROPY_ROWS] = -torch.nansum(torch.exp(lp).mul_(lp), -1)
    return ent


class _LmHeadChunk:
    """Reused buffers for one chunk of lm-head logits: `rows` rows per matmul (each chunk re-reads W), fp32 work
    on them in place. A 16-bit lm head keeps its chunk in its own dtype and does the fp32 work SUB_ROWS_16BIT rows
    at a time in an fp32 buffer: 2 bytes per logit of the chunk instead of 6, so the matmuls keep their rows."""

    def __init__(self, rows: int, V: int, hidden: torch.Tensor):
        self.z = torch.empty(rows, V, dtype=hidden.dtype, device=hidden.device)
        fp32 = hidden.dtype == torch.float32
        self.f = None if fp32 else torch.empty(min(SUB_ROWS_16BIT, rows), V, dtype=torch.float32, device=hidden.device)

    def logits(self, hidden: torch.Tensor, weight: torch.Tensor, temperature: float) -> torch.Tensor:
        """z [n, V] = (hidden @ weight.T) / temperature in the lm head's dtype, in the reused buffer."""
        z = torch.mm(hidden, weight.T, out=self.z[: hidden.shape[0]])
        return z if temperature == 1.0 else z.div_(temperature)

    def fp32_pieces(self, z: torch.Tensor):
        """(a, b, z[a:b] in fp32) over the chunk: z itself when fp32 (in place), else copies into the fp32 buffer."""
        if self.f is None:
            yield 0, z.shape[0], z
            return
        step = self.f.shape[0]
        for a in range(0, z.shape[0], step):
            b = min(a + step, z.shape[0])
            yield a, b, self.f[: b - a].copy_(z[a:b])


class _HiddenGatherLogSoftmax(torch.autograd.Function):
    """log_softmax(h_n W^T / T)[index[n, j]] for every row n, without the [N, V] logits.

    forward:  z_n = h_n W^T / T (one chunk of rows at a time), out[n, j] = log softmax(z_n)[i_nj]
    backward: z recomputed, p = softmax(z) in place, dz = (scatter(g) - p sum_j g) / T in the lm head's
              dtype, then dh[chunk] = dz W and dW += dz^T h[chunk] (dW accumulated chunk by chunk in W's dtype)
    Saved: hidden, weight, index, and the chunk buffer as the forward leaves it: it holds the last chunk (log p
    in fp32, the logits in a 16-bit lm head's dtype), so the backward starts with that chunk without recomputing
    it (one chunk's matmul fewer; the buffer is kept, not allocated again, so the peak is unchanged). A second
    backward through the same graph (retain_graph) recomputes every chunk.
    Work memory (_LmHeadChunk): one [rows, V] buffer in the lm head's dtype (the logits, then log p or dz, in
    place), plus a [SUB_ROWS_16BIT, V] fp32 buffer for a 16-bit lm head.
    """

    @staticmethod
    def forward(ctx, hidden: torch.Tensor, weight: torch.Tensor, index: torch.Tensor, rows: int, with_entropy: bool,
                temperature: float):
        N, V = hidden.shape[0], weight.shape[0]
        dev = hidden.device
        out = torch.empty(N, index.shape[1], dtype=torch.float32, device=dev)
        ent = torch.empty(N if with_entropy else 0, dtype=torch.float32, device=dev)
        buf = _LmHeadChunk(min(rows, N), V, hidden) if N else None
        with torch.autocast(dev.type, enabled=False):
            for s in range(0, N, rows):
                e = min(s + rows, N)
                for a, b, zf in buf.fp32_pieces(buf.logits(hidden[s:e], weight, temperature)):
                    logp = _log_softmax_in_place(zf)
                    out[s + a:s + b] = logp.gather(-1, index[s + a:s + b])
                    if with_entropy:
                        ent[s + a:s + b] = _entropy_of_logp(logp)
        _check_rows("student logits (hidden @ weight.T)", out[:, 0] if out.shape[1] else out.new_zeros(0))
        ctx.save_for_backward(hidden, weight, index)
        ctx.rows, ctx.temperature = rows, temperature
        # the last chunk's start, and the buffer holding it (log p when fp32, else the logits)
        ctx.kept = ((N - 1) // rows * rows, buf) if N and any(ctx.needs_input_grad[:2]) else None
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
        kept, ctx.kept = ctx.kept, None  # the forward's last chunk serves one backward only
        if kept is None:
            first, buf = None, (_LmHeadChunk(min(rows, N), V, hidden) if N else None)
        else:
            first, buf = kept
        grad_out = grad_out.float()
        order = ([first] if first is not None else []) + [s for s in range(0, N, rows) if s != first]
        with torch.autocast(hidden.device.type, enabled=False):
            for s in order:
                e = min(s + rows, N)
                if s == first:  # still in the buffer from the forward
                    z, logp = buf.z[: e - s], buf.f is None
                else:
                    z, logp = buf.logits(hidden[s:e], weight, temperature), False
                for a, b, zf in buf.fp32_pieces(z):
                    g = grad_out[s + a:s + b]
                    d = zf.exp_() if logp else _softmax_in_place(zf)
                    d.mul_(-g.sum(-1, keepdim=True))
                    d.scatter_add_(-1, index[s + a:s + b], g)
                    if temperature != 1.0:
                        d.div_(temperature)
                    if d is not z:  # 16-bit: the logits' gradient back in their dtype, over their rows
                        z[a:b].copy_(d)
                if need_h:  # z now holds dz
                    torch.mm(z, weight, out=grad_h[s:e])
                if need_w:
                    grad_w.addmm_(z.T, hidden[s:e])
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
    rows = _hidden_rows(V, chunk_bytes, HIDDEN_MIN_ROWS)
    out, ent = _HiddenGatherLogSoftmax.apply(flat, weight, idx, rows, with_entropy, float(temperature))
    return out.reshape(*lead, idx.shape[-1]), (ent.reshape(lead) if with_entropy else None)
