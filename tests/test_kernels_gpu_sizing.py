"""The kernels' GPU behaviour, pinned on CPU (issue 23, item 3): chunk sizes by device, the lm head's gradient
accumulated in fp32, the aten ops a 16k-token bf16 micro-batch dispatches with the CUDA sizing, and one host sync
per pass.

Ops and syncs are counted by a TorchDispatchMode on the meta device: tensors of the real shapes (N = 16,384 rows,
Qwen3's V = 151,936, H = 2,048) that run no arithmetic, with the kernels handed the sizing they pick for a CUDA
tensor. Every aten op a CUDA run dispatches is seen there; views (slice, permute, ...) dispatch but launch
nothing, so the op counts bound the kernel launches from above. A host sync on CUDA is a read of a device value:
`aten._local_scalar_dense` (`.item()`, `bool(t)`, `int(t)`, `float(t)`), a copy to the CPU (`.tolist()`,
`.cpu()`), and the ops whose output size depends on the data (`nonzero`, boolean indexing, `unique`,
`masked_select`); the mode counts each of them.
"""

from __future__ import annotations

import collections
import math

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from verl_eopd import eopd_loss, eopd_loss_from_hidden, eopd_stats, eopd_token_losses
from verl_eopd.core import kernels
from verl_eopd.core.kernels import chunk_sizing

pytestmark = pytest.mark.unit

aten = torch.ops.aten
QWEN3_V, QWEN3_H, TOKENS, K = 151_936, 2_048, 16_384, 16

_SYNC_OPS = {aten._local_scalar_dense.default, aten.item.default, aten.is_nonzero.default, aten.equal.default,
             aten.nonzero.default, aten.masked_select.default, aten._unique2.default, aten.unique_dim.default,
             aten.unique_consecutive.default, aten.repeat_interleave.Tensor}


class CountOps(TorchDispatchMode):
    """Counts every aten op dispatched, and the host syncs among them. On the meta device a sync has no value to
    read: it returns 0 (no check failed) or zeros on the CPU."""

    def __init__(self):
        super().__init__()
        self.ops: collections.Counter = collections.Counter()
        self.syncs: list = []

    @property
    def total(self) -> int:
        return sum(self.ops.values())

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        self.ops[func] += 1
        src = args[0] if args and isinstance(args[0], torch.Tensor) else None
        to_host = (func in (aten._to_copy.default, aten.copy_.default) and src is not None
                   and _to_cpu(func, args, kwargs) and _device(func, args, kwargs).type != "cpu")
        if func in _SYNC_OPS or to_host or _bool_index(func, args):
            self.syncs.append(func.name())
            if src is not None and src.device.type == "meta":
                if to_host and func is aten._to_copy.default:
                    return torch.zeros(src.shape, dtype=kwargs.get("dtype") or src.dtype)
                if func is aten._local_scalar_dense.default:
                    return 0
        return func(*args, **kwargs)


def _bool_index(func, args) -> bool:
    """t[mask] / t[mask] = v: the output size (or the positions) depend on the mask's values."""
    if func not in (aten.index.Tensor, aten.index_put_.default, aten.index_put.default, aten._index_put_impl_.default):
        return False
    return any(i is not None and i.dtype in (torch.bool, torch.uint8) for i in args[1])


def _to_cpu(func, args, kwargs) -> bool:
    if func is aten._to_copy.default:
        return torch.device(kwargs.get("device") or args[0].device).type == "cpu"
    return args[0].device.type == "cpu"  # copy_(dst, src): into a CPU tensor


def _device(func, args, kwargs) -> torch.device:
    """The source device of a copy."""
    return args[0].device if func is aten._to_copy.default else args[1].device


@pytest.fixture
def cuda_sizing_on_meta(monkeypatch):
    """Meta tensors get the sizing a CUDA tensor gets, the fused in-place softmax and the 16-bit GEMM into fp32
    (what `_fused_in_place` / `_mixed_addmm_ok` find on CUDA; their probes read values, which meta has not)."""
    real = kernels.chunk_sizing

    def sizing(device, *a, **kw):
        return real("cuda" if torch.device(device).type == "meta" else device, *a, **kw)

    monkeypatch.setattr(kernels, "chunk_sizing", sizing)
    for op in ("_softmax", "_log_softmax"):
        monkeypatch.setitem(kernels._IN_PLACE_OK, (op, "meta"), True)
    monkeypatch.setitem(kernels._MIXED_MM_OK, ("meta", torch.bfloat16), True)


