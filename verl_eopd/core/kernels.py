"""The chunked kernels: full-vocabulary (log-)softmax quantities without an fp32 [tokens, V] tensor.

Student and teacher logits are visited in chunks of rows (in buffers reused across chunks, through torch's fused
(log_)softmax kernels). The student side is a custom autograd function that saves nothing but its inputs and
recomputes the softmax chunk by chunk in the backward pass.

    teacher_stats:        top-k ids and log-probs, exact entropy H = -sum_v p_v log p_v, log p(y)   (no grad)
    student_logprobs_at:  log softmax(z)[index] (differentiable) and, optionally, the entropy (detached)
The `*_from_hidden` twins take the last hidden states h [N, H] and the lm head W [V, H] instead of z = h W^T:
each chunk's logits are computed from h, used and dropped, and recomputed in backward (all but the last chunk,
which the forward leaves in the reused buffer: (k - 1)/k of one extra lm-head matmul for k chunks), so no
[N, V] tensor of any dtype exists, in the forward or the backward pass.

Behaviour on the device they run on (docs/from_hidden.md, "Chunk sizes, launches and host syncs"):
  * chunk sizes come from `chunk_sizing(device, dtype, V, kind=...)`, the one place that sizes them: on CUDA
    rows in the thousands per chunk (one lm-head matmul each) and the fp32 work and the entropy over whole
    chunks; elsewhere (CPU) the small sub-chunks that suit two cores;
  * the lm head's gradient is accumulated over chunks in fp32 and cast to the weight's dtype once;
  * the host reads device values once per call (`HostChecks`): the bad-input checks stay on the device as flags
    and are read in one transfer at the end (the error messages are the same; only the error path reads more).
"""

from __future__ import annotations

import contextlib
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Any, Callable, Literal, Optional, Sequence, Union

import torch

from .settings import DEFAULT_LOGITS_CHUNK_MB

__all__ = ["DEFAULT_CHUNK_BYTES", "ChunkSizing", "HostChecks", "RankStopped", "chunk_sizing", "collect_checks",
           "host_checks", "read_across_ranks", "teacher_stats",
           "teacher_stats_from_hidden", "student_logprobs_at", "student_logprobs_at_from_hidden"]

DEFAULT_CHUNK_BYTES = DEFAULT_LOGITS_CHUNK_MB * 2**20

_aten = torch.ops.aten


# --------------------------------------------------------------------------------------------------
# Chunk sizes by device
# --------------------------------------------------------------------------------------------------

# CPU (and any device but CUDA). Rows per lm-head chunk at least: every chunk re-reads W [V, H], so a matmul over
# few rows does little work per read (on 2 CPU cores at H 1,024: 2.0 ms per row at 256 rows, 1.7 at 512 for
# h @ W.T in fp32). The student kernel runs three matmuls per chunk in backward and takes 512 (a 16-bit lm head
# does its fp32 work SUB_ROWS_16BIT rows at a time). The teacher (one matmul, no grad) keeps 256, half the memory;
# docs/benchmarks.md, "EOPD from hidden states". The entropy forms p log p ENTROPY_ROWS rows at a time.
HIDDEN_MIN_ROWS = 512
SUB_ROWS_16BIT = 32
TEACHER_HIDDEN_MIN_ROWS = 256
ENTROPY_ROWS = 8

# CUDA. Every op is a kernel launch (~5-10 us of host time each), so the sub-chunks above would cost ~12k launches
# for the forward of a 16k-token micro-batch. On CUDA a chunk is one matmul of CUDA_MIN_ROWS..CUDA_MAX_ROWS rows
# (a power of two; the largest whose work memory fits CUDA_WORK_BYTES), and the fp32 work and the entropy run over
# the whole chunk: a fixed number of launches per chunk, a few hundred per micro-batch. The matmul
# [rows, H] x [H, V] does rows * H / (rows + H) flops per byte read, over 500 from rows = H = 1,024: compute-bound
# on an H100 for any Qwen3 width, so H does not enter; the work memory is V * (bytes per logit) per row, so V and
# the dtype do. Qwen3 (V = 151,936) gets 1,024 rows (1.5 GiB of work buffers in bf16), V = 32k gets 4,096.
CUDA_MIN_ROWS = 1024
CUDA_MAX_ROWS = 4096
CUDA_WORK_BYTES = 2 * 2**30

Kind = Literal["logits", "student", "teacher"]
KINDS: tuple[str, ...] = ("logits", "student", "teacher")


@dataclass(frozen=True)
class ChunkSizing:
    """How a kernel visits its rows.

    rows: rows per chunk (one lm-head matmul per chunk on the from_hidden path);
    work_rows: rows of fp32 work at once inside a 16-bit lm-head chunk (= rows: the whole chunk);
    entropy_rows: rows of p log p formed at once (a [entropy_rows, V] fp32 temporary).
    """

    rows: int
    work_rows: int
    entropy_rows: int