def _meta_batch(n=TOKENS, H=QWEN3_H, V=QWEN3_V):
    m = "meta"
    h = torch.empty(n, H, dtype=torch.bfloat16, device=m, requires_grad=True)
    w = torch.empty(V, H, dtype=torch.bfloat16, device=m, requires_grad=True)
    idx = torch.zeros(n, K + 1, dtype=torch.long, device=m)
    return h, w, idx


# --------------------------------------------------------------------------------------------------
# Chunk sizes by device
# --------------------------------------------------------------------------------------------------


def test_cuda_sizing_is_chosen_for_a_cuda_device_and_cpu_keeps_todays_sizes():
    bf16 = torch.bfloat16
    for kind in ("student", "teacher", "logits"):
        for dev in (torch.device("cuda"), "cuda:1", torch.device("cuda", 3)):
            sz = chunk_sizing(dev, bf16, QWEN3_V, kind=kind)
            assert sz.rows == 1024, (kind, dev, sz)  # rows in the thousands
            assert sz.work_rows == sz.rows and sz.entropy_rows == sz.rows  # fp32 work and entropy: whole chunks
        assert chunk_sizing("cuda", bf16, 32_000, kind=kind).rows == 4096  # smaller vocabulary, more rows
        assert chunk_sizing("cuda", torch.float32, 1_000, kind=kind, chunk_bytes=4_000).rows == kernels.CUDA_MAX_ROWS
        # logits_chunk_mb can only raise the rows
        assert chunk_sizing("cuda", bf16, QWEN3_V, kind=kind, chunk_bytes=2048 * 4 * QWEN3_V).rows == 2048
    # CPU: the sizes the kernels had (docs/benchmarks.md)
    cpu = torch.device("cpu")
    assert chunk_sizing(cpu, bf16, QWEN3_V, kind="student") == kernels.ChunkSizing(512, 32, 8)
    assert chunk_sizing(cpu, bf16, QWEN3_V, kind="teacher") == kernels.ChunkSizing(256, 32, 8)
    assert chunk_sizing(cpu, torch.float32, QWEN3_V, kind="student") == kernels.ChunkSizing(512, 512, 8)
    assert chunk_sizing(cpu, bf16, QWEN3_V, kind="logits") == kernels.ChunkSizing(110, 110, 8)  # 64 MiB of fp32
    with pytest.raises(ValueError, match="kind"):
        chunk_sizing(cpu, bf16, QWEN3_V, kind="lm_head")
    assert not torch.cuda.is_initialized()  # nothing touched a GPU


def test_kernels_size_their_chunks_by_the_tensors_device(cuda_sizing_on_meta, monkeypatch):
    """Counted matmuls and log-softmaxes: with the CUDA sizing one matmul and one fp32 log-softmax per 1,024 rows;
    with the CPU sizing (the meta device taken as itself) one matmul per 512 rows and one log-softmax per 32."""
    h, w, idx = _meta_batch()
    with CountOps() as c:
        kernels.student_logprobs_at_from_hidden(h, w, idx, with_entropy=True)
    assert c.ops[aten.mm.out] == TOKENS // 1024 and c.ops[aten._log_softmax.out] == TOKENS // 1024
    assert c.ops[aten.nansum.default] == TOKENS // 1024  # the entropy over whole chunks
    monkeypatch.setattr(kernels, "chunk_sizing", chunk_sizing)  # the meta device sized as what it is: not CUDA
    with CountOps() as c:
        kernels.student_logprobs_at_from_hidden(h, w, idx, with_entropy=True)
    assert c.ops[aten.mm.out] == TOKENS // 512 and c.ops[aten._log_softmax.out] == TOKENS // 32
    assert c.ops[aten.nansum.default] == TOKENS // 8


# --------------------------------------------------------------------------------------------------
# The lm head's gradient in fp32
# --------------------------------------------------------------------------------------------------