def _rows_per_chunk(vocab_size: int, chunk_bytes: int) -> int:
    if chunk_bytes <= 0:
        raise ValueError(f"chunk_bytes must be > 0, got {chunk_bytes}")
    return max(1, int(chunk_bytes) // (4 * int(vocab_size)))


def _pow2_floor(x: int) -> int:
    return 1 << (max(1, int(x)).bit_length() - 1)


def _cuda_rows(V: int, dtype: torch.dtype, kind: str) -> int:
    """Rows per chunk on CUDA: the largest power of two in [CUDA_MIN_ROWS, CUDA_MAX_ROWS] whose work buffers fit
    CUDA_WORK_BYTES. Bytes per logit of a chunk: the fp32 copy or log p (4) and the entropy's p log p (4), plus the
    lm-head chunk in its own dtype on the from_hidden path."""
    per_logit = 8 + (dtype.itemsize if kind != "logits" else 0)
    return min(CUDA_MAX_ROWS, max(CUDA_MIN_ROWS, _pow2_floor(CUDA_WORK_BYTES // (per_logit * int(V)))))


def chunk_sizing(device, dtype: torch.dtype, V: int, *, kind: Kind,
                 chunk_bytes: int = DEFAULT_CHUNK_BYTES) -> ChunkSizing:
    """The chunking of a kernel over [N, V] logits (`kind` "logits": teacher_stats / student_logprobs_at) or over
    an lm head of V words ("student": student_logprobs_at_from_hidden; "teacher": teacher_stats_from_hidden) on
    `device` (a torch.device or its name; nothing is allocated there) for logits or an lm head of `dtype`.

    `chunk_bytes` (fp32 bytes of logits per chunk, `logits_chunk_mb`) gives the rows at least; on CUDA the rows are
    raised to `_cuda_rows` and the fp32 work and the entropy span the whole chunk; elsewhere the from_hidden
    kernels take at least HIDDEN_MIN_ROWS / TEACHER_HIDDEN_MIN_ROWS rows, a 16-bit lm head's fp32 work
    SUB_ROWS_16BIT rows at a time, and the entropy ENTROPY_ROWS rows at a time.
    """
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    base = _rows_per_chunk(V, chunk_bytes)
    if torch.device(device).type == "cuda":
        rows = max(base, _cuda_rows(V, dtype, kind))
        return ChunkSizing(rows=rows, work_rows=rows, entropy_rows=rows)
    if kind == "logits":
        return ChunkSizing(rows=base, work_rows=base, entropy_rows=ENTROPY_ROWS)
    rows = max(base, HIDDEN_MIN_ROWS if kind == "student" else TEACHER_HIDDEN_MIN_ROWS)
    work = rows if dtype == torch.float32 else min(SUB_ROWS_16BIT, rows)
    return ChunkSizing(rows=rows, work_rows=work, entropy_rows=ENTROPY_ROWS)


# --------------------------------------------------------------------------------------------------
# Host reads: one per pass
# --------------------------------------------------------------------------------------------------


class RankStopped(RuntimeError):
    """Raised on every rank but the failing one when a bad-input check (or an error) stopped another rank's pass:
    names that rank and its check. The failing rank raises the check's own error."""


_ERROR_SLOT = 0xFFFF  # the check index a rank reports when its pass raised an error that is no check of its own
_RANK_SCALE = 0x10000  # code = (rank + 1) * _RANK_SCALE + check index; MAX keeps the highest failing rank's


def _rank_group_size() -> int:
    """The default process group's size when torch.distributed is initialised, else 1."""
    dist = torch.distributed
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


class HostChecks:
    """Bad-input checks whose flags stay on the device until one read.

    `add(flag, fail, what)`: flag is a 0-d bool tensor (True = bad input), `fail()` raises the check's error (it may
    read the device again: only the error path does), `what` names the check for the other ranks' message.
    `read(values)` copies every flag and the 0-d `values` to the host in one transfer (the one host sync), raises the
    first failed check's error in the order they were added, and returns the values as floats.

    `across_ranks=True` (the EOPD loss path, one HostChecks per micro-batch): when torch.distributed is initialised
    with more than one rank, the read first all-reduces (MAX, default group) one code per rank,
    (rank + 1) * 2^16 + the index of its first failed check (0 where none failed), so that every rank learns
    that some rank failed: the failing rank raises its check's error, every other rank raises `RankStopped` naming
    that rank and check, and none is left waiting in the next collective. Every rank must read the same number of
    times: the read is made whatever the data (and on the error path, `host_checks` / `collect_checks`).
    """

    def __init__(self, across_ranks: bool = False):
        self.across_ranks = across_ranks
        self._flags: list[torch.Tensor] = []
        self._fails: list[Callable[[], None]] = []
        self._whats: list[str] = []
        self.done = False

    def add(self, flag: torch.Tensor, fail: Callable[[], None], what: str = "a bad-input check") -> None:
        self._flags.append(flag.reshape(()))
        self._fails.append(fail)
        self._whats.append(what)

    def read(self, values: Sequence[torch.Tensor] = (), *, error: bool = False) -> list[float]:
        """The one read (see the class). `error=True`: the caller's pass raised (the error path): this rank reports
        itself failed to the others even where none of its checks did."""
        flags, fails, whats = self._flags, self._fails, self._whats
        self._flags, self._fails, self._whats, self.done = [], [], [], True
        tensors = [t.detach().reshape(()) for t in (*flags, *values)]
        world = _rank_group_size() if self.across_ranks else 1
        if not tensors and world == 1:
            return []
        dev = tensors[0].device if tensors else None
        parts = [torch.stack([t.to(device=dev, dtype=torch.float64) for t in tensors])] if tensors else []
        if world > 1:
            parts.insert(0, self._reduced_code(flags, error, dev).to(torch.float64).reshape(1))
        if len(parts) > 1 and parts[0].device != parts[1].device:  # NCCL with CPU flags: not on the loss path
            parts[0] = parts[0].to(parts[1].device)
        host = torch.cat(parts) if len(parts) > 1 else parts[0]
        if host.device.type != "cpu":
            host = host.to("cpu")  # the one device -> host copy
        host = host.tolist()
        code = int(host.pop(0)) if world > 1 else 0
        for bad, fail in zip(host, fails):
            if bad:
                fail()
        if code:
            rank, index = code // _RANK_SCALE - 1, code % _RANK_SCALE
            what = ("raised an error" if index == _ERROR_SLOT else
                    f"failed its check: {whats[index]}" if index < len(whats) else f"failed its check #{index}")
            raise RankStopped(f"rank {rank} {what}; this rank stops too (its own inputs passed), so that no rank waits "
                              f"in the next collective. Rank {rank}'s error message says what to fix")
        return host[len(fails):]

    def _reduced_code(self, flags: list[torch.Tensor], error: bool, dev) -> torch.Tensor:
        """The all-reduced (MAX) code of the first failed check over the ranks: a 0-d int64 tensor, on the device
        of the flags (the CUDA device for NCCL when there are none). No host read: the collective is queued."""
        dist = torch.distributed
        if dev is None or (dist.get_backend() == "nccl" and torch.device(dev).type != "cuda"):
            dev = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")
        me = (dist.get_rank() + 1) * _RANK_SCALE
        if flags:
            bad = torch.stack([f.to(device=dev, dtype=torch.int64) for f in flags])
            code = torch.where(bad.any(), bad.argmax() + me, torch.zeros((), dtype=torch.int64, device=dev))
        else:
            code = torch.zeros((), dtype=torch.int64, device=dev)
        if error:
            code = torch.where(code > 0, code, torch.full((), me + _ERROR_SLOT, dtype=torch.int64, device=dev))
        dist.all_reduce(code, op=dist.ReduceOp.MAX)
        return code


_SCOPE: ContextVar[Optional[HostChecks]] = ContextVar("verl_eopd_host_checks", default=None)


@contextlib.contextmanager
def host_checks():
    """The HostChecks of the enclosing pass, or a new one that this block reads on exit (one host sync).

    A caller that opens the outermost block (e.g. `eopd_loss`, or `collect_checks` on the EOPD loss path) gathers
    the checks of everything it calls (the kernels, the objective) and reads them once with its metrics
    (`HostChecks.read(values)`); a kernel called on its own reads its checks when it returns. If the block raises,
    the pending checks are read first, so that a bad input is reported by its own message and not by whatever
    failed later because of it."""
    outer = _SCOPE.get()
    if outer is not None:
        yield outer
        return
    checks = HostChecks()
    with collect_checks(checks):
        yield checks
    if not checks.done:
        checks.read()


@contextlib.contextmanager
def collect_checks(checks: HostChecks):
    """Gathers the checks of everything called in the block into `checks`, which the caller reads later
    (`checks.read`, e.g. in another function of the same micro-batch). If the block raises, the checks are read on
    the way out (with `error=True`: the other ranks learn that this one stopped) and a failed check's own error is
    raised, chained to the error that the bad input caused."""
    token = _SCOPE.set(checks)
    try:
        yield checks
    except Exception as exc:
        _SCOPE.reset(token)
        token = None
        if not checks.done:
            try:
                checks.read(error=True)
            except (ValueError, RankStopped) as bad_input:
                raise bad_input from exc
            except Exception:  # the device cannot be read either: report what failed first
                pass
        raise
    finally:
        if token is not None:
            _SCOPE.reset(token)


def read_across_ranks(fn: Callable[..., Any], *args, **kwargs) -> Any:
    """fn(*args, **kwargs) as one pass whose checks (the kernels' `host_checks`) are read once, across ranks
    (`HostChecks(across_ranks=True)`): a bad input on one rank stops every rank at that read (its own error there,
    `RankStopped` on the others) instead of leaving them waiting in the next collective. Used by the teacher
    worker's passes; every rank makes the same number of them (FSDP's forwards are collective too)."""
    checks = HostChecks(across_ranks=True)
    with collect_checks(checks):
        out = fn(*args, **kwargs)
    checks.read()
    return out


def _check_rows(checks: HostChecks, name: str, first_col: torch.Tensor) -> None:
    """Refuse rows whose log-probs are NaN (a NaN or +inf logit makes its whole row NaN under log_softmax), naming
    the first: a flag in `checks` (read once per pass). `first_col` [N] is any column of the row outputs."""
    if not first_col.numel():
        return
    bad = torch.isnan(first_col)

    def fail():
        j = int(bad.nonzero()[0, 0])
        raise ValueError(f"{name} holds NaN or +inf logits at row {j} (of {first_col.numel()} rows, flattened "
                         f"[..., V]; {int(bad.sum())} such rows): refusing to score or train on them. Fix: check the "
                         "model's forward pass (weights, dtype overflow) for that sequence")

    checks.add(bad.any(), fail, f"NaN or +inf logits in {name}")


def _autocast_off(dev: torch.device):
    """torch.autocast(dev.type, enabled=False); nothing where autocast knows no such device (the meta device, on
    which the tests count the ops a CUDA micro-batch dispatches)."""
    try:
        return torch.autocast(dev.type, enabled=False)
    except RuntimeError:
        return contextlib.nullcontext()


# --------------------------------------------------------------------------------------------------
# Softmax pieces
# --------------------------------------------------------------------------------------------------


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


def _chunk_logp(z: torch.Tensor, buf: _ChunkBuffers, with_entropy: bool, entropy_rows: int):
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
    return logp, (_entropy_of_logp(logp, entropy_rows) if with_entropy else None)


_IN_PLACE_OK: dict = {}  # (op name, device type) -> whether aten's fused op may write over its input


def _fused_in_place(op: str, z: torch.Tensor) -> bool:
    """Whether aten's fused `_softmax` / `_log_softmax` (op) may write over its input z on z's device. The fused
    kernels read each row's max and sum before writing any element, so out=z is exact; that is not a documented
    contract, so it is checked once per (op, device type) against the out-of-place result (one host read per
    process, not per pass)."""
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


def _entropy_of_logp(logp: torch.Tensor, rows: Optional[int] = None) -> torch.Tensor:
    """H_n = -sum_v p_v log p_v from log p [n, V] fp32, `rows` rows at a time (default ENTROPY_ROWS; an [rows, V]
    temporary: on CUDA the whole chunk, one set of launches). nansum: 0 log 0 = 0 where a logit is -inf (0 * -inf
    is NaN); NaN rows from NaN/+inf logits are caught by the callers' _check_rows."""
    rows = ENTROPY_ROWS if rows is None else rows
    if rows >= logp.shape[0]:
        return torch.nansum(torch.exp(logp).mul_(logp), -1).neg_()
    ent = torch.empty(logp.shape[0], dtype=torch.float32, device=logp.device)
    for s in range(0, logp.shape[0], rows):
        lp = logp[s:s + rows]
        ent[s:s + rows] = -torch.nansum(torch.exp(lp).mul_(lp), -1)
    return ent


# --------------------------------------------------------------------------------------------------
# Teacher
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
        chunk_bytes: fp32 bytes of logits processed at once (the rows at least; `chunk_sizing`); never more than
            one chunk is allocated.

    Returns a dict with
        topk_ids [B, T, K] int64, topk_logprobs [B, T, K] fp32 (full-vocabulary log-probs, descending),
        entropy [B, T] fp32 (exact, full vocabulary, nats), token_logprobs [B, T] fp32 (log pi_T(y_t)).
    One host read (the input checks), none per chunk.
    """
    if teacher_logits.dim() < 2:
        raise ValueError(f"teacher_logits must be [..., V], got shape {tuple(teacher_logits.shape)}")
    V = teacher_logits.shape[-1]
    lead = teacher_logits.shape[:-1]
    with host_checks() as checks:
        ids = _teacher_ids(checks, sampled_ids, lead, V, k, "teacher_logits.shape[:-1]")
        flat = teacher_logits.reshape(-1, V)
        sz = chunk_sizing(flat.device, flat.dtype, V, kind="logits", chunk_bytes=chunk_bytes)
        N, rows = flat.shape[0], sz.rows
        buf = _ChunkBuffers(min(rows, N), V, flat.device, flat.dtype, need_logp=True) if N else None
        pieces = ((s, min(s + rows, N), _chunk_logp(flat[s:s + rows], buf, False, sz.entropy_rows)[0])
                  for s in range(0, N, rows))
        out = _teacher_rows(checks, pieces, N, flat.device, ids, k, "teacher_logits", sz.entropy_rows)
    return {key: t.reshape(*lead, *t.shape[1:]) for key, t in out.items()}


def _teacher_ids(checks: HostChecks, sampled_ids: torch.Tensor, lead, V: int, k: int, lead_name: str) -> torch.Tensor:
    """The teacher functions' checks of k and sampled_ids (shape `lead`, ids in [0, V): a flag in `checks`);
    returns the ids flat [N], clamped into [0, V) so that the pass runs to the one read that reports them."""
    if not (isinstance(k, int) and 1 <= k <= V):
        raise ValueError(f"k (teacher top-k) must be an int in [1, V={V}], got {k!r}")
    if tuple(sampled_ids.shape) != tuple(lead):
        raise ValueError(f"sampled_ids shape {tuple(sampled_ids.shape)} must equal {lead_name} {tuple(lead)}")
    ids = sampled_ids.reshape(-1).long()
    if not ids.numel():
        return ids

    def fail():
        raise ValueError(f"sampled_ids must lie in [0, {V}); got range [{int(ids.min())}, {int(ids.max())}]")

    checks.add(((ids < 0) | (ids >= V)).any(), fail, f"sampled_ids outside [0, {V})")
    return ids.clamp(0, V - 1)


def _teacher_rows(checks: HostChecks, pieces, N: int, dev, ids: torch.Tensor, k: int, name: str,
                  entropy_rows: int) -> dict:
    """teacher_stats over N rows from `pieces`, which yields (s, e, log p [e - s, V] fp32 of rows s:e, free to
    overwrite): flat [N, ...] outputs."""
    topk_ids = torch.empty(N, k, dtype=torch.int64, device=dev)
    topk_lp = torch.empty(N, k, dtype=torch.float32, device=dev)
    entropy = torch.empty(N, dtype=torch.float32, device=dev)
    token_lp = torch.empty(N, dtype=torch.float32, device=dev)
    with _autocast_off(dev):
        for s, e, logp in pieces:
            torch.topk(logp, k, dim=-1, out=(topk_lp[s:e], topk_ids[s:e]))
            torch.gather(logp, -1, ids[s:e, None], out=token_lp[s:e, None])
            entropy[s:e] = _entropy_of_logp(logp, entropy_rows)
    _check_rows(checks, name, token_lp)
    return {"topk_ids": topk_ids, "topk_logprobs": topk_lp, "entropy": entropy, "token_logprobs": token_lp}


def _check_lm_head(hidden: torch.Tensor, weight: torch.Tensor, temperature) -> tuple[int, int]:
    """(H, V) of hidden [..., H] and an lm head weight [V, H] (no bias), or a ValueError naming the tensor."""
    if weight.dim() != 2:
        raise ValueError(f"weight (the lm head) must be [V, H], got {tuple(weight.shape)}")
    V, H = weight.shape
    if hidden.dim() < 2 or hidden.shape[-1] != H:
        raise ValueError(f"hidden must be [..., H] with H = weight.shape[1] = {H}, got {tuple(hidden.shape)}")
    if hidden.dtype != weight.dtype:
        raise ValueError(f"hidden ({hidden.dtype}) and weight ({weight.dtype}) must share a dtype (the lm head's)")
    if isinstance(temperature, torch.Tensor):  # its value is checked in the pass (a flag, no host read here)
        if temperature.numel() != 1 or not temperature.is_floating_point():
            raise ValueError(f"temperature must be a number or a 1-element float tensor, got {tuple(temperature.shape)} "
                             f"{temperature.dtype}")
    elif not (isinstance(temperature, (int, float)) and temperature > 0 and temperature != float("inf")):
        raise ValueError(f"temperature must be a finite number > 0, got {temperature!r}")
    return H, V


def _is_one(temperature) -> bool:
    """Whether dividing by `temperature` is known on the host to change nothing (a tensor is always divided by)."""
    return not isinstance(temperature, torch.Tensor) and temperature == 1.0


def _check_temperature(checks: HostChecks, temperature) -> None:
    """A device temperature must be finite and > 0: a flag in `checks`."""
    if not isinstance(temperature, torch.Tensor):
        return

    def fail():
        raise ValueError(f"temperature must be a finite number > 0, got {float(temperature)}")

    checks.add(~((temperature > 0) & torch.isfinite(temperature)), fail, "temperature finite and > 0")


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
    runs one chunk of rows at a time (`chunk_sizing(..., kind="teacher")`).

    Args: hidden [..., H] (the teacher's last hidden states, row t predicts y_t), weight [V, H] (its lm head, no
    bias; same dtype), sampled_ids [...] in [0, V). Returns the dict of `teacher_stats`. One host read.
    """
    H, V = _check_lm_head(hidden, weight, temperature)
    lead = hidden.shape[:-1]
    with host_checks() as checks:
        ids = _teacher_ids(checks, sampled_ids, lead, V, k, "hidden.shape[:-1]")
        flat = hidden.reshape(-1, H)
        sz = chunk_sizing(flat.device, flat.dtype, V, kind="teacher", chunk_bytes=chunk_bytes)
        N, rows = flat.shape[0], sz.rows
        buf = _LmHeadChunk(min(rows, N), V, flat, sz.work_rows) if N else None

        def pieces():  # each piece's fp32 logits are overwritten with their log p
            for s in range(0, N, rows):
                z = buf.logits(flat[s:s + rows], weight, float(temperature))
                for a, b, zf in buf.fp32_pieces(z):
                    yield s + a, s + b, _log_softmax_in_place(zf)

        out = _teacher_rows(checks, pieces(), N, flat.device, ids, k, "teacher logits (hidden @ weight.T)",
                            sz.entropy_rows)
    return {key: t.reshape(*lead, *t.shape[1:]) for key, t in out.items()}


# --------------------------------------------------------------------------------------------------
# Student, from logits
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
    def forward(ctx, logits: torch.Tensor, index: torch.Tensor, sizing: ChunkSizing, with_entropy: bool):
        N, V = logits.shape
        dev = logits.device
        rows = sizing.rows
        out = torch.empty(N, index.shape[1], dtype=torch.float32, device=dev)
        ent = torch.empty(N if with_entropy else 0, dtype=torch.float32, device=dev)
        buf = _ChunkBuffers(min(rows, N), V, dev, logits.dtype, need_logp=True) if N else None
        with _autocast_off(dev), host_checks() as checks:
            for s in range(0, N, rows):
                e = min(s + rows, N)
                logp, h = _chunk_logp(logits[s:e], buf, with_entropy, sizing.entropy_rows)
                torch.gather(logp, -1, index[s:e], out=out[s:e])
                if with_entropy:
                    ent[s:e] = h
            _check_rows(checks, "student_logits", out[:, 0] if out.shape[1] else out.new_zeros(0))
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
        with _autocast_off(logits.device):
            for s in range(0, N, rows):
                e = min(s + rows, N)
                g = grad_out[s:e]
                if fp32:  # softmax straight into the gradient
                    d = _aten._softmax.out(logits[s:e], -1, False, out=grad[s:e])
                else:  # over the fp32 copy, then cast into the gradient
                    d = _softmax_in_place(buf.fp32(logits[s:e]))
                d.mul_(g.sum(-1, keepdim=True).neg_())
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
    Returns: (log q [..., M] fp32, entropy [...] fp32 or None). One host read in forward (the NaN-row check),
    none in backward.
    """
    V = student_logits.shape[-1]
    lead = student_logits.shape[:-1]
    if tuple(index.shape[:-1]) != tuple(lead):
        raise ValueError(f"index shape {tuple(index.shape)} does not match student_logits {tuple(student_logits.shape)}")
    flat = student_logits.reshape(-1, V)
    idx = index.reshape(flat.shape[0], -1).long()
    sizing = chunk_sizing(flat.device, flat.dtype, V, kind="logits", chunk_bytes=chunk_bytes)
    out, ent = _GatherLogSoftmax.apply(flat, idx, sizing, with_entropy)
    return out.reshape(*lead, idx.shape[-1]), (ent.reshape(lead) if with_entropy else None)


# --------------------------------------------------------------------------------------------------
# Student, from hidden states
# --------------------------------------------------------------------------------------------------


class _LmHeadChunk:
    """Reused buffers for one chunk of lm-head logits: `rows` rows per matmul (each chunk re-reads W), fp32 work
    on them in place. A 16-bit lm head keeps its chunk in its own dtype and does the fp32 work `work_rows` rows
    at a time in an fp32 buffer (`chunk_sizing`: a few rows on CPU, the whole chunk on CUDA)."""

    def __init__(self, rows: int, V: int, hidden: torch.Tensor, work_rows: int):
        self.z = torch.empty(rows, V, dtype=hidden.dtype, device=hidden.device)
        fp32 = hidden.dtype == torch.float32
        self.f = None if fp32 else torch.empty(min(work_rows, rows), V, dtype=torch.float32, device=hidden.device)

    def logits(self, hidden: torch.Tensor, weight: torch.Tensor, temperature: Union[float, torch.Tensor]) -> torch.Tensor:
        """z [n, V] = (hidden @ weight.T) / temperature in the lm head's dtype, in the reused buffer."""
        z = torch.mm(hidden, weight.T, out=self.z[: hidden.shape[0]])
        return z if _is_one(temperature) else z.div_(temperature)

    def fp32_pieces(self, z: torch.Tensor):
        """(a, b, z[a:b] in fp32) over the chunk: z itself when fp32 (in place), else copies into the fp32 buffer."""
        if self.f is None:
            yield 0, z.shape[0], z
            return
        step = self.f.shape[0]
        for a in range(0, z.shape[0], step):
            b = min(a + step, z.shape[0])
            yield a, b, self.f[: b - a].copy_(z[a:b])


_MIXED_MM_OK: dict = {}  # (device type, dtype) -> whether addmm(fp32, 16-bit, 16-bit, out_dtype=fp32) works in place


def _mixed_addmm_ok(dev: torch.device, dtype: torch.dtype) -> bool:
    """Whether `torch.addmm(acc, a, b, out_dtype=torch.float32, out=acc)` (16-bit a, b; fp32 acc: one 16-bit GEMM
    accumulating into fp32) runs on this device type and adds into acc: checked once per (device type, dtype)
    against the upcast product (torch >= 2.8 on CUDA; not on CPU)."""
    key = (dev.type, dtype)
    ok = _MIXED_MM_OK.get(key)
    if ok is None:
        try:
            a, b = torch.randn(8, 16, device=dev).to(dtype), torch.randn(16, 8, device=dev).to(dtype)
            acc = torch.randn(8, 8, device=dev)
            want = acc + a.float() @ b.float()
            torch.addmm(acc, a, b, out_dtype=torch.float32, out=acc)
            ok = bool(torch.allclose(acc, want, rtol=1e-4, atol=1e-4))
        except (RuntimeError, TypeError):  # NotImplementedError is a RuntimeError
            ok = False
        _MIXED_MM_OK[key] = ok
    return ok


def _add_grad_w(acc: torch.Tensor, dz: torch.Tensor, h: torch.Tensor, f: Optional[torch.Tensor]) -> None:
    """acc [V, H] += dz^T h for one chunk (dz [n, V], h [n, H] in the lm head's dtype; acc in fp32).

    fp32 lm head: one addmm_. 16-bit: one 16-bit GEMM accumulating into fp32 where the device has it (CUDA);
    otherwise dz is cast to fp32 a block of vocabulary columns at a time in the fp32 work buffer f (no new
    [n, V] fp32 tensor), each block one fp32 addmm_ into its rows of acc."""
    if dz.dtype == acc.dtype:
        acc.addmm_(dz.T, h)
        return
    if _mixed_addmm_ok(dz.device, dz.dtype):
        torch.addmm(acc, dz.T, h, out_dtype=torch.float32, out=acc)
        return
    n, V = dz.shape
    h32 = h.float()
    flat = f.view(-1)
    step = max(1, flat.numel() // max(n, 1))
    for v0 in range(0, V, step):
        v1 = min(v0 + step, V)
        blk = flat[: n * (v1 - v0)].view(n, v1 - v0).copy_(dz[:, v0:v1])
        acc[v0:v1].addmm_(blk.T, h32)


class _HiddenGatherLogSoftmax(torch.autograd.Function):
    """log_softmax(h_n W^T / T)[index[n, j]] for every row n, without the [N, V] logits.

    forward:  z_n = h_n W^T / T (one chunk of rows at a time), out[n, j] = log softmax(z_n)[i_nj]
    backward: z recomputed, p = softmax(z) in place, dz = (scatter(g) - p sum_j g) / T in the lm head's
              dtype, then dh[chunk] = dz W and dW += dz^T h[chunk], dW accumulated over the chunks in fp32
              and cast to W's dtype once (_add_grad_w)
    Saved: hidden, weight, index, and the chunk buffer as the forward leaves it: it holds the last chunk (log p
    in fp32, the logits in a 16-bit lm head's dtype), so the backward starts with that chunk without recomputing
    it (one chunk's matmul fewer; the buffer is kept, not allocated again, so the peak is unchanged). A second
    backward through the same graph (retain_graph) recomputes every chunk.
    Work memory (_LmHeadChunk): one [rows, V] buffer in the lm head's dtype (the logits, then log p or dz, in
    place), plus a [work_rows, V] fp32 buffer for a 16-bit lm head; in backward the fp32 accumulator [V, H] of a
    16-bit lm head's gradient.
    """

    @staticmethod
    def forward(ctx, hidden: torch.Tensor, weight: torch.Tensor, index: torch.Tensor, sizing: ChunkSizing,
                with_entropy: bool, temperature):
        N, V = hidden.shape[0], weight.shape[0]
        dev = hidden.device
        rows = sizing.rows
        out = torch.empty(N, index.shape[1], dtype=torch.float32, device=dev)
        ent = torch.empty(N if with_entropy else 0, dtype=torch.float32, device=dev)
        buf = _LmHeadChunk(min(rows, N), V, hidden, sizing.work_rows) if N else None
        with _autocast_off(dev), host_checks() as checks:
            _check_temperature(checks, temperature)
            for s in range(0, N, rows):
                e = min(s + rows, N)
                for a, b, zf in buf.fp32_pieces(buf.logits(hidden[s:e], weight, temperature)):
                    logp = _log_softmax_in_place(zf)
                    torch.gather(logp, -1, index[s + a:s + b], out=out[s + a:s + b])
                    if with_entropy:
                        ent[s + a:s + b] = _entropy_of_logp(logp, sizing.entropy_rows)
            _check_rows(checks, "student logits (hidden @ weight.T)", out[:, 0] if out.shape[1] else out.new_zeros(0))
        ctx.save_for_backward(hidden, weight, index)
        ctx.rows, ctx.temperature = rows, temperature
        # the last chunk's start, and the buffer holding it (log p when fp32, else the logits)
        ctx.kept = ((N - 1) // rows * rows, buf) if N and any(ctx.needs_input_grad[:2]) else None
        ctx.work_rows = sizing.work_rows
        ctx.mark_non_differentiable(ent)
        return out, ent

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor, _grad_ent: Optional[torch.Tensor]):
        hidden, weight, index = ctx.saved_tensors
        N, V = hidden.shape[0], weight.shape[0]
        rows, temperature = ctx.rows, ctx.temperature
        need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        grad_h = torch.empty_like(hidden) if need_h else None
        # dW over the chunks in fp32 (a 16-bit lm head's gradient is cast once at the end)
        acc = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if need_w else None
        kept, ctx.kept = ctx.kept, None  # the forward's last chunk serves one backward only
        if kept is None:
            first, buf = None, (_LmHeadChunk(min(rows, N), V, hidden, ctx.work_rows) if N else None)
        else:
            first, buf = kept
        grad_out = grad_out.float()
        order = ([first] if first is not None else []) + [s for s in range(0, N, rows) if s != first]
        with _autocast_off(hidden.device):
            for s in order:
                e = min(s + rows, N)
                if s == first:  # still in the buffer from the forward
                    z, logp = buf.z[: e - s], buf.f is None
                else:
                    z, logp = buf.logits(hidden[s:e], weight, temperature), False
                for a, b, zf in buf.fp32_pieces(z):
                    g = grad_out[s + a:s + b]
                    d = zf.exp_() if logp else _softmax_in_place(zf)
                    d.mul_(g.sum(-1, keepdim=True).neg_())
                    d.scatter_add_(-1, index[s + a:s + b], g)
                    if not _is_one(temperature):
                        d.div_(temperature)
                    if d is not z:  # 16-bit: the logits' gradient back in their dtype, over their rows
                        z[a:b].copy_(d)
                if need_h:  # z now holds dz
                    torch.mm(z, weight, out=grad_h[s:e])
                if need_w:
                    _add_grad_w(acc, z, hidden[s:e], buf.f)
        grad_w = None if acc is None else (acc if acc.dtype == weight.dtype else acc.to(weight.dtype))
        return grad_h, grad_w, None, None, None, None


def student_logprobs_at_from_hidden(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    index: torch.Tensor,
    *,
    temperature: Union[float, torch.Tensor] = 1.0,
    with_entropy: bool = False,
    chunk_bytes: int = DEFAULT_CHUNK_BYTES,
) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """`student_logprobs_at(hidden @ weight.T / temperature, index)` without the [..., V] logits; the gradient
    reaches hidden [..., H] and weight [V, H] (a tied input embedding accumulates it as any other use does).
    `temperature`: a number, or a 1-element float tensor on the device (then the logits are always divided by it
    and its value is checked with the other flags: no host read to get it).
    One host read in forward (the NaN-row check), none in backward."""
    H, V = _check_lm_head(hidden, weight, temperature)
    lead = hidden.shape[:-1]
    if tuple(index.shape[:-1]) != tuple(lead):
        raise ValueError(f"index shape {tuple(index.shape)} does not match hidden {tuple(hidden.shape)}")
    flat = hidden.reshape(-1, H)
    idx = index.reshape(flat.shape[0], -1).long()
    sizing = chunk_sizing(flat.device, flat.dtype, V, kind="student", chunk_bytes=chunk_bytes)
    t = temperature.detach().reshape(()).float() if isinstance(temperature, torch.Tensor) else float(temperature)
    out, ent = _HiddenGatherLogSoftmax.apply(flat, weight, idx, sizing, with_entropy, t)
    return out.reshape(*lead, idx.shape[-1]), (ent.reshape(lead) if with_entropy else None)