def test_lm_head_gradient_is_accumulated_in_fp32_and_cast_once(monkeypatch):
    """bf16, 32 chunks: the error of dW against float64 is within 1.2x that of the same math done as one bf16 GEMM
    (dz^T h over all rows, fp32 accumulation inside, one rounding). The bf16 accumulation the kernel had (one
    rounding per chunk, `grad_w.addmm_`) is measured too, to show that the bound tells them apart."""
    monkeypatch.setattr(kernels, "HIDDEN_MIN_ROWS", 1)
    N, H, V, M, rows = 4096, 128, 384, K + 1, 128
    g = torch.Generator().manual_seed(0)
    h = torch.randn(N, H, generator=g).bfloat16()
    w = (torch.randn(V, H, generator=g) * 0.3).bfloat16()
    idx = torch.randint(0, V, (N, M), generator=g)
    up = torch.randn(N, M, generator=g)
    hh, ww = h.clone().requires_grad_(True), w.clone().requires_grad_(True)
    calls = []
    add = kernels._add_grad_w
    monkeypatch.setattr(kernels, "_add_grad_w", lambda acc, *a: calls.append(acc.dtype) or add(acc, *a))
    out, _ = kernels.student_logprobs_at_from_hidden(hh, ww, idx, chunk_bytes=rows * 4 * V)
    out.backward(up)
    assert calls == [torch.float32] * (N // rows) and len(calls) >= 32 and ww.grad.dtype == torch.bfloat16

    h64, w64 = h.double(), w.double().requires_grad_(True)
    torch.log_softmax(h64 @ w64.T, -1).gather(-1, idx).backward(up.double())
    ref = w64.grad
    # one bf16 GEMM: the same bf16 logits, dz in fp32 rounded to bf16 (as the kernel's), dW = dz^T h at once
    p = torch.softmax((h @ w.T).float(), -1)
    dz = (torch.zeros(N, V).scatter_add_(-1, idx, up) - p * up.sum(-1, keepdim=True)).bfloat16()
    single = dz.T @ h
    per_chunk_bf16 = torch.zeros(V, H, dtype=torch.bfloat16)
    for s in range(0, N, rows):
        per_chunk_bf16.addmm_(dz[s:s + rows].T, h[s:s + rows])

    def err(x):
        return float((x.double() - ref).norm() / ref.norm())

    ratio, old_ratio = err(ww.grad) / err(single), err(per_chunk_bf16) / err(single)
    assert ratio <= 1.2, (err(ww.grad), err(single), ratio)  # measured 1.000
    assert old_ratio > 1.2, old_ratio  # measured 1.63


# --------------------------------------------------------------------------------------------------
# Launches: aten ops of a 16k-token bf16 micro-batch on the CUDA sizing
# --------------------------------------------------------------------------------------------------

# Ops per chunk, read off the kernels (bf16 lm head, temperature 1, entropy on) on the CUDA sizing: one matmul, one
# fp32 piece and one entropy per chunk. Launches | views (views dispatch but launch nothing):
#   student forward (_HiddenGatherLogSoftmax.forward), 9 | 8 = 17:
#       mm (h W^T into the buffer), copy_ (the chunk to fp32), _log_softmax.out (in place), gather.out, exp, mul_,
#       nansum, neg_ (the entropy), copy_ (the entropy into its rows) | slice x7 (h, z, the piece, f, index, out,
#       entropy), permute (W^T)
#   student backward, 10 | 11 = 21 (the forward's last chunk skips its mm, slice and permute):
#       mm (z again), copy_ (to fp32), _softmax.out, sum, neg_, mul_, scatter_add_, copy_ (dz to bf16),
#       mm (dh = dz W), addmm.dtype_out (dW += dz^T h, bf16 GEMM into fp32) | slice x9, permute x2
#   teacher (teacher_stats_from_hidden), 10 | 12 = 22:
#       mm, copy_, _log_softmax.out, topk.values, gather.out, exp, mul_, nansum, neg_, copy_ | slice x9, permute,
#       unsqueeze x2
#   logits path: forward 8 | 5 = 13, backward 7 | 5 = 12, teacher_stats 9 | 9 = 18.
# Fixed per call (buffers, the checks, the one read): at most 40 ops (measured 6 to 33).
# Bound per pass: PER_CHUNK x chunks + FIXED, chunks = 16 (16,384 rows / 1,024).
PER_CHUNK = {"student_fwd": 17, "student_bwd": 21, "teacher": 22, "logits_fwd": 13, "logits_bwd": 12,
             "logits_teacher": 18}
FIXED = 40


def test_launch_count_of_a_16k_token_bf16_micro_batch_on_the_cuda_sizing(cuda_sizing_on_meta):
    chunks = math.ceil(TOKENS / chunk_sizing("cuda", torch.bfloat16, QWEN3_V, kind="student").rows)
    assert chunks == 16
    h, w, idx = _meta_batch()
    counts = {}
    with CountOps() as c:
        out, _ = kernels.student_logprobs_at_from_hidden(h, w, idx, with_entropy=True)
    counts["student_fwd"] = c
    with CountOps() as c:
        out.backward(torch.zeros_like(out))
    counts["student_bwd"] = c
    with CountOps() as c:
        kernels.teacher_stats_from_hidden(h.detach(), w.detach(), idx[:, 0], K)
    counts["teacher"] = c
    z = torch.empty(TOKENS, QWEN3_V, dtype=torch.bfloat16, device="meta", requires_grad=True)
    with CountOps() as c:
        lq, _ = kernels.student_logprobs_at(z, idx, with_entropy=True)
    counts["logits_fwd"] = c
    with CountOps() as c:
        lq.backward(torch.zeros_like(lq))
    counts["logits_bwd"] = c
    with CountOps() as c:
        kernels.teacher_stats(z.detach(), idx[:, 0], K)
    counts["logits_teacher"] = c
    for name, c in counts.items():
        bound = PER_CHUNK[name] * chunks + FIXED
        assert c.total <= bound, (name, c.total, bound, c.ops.most_common(12))
    # the whole from_hidden micro-batch (student forward and backward, teacher): about a thousand ops (measured
    # 290 + 342 + 385 = 1,017; the 32/8-row sub-chunks dispatched 20,108 + 6,437 + 23,830 = 50,375)
    assert sum(counts[k].total for k in ("student_fwd", "student_bwd", "teacher")) <= 1100
    assert counts["student_bwd"].ops[aten.addmm.dtype_out] == chunks  # dW: one 16-bit GEMM into fp32 per chunk


# --------------------------------------------------------------------------------------------------
# Host syncs: at most one per micro-batch and pass
# --------------------------------------------------------------------------------------------------


def _objective_inputs(n=TOKENS, dev="meta"):
    ids = torch.zeros(1, n, dtype=torch.long, device=dev)
    old = torch.zeros(1, n, device=dev)
    t_ids = torch.zeros(1, n, K, dtype=torch.long, device=dev)
    t_lp = torch.zeros(1, n, K, device=dev)
    mask = torch.ones(1, n, dtype=torch.bool, device=dev)
    return ids, old, t_ids, t_lp, mask


@pytest.mark.parametrize("gate", ["hard", "soft", "quantile"])
@pytest.mark.parametrize("exact_teacher", [True, False])
def test_one_host_sync_per_pass(cuda_sizing_on_meta, gate, exact_teacher):
    """The kernels and the objective: one read in each forward pass (the bad-input checks and the metrics in one
    transfer), none in the backward passes."""
    h, w, idx = _meta_batch()
    ids, old, t_ids, t_lp, mask = _objective_inputs()
    exact = dict(teacher_entropy=torch.zeros(1, TOKENS, device="meta"),
                 teacher_token_logprobs=torch.zeros(1, TOKENS, device="meta")) if exact_teacher else {}
    z = torch.empty(1, TOKENS, QWEN3_V, dtype=torch.bfloat16, device="meta", requires_grad=True)
    for name, fwd in (
        ("eopd_loss_from_hidden", lambda: eopd_loss_from_hidden(h[None], w, ids, old, t_ids, t_lp, mask, gate=gate,
                                                                **exact)[0]),
        ("eopd_loss", lambda: eopd_loss(z, ids, old, t_ids, t_lp, mask, gate=gate, **exact)[0]),
        ("student_logprobs_at_from_hidden", lambda: kernels.student_logprobs_at_from_hidden(h, w, idx)[0].sum()),
        ("student_logprobs_at", lambda: kernels.student_logprobs_at(z[0], idx)[0].sum()),
    ):
        with CountOps() as c:
            loss = fwd()
        assert len(c.syncs) == 1, (name, c.syncs)
        with CountOps() as c:
            loss.backward()
        assert c.syncs == [], (name, c.syncs)
    for name, fn in (("teacher_stats_from_hidden", lambda: kernels.teacher_stats_from_hidden(h, w, idx[:, 0], K)),
                     ("teacher_stats", lambda: kernels.teacher_stats(z[0], idx[:, 0], K))):
        with CountOps() as c:
            fn()
        assert len(c.syncs) == 1, (name, c.syncs)


def test_the_loss_pieces_verl_calls_read_once_each(cuda_sizing_on_meta):
    """eopd_token_losses and eopd_stats called on their own: one read each (they were 2 and ~40). Inside verl's
    registered loss (integration/loss.py) they share the micro-batch's one read: tests/test_loss_syncs.py."""
    ids, old, t_ids, t_lp, mask = _objective_inputs()
    ent, tok, fkl = (torch.zeros(1, TOKENS, device="meta") for _ in range(3))
    with CountOps() as c:
        _, parts = eopd_token_losses(old, old, tok, fkl, ent, mask)
    assert len(c.syncs) == 1, c.syncs
    with CountOps() as c:
        stats = eopd_stats(parts, fkl=fkl, teacher_entropy=ent, old_log_probs=old, teacher_token_logprobs=tok,
                           teacher_topk_mass=fkl, in_topk=mask, student_entropy=ent,
                           teacher_entropy_bounds=(ent, ent), token_fallback=mask, entropy_threshold=0.8)
    assert len(c.syncs) == 1, c.syncs
    assert all(isinstance(v, float) for v in stats.values())


def test_no_host_read_of_values_on_cpu_either(monkeypatch):
    """Real values on CPU (branches the meta run cannot take): no `.item()` / `bool(t)` / nonzero in a pass
    (the one read is a copy, invisible on CPU)."""
    monkeypatch.setattr(kernels, "HIDDEN_MIN_ROWS", 4)
    g = torch.Generator().manual_seed(0)
    n, H, V = 24, 16, 50
    h = torch.randn(1, n, H, generator=g, requires_grad=True)
    w = torch.randn(V, H, generator=g, requires_grad=True)
    ids = torch.randint(0, V, (1, n), generator=g)
    t_lp, t_ids = torch.log_softmax(torch.randn(1, n, V, generator=g), -1).topk(K)
    t_lp[0, :3, -2:] = -math.inf  # padded top-k entries
    old = torch.randn(1, n, generator=g) - 3
    mask = torch.rand(1, n, generator=g) > 0.2
    # the kernels' once-per-process probes (a host read each, not per pass), warmed here so that the test does not
    # depend on an earlier test of the process having met them: both fused in-place checks and the mixed addmm's
    for op in ("_softmax", "_log_softmax"):
        kernels._fused_in_place(op, torch.zeros(2, 3))
    for dtype in (torch.float32, torch.bfloat16):
        kernels._mixed_addmm_ok(torch.device("cpu"), dtype)
    kernels.teacher_stats_from_hidden(h.detach(), w.detach(), ids, K)
    for gate in ("hard", "quantile"):
        with CountOps() as c:
            loss, stats = eopd_loss_from_hidden(h, w, ids, old, t_ids, t_lp, mask, gate=gate, gate_quantile=0.3,
                                                chunk_bytes=4 * 4 * V)
            loss.backward()
            kernels.teacher_stats_from_hidden(h.detach(), w.detach(), ids, K, chunk_bytes=4 * 4 * V)
        assert c.syncs == [], (gate, c.syncs)
        assert 0 <= stats["gate_frac"] <= 1


def test_a_bad_input_is_reported_by_its_own_message_after_the_one_read():
    """The checks read at the end keep their order: the sampled ids' range before NaN logits; and a later failure
    caused by a bad input (here the gather of an out-of-range top-k id) reports the bad input."""
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(2, 5, 30, generator=g)
    logits[1, 2, 0] = math.nan
    ids = torch.randint(0, 30, (2, 5), generator=g)
    ts = kernels.teacher_stats(torch.randn(2, 5, 30, generator=g), ids, 4)
    args = (torch.zeros(2, 5), ts["topk_ids"], ts["topk_logprobs"], torch.ones(2, 5, dtype=torch.bool))
    with pytest.raises(ValueError, match="sampled_ids must lie"):
        eopd_loss(logits, ids + 100, *args)
    with pytest.raises(ValueError, match=r"student_logits holds NaN or \+inf logits at row 7"):
        eopd_loss(logits, ids, *args)
    with pytest.raises(ValueError, match=r"sampled_ids must lie in \[0, 30\); got range"):
        kernels.teacher_stats(logits, ids + 100, 4)
