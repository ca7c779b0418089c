#!/usr/bin/env python
"""Every CUDA check of the EOPD kernels in one script, for a session that is lent a GPU (issue 23, item 6).

Needs torch only (Triton and transformers may be there; Ray, vLLM and verl are not needed: verl's column of the
benchmarks runs only when verl imports). Reads the package from the working tree (the repository root is put on
sys.path), so the device machine needs no install. Writes one JSON file with every figure; exits 1 when a gating
check (numeric or count) fails, after writing it. docs/gpu_checks.md says what each check shows.

    python scripts/gpu_checks.py                       # on a GPU: every check, JSON to $OUT/gpu_checks.json
    python scripts/gpu_checks.py --dry-run             # the plan (names, sizes, budgets); touches no GPU
    python scripts/gpu_checks.py --device cpu --tiny   # the same code path at toy sizes on CPU (the tests)

Checks (kind: what it compares):
  env                        info     torch / CUDA / Triton / transformers / verl versions, the device
  numeric_teacher_stats      numeric  teacher_stats on bf16 logits vs float64 (top-k, entropy, log p(y))
  numeric_teacher_hidden     numeric  teacher_stats_from_hidden (bf16 lm head) vs float64
  numeric_loss               numeric  eopd_loss on bf16 logits: loss and dL/dlogits vs float64
  numeric_loss_hidden        numeric  eopd_loss_from_hidden (bf16): loss, dL/dh, dL/dW vs float64
  kernel_launches            count    CUDA kernels launched per pass (torch.profiler) vs issue 23 item 3's bound
  host_syncs                 count    host syncs per pass (sync debug mode and a dispatch mode): <= 1 fwd, 0 bwd
  bench_loss                 bench    scripts/bench_loss.py's CUDA columns: time, extra peak, ratios
  bench_hidden               bench    scripts/bench_hidden.py's CUDA columns: time, extra peak, ratios

Error bounds are worst-case forward-error bounds from the unit roundoffs (fp32 u = 2^-24, bf16 u = 2^-8) and the
reduction lengths (gamma_n = n u / (1 - n u), Higham eq. 3.4), as tests/tolerances.py derives its bounds; each
check reports the largest |error| / bound (pass: <= 1) next to the errors themselves.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import copy
import datetime as _dt
import gc
import importlib.util
import json
import math
import os
import platform
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from typing import Callable, Optional

T_START = time.monotonic()  # the global deadline counts from here (before torch is imported)
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
for _p in (ROOT, os.path.join(ROOT, "scripts")):
    if _p not in sys.path:
        sys.path.insert(0, _p)

SCHEMA = "verl_eopd.gpu_checks/1"
DEFAULT_DEADLINE_S = 450.0  # the whole run stops cleanly before this (the issue: <= 8 min on one GPU)
HARD_STOP_GRACE_S = 20.0  # the watchdog writes the JSON and exits this long after the deadline
QWEN3_V, QWEN3_H = 151_936, 2_048
U32, U16 = 2.0 ** -24, 2.0 ** -8
ALPHA = 1.0  # fkl_coef of the paper's settings (EOPDSettings default), used by the checks' inputs

# issue 23 item 3 (tests/test_kernels_gpu_sizing.py): aten ops per chunk and per call on the CUDA sizing. A test
# (tests/test_gpu_checks.py) keeps these equal to that file's.
PER_CHUNK = {"student_fwd": 17, "student_bwd": 21, "teacher": 22, "logits_fwd": 13, "logits_bwd": 12,
             "logits_teacher": 18}
FIXED = 40


def gamma(n: int, u: float = U32) -> float:
    """gamma_n = n u / (1 - n u): the relative error bound of a length-n sum or dot product."""
    assert n * u < 1, (n, u)
    return n * u / (1 - n * u)


# --------------------------------------------------------------------------------------------------
# The plan: checks, sizes, budgets
# --------------------------------------------------------------------------------------------------


@dataclass
class Check:
    name: str
    kind: str  # info | numeric | count | bench
    budget_s: float  # on a GPU; --tiny uses it too (the tiny runs take a fraction of it)
    sizes: dict
    tiny: dict
    what: str
    fn: Optional[Callable] = None

    @property
    def gating(self) -> bool:
        return self.kind in ("numeric", "count")


_NUM = dict(N=2560, V=QWEN3_V, H=QWEN3_H, K=16)  # 2,560 rows: chunks of 1,024, 1,024 and 512 on CUDA
_NUM_TINY = dict(N=48, V=320, H=24, K=8)

CHECKS: list[Check] = [
    Check("env", "info", 10, {}, {}, "versions of torch, CUDA, Triton, transformers, verl; the device"),
    Check("numeric_teacher_stats", "numeric", 25, dict(_NUM), dict(_NUM_TINY),
          "teacher_stats(bf16 logits [N, V]) vs float64: top-k values and ids, entropy, log p(y)"),
    Check("numeric_teacher_hidden", "numeric", 25, dict(_NUM), dict(_NUM_TINY),
          "teacher_stats_from_hidden(bf16 h [N, H], W [V, H]) vs float64 of h W^T"),
    Check("numeric_loss", "numeric", 35, dict(_NUM), dict(_NUM_TINY),
          "eopd_loss on bf16 logits [1, N, V]: the loss and dL/dlogits (bf16) vs float64 (dense_reference)"),
    Check("numeric_loss_hidden", "numeric", 45, dict(_NUM), dict(_NUM_TINY),
          "eopd_loss_from_hidden (bf16 h, W): the loss, dL/dh and dL/dW vs float64 (dense_reference)"),
    Check("kernel_launches", "count", 40, dict(N=16_384, V=QWEN3_V, H=QWEN3_H, K=16),
          dict(N=64, V=320, H=24, K=8),
          "CUDA kernels launched (torch.profiler) per pass of a bf16 micro-batch vs item 3's aten-op bound"),
    Check("host_syncs", "count", 40, dict(N=16_384, V=QWEN3_V, H=QWEN3_H, K=16), dict(N=64, V=320, H=24, K=8),
          "host syncs per pass (torch.cuda sync debug mode; a TorchDispatchMode): <= 1 per forward, 0 per backward"),
    Check("bench_loss", "bench", 110, dict(T=[4096, 16384], K=16, V=QWEN3_V, dtype="bf16", reps=3),
          dict(T=[32], K=8, V=320, dtype="bf16", reps=1),
          "scripts/bench_loss.py worker: eopd vs naive_dense (vs verl_native when verl imports): time, extra peak"),
    Check("bench_hidden", "bench", 90, dict(T=[4096, 16384], H=QWEN3_H, K=16, V=QWEN3_V, dtype="bf16", reps=3),
          dict(T=[32], H=24, K=8, V=320, dtype="bf16", reps=1),
          "scripts/bench_hidden.py worker: hidden vs logits, teacher_hidden vs teacher_logits: time, extra peak"),
]


# --------------------------------------------------------------------------------------------------
# Run state: the JSON, the deadline, the watchdog
# --------------------------------------------------------------------------------------------------


class Run:
    def __init__(self, args):
        self.args = args
        self.t0 = T_START if getattr(args, "deadline_from_start", False) else time.monotonic()
        self.deadline = args.deadline_s
        self.lock = threading.Lock()
        self.current: Optional[str] = None
        self.written = False
        self.timer: Optional[threading.Timer] = None
        self.doc = {
            "schema": SCHEMA,
            "started_utc": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
            "mode": {"device": args.device, "tiny": bool(args.tiny), "deadline_s": self.deadline,
                     "only": args.only},
            "env": {},
            "checks": {},
        }

    def elapsed(self) -> float:
        return time.monotonic() - self.t0

    def left(self) -> float:
        return self.deadline - self.elapsed()

    def record(self, name: str, entry: dict) -> None:
        with self.lock:
            self.doc["checks"][name] = entry

    def finish(self, killed: Optional[str] = None) -> int:
        """Fills the summary, writes the JSON once, returns the exit code."""
        with self.lock:
            if self.written:
                return self.doc["exit_code"]
            if self.timer is not None and threading.current_thread() is not self.timer:
                self.timer.cancel()
            doc = copy.deepcopy(self.doc)
            if killed:
                doc["checks"][killed] = {**doc["checks"].get(killed, {}), "status": "skipped", "ok": None,
                                         "reason": f"still running at the global deadline ({self.deadline:.0f} s "
                                                   f"+ {HARD_STOP_GRACE_S:.0f} s): stopped by the watchdog"}
            checks = doc["checks"]
            for c in CHECKS:  # not reached (the watchdog stopped the run first)
                checks.setdefault(c.name, {"kind": c.kind, "gating": c.gating, "budget_s": c.budget_s,
                                           "sizes": c.tiny if self.args.tiny else c.sizes, "what": c.what,
                                           "status": "skipped", "ok": None,
                                           "reason": "not reached: the run was stopped before it"})
            doc["checks"] = checks = {c.name: checks[c.name] for c in CHECKS}
            doc["failed"] = [n for n, c in checks.items() if c.get("status") in ("fail", "error") and c.get("gating")]
            doc["skipped"] = [n for n, c in checks.items() if c.get("status") == "skipped"]
            doc["passed"] = [n for n, c in checks.items() if c.get("status") == "pass"]
            doc["wall_s"] = round(self.elapsed(), 2)
            doc["finished_utc"] = _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
            doc["exit_code"] = 1 if doc["failed"] else 0
            self.doc = doc
            self.written = True
        out = self.args.out
        if out:
            os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
            tmp = out + ".tmp"
            with open(tmp, "w") as f:
                json.dump(doc, f, indent=1, default=_jsonable)
            os.replace(tmp, out)
        return doc["exit_code"]


def _jsonable(x):
    if isinstance(x, float) and not math.isfinite(x):
        return str(x)
    try:
        import torch

        if isinstance(x, torch.Tensor):
            return x.tolist()
        if isinstance(x, (torch.dtype, torch.device)):
            return str(x)
    except ImportError:
        pass
    return str(x)


def _watchdog(run: Run) -> threading.Thread:
    """At the deadline + grace: write the JSON (the running check marked stopped) and exit 3 at once."""

    def fire():
        code = run.finish(killed=run.current)
        print(f"gpu_checks: global deadline reached during {run.current!r}; wrote {run.args.out}", flush=True)
        os._exit(3 if code == 0 else code)

    t = threading.Timer(max(0.0, run.left() + HARD_STOP_GRACE_S), fire)
    t.daemon = True
    run.timer = t
    t.start()
    return t


class Budget:
    """A check's time: `left()` seconds of its budget (never past the global deadline)."""

    def __init__(self, run: Run, budget_s: float):
        self.run, self.t0, self.budget = run, time.monotonic(), budget_s

    def elapsed(self) -> float:
        return time.monotonic() - self.t0

    def left(self) -> float:
        return min(self.budget - self.elapsed(), self.run.left())


# --------------------------------------------------------------------------------------------------
# Helpers
# --------------------------------------------------------------------------------------------------


def _sync(dev) -> None:
    import torch

    if torch.device(dev).type == "cuda":
        torch.cuda.synchronize()


def _free(dev) -> None:
    """Between checks and cases on a GPU: drop the dead tensors and the allocator's cache (each case's peak
    memory is measured from its own baseline). Nothing on CPU (gc.collect costs ~0.2 s there with torch loaded)."""
    import torch

    if torch.device(dev).type == "cuda":
        gc.collect()
        torch.cuda.empty_cache()


@contextlib.contextmanager
def _fp32_gemm_reductions(dev):
    """On CUDA, bf16 GEMMs with fp32 reductions only (torch.backends.cuda.matmul.
    allow_bf16_reduced_precision_reduction = False, put back after): the numeric checks' bounds take a bf16 GEMM
    as fp32 accumulation then one rounding; with the flag on (torch's default) cuBLAS may round split-K partial
    sums to bf16, by an amount that depends on its split count, which no bound here can know."""
    import torch

    if torch.device(dev).type != "cuda":
        yield
        return
    m = torch.backends.cuda.matmul
    prev = m.allow_bf16_reduced_precision_reduction
    m.allow_bf16_reduced_precision_reduction = False
    try:
        yield
    finally:
        m.allow_bf16_reduced_precision_reduction = prev


def _dense_reference():
    """tests/dense_reference.py: the float64 references written from the paper's formulas."""
    spec = importlib.util.spec_from_file_location("eopd_dense_reference", os.path.join(ROOT, "tests",
                                                                                        "dense_reference.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _ratio_fig(err, bound) -> dict:
    """max |err|, and the largest err / bound (pass: <= 1), where it is, the bound there."""
    import torch

    err, bound = err.double().reshape(-1), bound.double().reshape(-1)
    r = err / bound.clamp_min(1e-300)
    i = int(torch.argmax(r)) if r.numel() else 0
    return {"max_abs_err": float(err.max()) if err.numel() else 0.0,
            "max_err_over_bound": float(r[i]) if r.numel() else 0.0,
            "bound_at_worst": float(bound[i]) if r.numel() else 0.0,
            "median_bound": float(bound.median()) if r.numel() else 0.0}


def _row_range(z64):
    """R_n = max_v z_nv - min_v z_nv of each row (float64)."""
    return z64.amax(-1) - z64.amin(-1)


def _fp32_logsoftmax_bound(z64, V: int, D=0.0):
    """Bound per row on |fl(log softmax(z'))_v - log softmax(z')_v| in fp32 on inputs z' exact in fp32, with
    d = z' - max z' (rounded: u |d|), e = exp(d) (2u: CUDA's expf is within 2 ulp, plus |d| u carried), the
    length-V sum S (gamma_V, plus the e's errors weighted by q: <= u (2 + R)), log S (2u |log S|, |log S| <= ln V)
    and log p = d - log S (u |log p|, <= u (R + ln V)); R = the row's range:
        2 gamma_{V+1} + 4 u (1 + ln V + R)   (slack for the second-order terms).
    z' = z when the logits are the inputs; z' within D of z (per row) when a bf16 GEMM made them: R grows by 2 D."""
    return 2 * gamma(V + 1) + 4 * U32 * (1 + math.log(V) + _row_range(z64) + 2 * D)


def _matmul_bf16_bound(h64, w64, z64, H: int):
    """Bound per element on |fl_bf16(h W^T) - h W^T| for a bf16 GEMM with fp32 accumulation over H terms, then
    rounded to bf16: (1 + u16) gamma_H (|h| |W|^T) + u16 |z|."""
    return (1 + U16) * gamma(H) * (h64.abs() @ w64.abs().T) + U16 * z64.abs()


def _logp_bound(z64, logp64, V: int, dz=None):
    """Bound per element [N, V] on the error of the kernel's log p = log softmax(z) (float64 on the exact z).

    Logits given (dz None): the fp32 part alone, per row (_fp32_logsoftmax_bound). Logits from a bf16 GEMM, off by
    at most dz_v each (_matmul_bf16_bound): log p_v = z_v - lse(z) moves by at most dz_v + |d lse|, and
    |d lse| <= e^{2D} sum_v q_v dz_v (the gradient of lse is q; along the segment q grows by at most e^{2D},
    D = max_v dz_v), plus the fp32 part on logits within D of z."""
    if dz is None:
        return _fp32_logsoftmax_bound(z64, V)[:, None].expand_as(z64)
    D = dz.amax(-1)
    lse = (2 * D).exp() * (logp64.exp() * dz).sum(-1)
    return dz + (lse + _fp32_logsoftmax_bound(z64, V, D))[:, None]


def _entropy_bound(logp64, Elp, V: int):
    """|dH| for H = -sum_v p_v log p_v when each log p_v is off by at most Elp_v: with p'_v = p_v e^d_v,
    |p' log p' - p log p| <= p_v |log p_v| expm1(Elp_v) + p_v Elp_v e^Elp_v; the products and the length-V sum in
    fp32 add gamma_{V+2} (H + 1). Returns (bound [N], H [N])."""
    p = logp64.exp()
    H64 = -(p * logp64).sum(-1)
    b = (p * (-logp64) * Elp.expm1() + p * Elp * Elp.exp()).sum(-1) + gamma(V + 2) * (H64 + 1)
    return b, H64


# --------------------------------------------------------------------------------------------------
# Numeric checks
# --------------------------------------------------------------------------------------------------


def _gen(dev, seed: int):
    import torch

    g = torch.Generator(device=dev)
    g.manual_seed(seed)
    return g


def _teacher_logits(N: int, V: int, dev, seed: int):
    """bf16 logits [N, V]: N(0, 2^2), and a spike of +15 at y on every other row (confident rows)."""
    import torch

    g = _gen(dev, seed)
    z = torch.randn(N, V, generator=g, device=dev).mul_(2.0)
    y = torch.randint(0, V, (N,), generator=g, device=dev)
    rows = torch.arange(0, N, 2, device=dev)
    z[rows, y[rows]] += 15.0
    return z.bfloat16(), y


def _hidden_inputs(N: int, V: int, H: int, dev, seed: int):
    """bf16 h [N, H], W [V, H] with logits h W^T of std ~2 and every other row confident (h += 4 W[y])."""
    import torch

    g = _gen(dev, seed)
    w = torch.randn(V, H, generator=g, device=dev).mul_(2.0 / H ** 0.5)
    h = torch.randn(N, H, generator=g, device=dev)
    y = torch.randint(0, V, (N,), generator=g, device=dev)
    h[::2] += 4.0 * w[y[::2]]
    return h.bfloat16(), w.bfloat16(), y


def _compare_teacher(out: dict, y, logp64, Elp, K: int, V: int) -> dict:
    """Figures of teacher_stats' outputs against float64 log p, Elp [N, V] the bound on each log p's error."""
    ids = out["topk_ids"].long()
    ref_vals, _ = logp64.topk(K, dim=-1)
    Erow = Elp.amax(-1, keepdim=True).expand(-1, K)
    Eh, H64 = _entropy_bound(logp64, Elp, V)
    return {
        # the kernel's value at each id it returns, against the exact log p at that id
        "topk_logprobs": _ratio_fig((out["topk_logprobs"].double() - logp64.gather(-1, ids)).abs(),
                                    Elp.gather(-1, ids)),
        # its ids are a top-k of the exact log p up to the error: the exact values at them within 2 max_v Elp of the
        # exact k largest (ties and near-ties may swap)
        "topk_ids": _ratio_fig((logp64.gather(-1, ids) - ref_vals).abs(), 2 * Erow),
        "entropy": _ratio_fig((out["entropy"].double() - H64).abs(), Eh),
        "token_logprobs": _ratio_fig((out["token_logprobs"].double() - logp64.gather(-1, y[:, None])[:, 0]).abs(),
                                     Elp.gather(-1, y[:, None])[:, 0]),
        "topk_descending": bool((out["topk_logprobs"][:, :-1] >= out["topk_logprobs"][:, 1:]).all()),
        "entropy_range_nats": [float(H64.min()), float(H64.max())],
    }


def check_numeric_teacher_stats(run: Run, sizes: dict, dev, budget: Budget) -> dict:
    import torch

    from verl_eopd.core import teacher_stats

    N, V, K = sizes["N"], sizes["V"], sizes["K"]
    z, y = _teacher_logits(N, V, dev, seed=1)
    chunk = {} if torch.device(dev).type == "cuda" else {"chunk_bytes": 16 * 4 * V}  # CPU: 16-row chunks
    out = teacher_stats(z, y, K, **chunk)
    _sync(dev)
    z64 = z.double()
    logp64 = torch.log_softmax(z64, -1)
    figs = _compare_teacher(out, y, logp64, _logp_bound(z64, logp64, V), K, V)
    figs["bound_note"] = "log p: 2 gamma_{V+1} + 4 u (1 + ln V + row range) (fp32 on exact bf16 inputs)"
    return _numeric_verdict(figs)


def check_numeric_teacher_hidden(run: Run, sizes: dict, dev, budget: Budget) -> dict:
    import torch

    from verl_eopd.core import teacher_stats_from_hidden

    N, V, H, K = sizes["N"], sizes["V"], sizes["H"], sizes["K"]
    h, w, y = _hidden_inputs(N, V, H, dev, seed=2)
    out = teacher_stats_from_hidden(h, w, y, K)
    _sync(dev)
    h64, w64 = h.double(), w.double()
    z64 = h64 @ w64.T
    logp64 = torch.log_softmax(z64, -1)
    dz = _matmul_bf16_bound(h64, w64, z64, H)
    Elp = _logp_bound(z64, logp64, V, dz)
    del z64
    figs = _compare_teacher(out, y, logp64, Elp, K, V)
    figs["max_logit_error_bound"] = float(dz.max())
    figs["bound_note"] = ("log p_v: dz_v + e^{2D} sum_v q_v dz_v + fp32 part, dz_v = (1 + u16) gamma_H (|h||W|^T)_v "
                          "+ u16 |z_v| (the bf16 GEMM's rounding of the logits)")
    return _numeric_verdict(figs)


def _numeric_verdict(figs: dict) -> dict:
    worst = max(v["max_err_over_bound"] for v in figs.values() if isinstance(v, dict) and "max_err_over_bound" in v)
    ok = worst <= 1.0 and figs.get("topk_descending", True)
    return {"ok": ok, "figures": {**figs, "worst_err_over_bound": worst}}


def _loss_inputs(N: int, V: int, K: int, lq_y64, dev, seed: int):
    """The objective's inputs around the student's exact log q(y) [N] (float64): a teacher from random logits
    (its top-k, exact entropy and log p(y)), old log-probs = log q(y) + N(0, 0.3^2) (some ratios clipped), and a
    mask with ~10% of the tokens off."""
    import torch

    g = _gen(dev, seed)
    t = torch.randn(N, V, generator=g, device=dev).mul_(2.5)
    half = torch.arange(0, N, 2, device=dev)
    t[half, torch.randint(0, V, (half.numel(),), generator=g, device=dev)] += 12.0  # low-entropy rows
    t_logp = torch.log_softmax(t, -1)
    t_lp, t_ids = t_logp.topk(K, dim=-1)
    t_ent = -(t_logp.exp() * t_logp).sum(-1)
    del t
    old = (lq_y64 + 0.3 * torch.randn(N, generator=g, device=dev, dtype=torch.float64)).float()
    mask = torch.rand(N, generator=g, device=dev) > 0.1
    return dict(t_ids=t_ids, t_lp=t_lp, t_ent=t_ent, t_logp=t_logp, old=old, mask=mask)


def _loss_bound(x: dict, lq64, y, Elp, K: int) -> tuple:
    """Bound on |loss - loss64| given Elp [N, V], a bound on the error of each student log q, and per token the
    bounds the gradient needs. All float64 on the reference's values.

        A = log pT(y) - old (fp32: u |A|), r = exp(log q(y) - old): |dr| <= r (expm1(Elp_y) + 3u)
        RKL = max(-r A, -clip(r) A): dRKL <= |A| r (expm1(Elp_y) + 4u) + 2u |RKL|
        FKL = sum_j pt_j (log pt_j - log q_j):
            dFKL <= sum_j pt_j Elp_j + gamma_{2K+4} sum_j pt_j (|log pt_j| + |log q_j|)
        loss = (1/n) sum_t m_t (RKL_t + alpha g_t FKL_t), n = sum_t m_t: sum over n terms, gamma_{n+2}
    Returns (loss bound, S [N], dG [N]): S_t = sum_j |dL/dlq_tj| <= (r |A| + alpha g) / n; dG_t bounds the error of
    the kernel's dL/dlq_t: the RKL part r |A| / n (expm1(Elp_y) + 8u), the FKL part (alpha g pt_j / n: free of
    log q; the renormalised top-k p~ in fp32) gamma_{2K+8}, plus r |A| / n where r lies within its own error of a
    clip edge 1 +- eps (there the kernel and the reference may take different branches of the max, and dL/dlq(y)
    jumps between -r A / n and 0).
    """
    import torch

    m = x["mask"].double()
    n = float(m.sum().clamp_min(1))
    lq_y = lq64.gather(-1, y[:, None])[:, 0]
    Ey = Elp.gather(-1, y[:, None])[:, 0]
    old = x["old"].double()
    A = x["t_logp"].gather(-1, y[:, None])[:, 0].double() - old
    r = (lq_y - old).exp()
    eps = 0.2  # clip_ratio_low = clip_ratio_high (EOPDSettings' defaults, the paper's)
    rkl = torch.maximum(-r * A, -r.clamp(1 - eps, 1 + eps) * A)
    pt = x["t_lp"].double().exp()
    pt = pt / pt.sum(-1, keepdim=True)
    ids = x["t_ids"].long()
    lq_k = lq64.gather(-1, ids)
    fkl = (pt * (pt.log() - lq_k)).sum(-1)
    g = (x["t_ent"].double() > 0.8).double()
    rel_r = Ey.expm1() + 4 * U32
    d_rkl = A.abs() * r * rel_r + 2 * U32 * rkl.abs()
    d_fkl = (pt * Elp.gather(-1, ids)).sum(-1) + gamma(2 * K + 4) * (pt * (pt.log().abs() + lq_k.abs())).sum(-1)
    per_tok = m * (d_rkl + ALPHA * g * d_fkl)
    terms = m * (rkl + ALPHA * g * fkl)
    bound = float(per_tok.sum() / n + gamma(int(n) + 2) * terms.abs().sum() / n)
    S = m * (A.abs() * r + ALPHA * g) / n
    band = r * rel_r
    near_edge = ((r - (1 - eps)).abs() <= band) | ((r - (1 + eps)).abs() <= band)
    dG = m * A.abs() * r / n * (rel_r + 4 * U32 + near_edge.double() * (1 + rel_r)) + gamma(2 * K + 8) * S
    return bound, S, dG


def _dz_bound(dz64, logp64, Elp, S, dG, index):
    """Bound per element on the bf16 gradient of the logits, dz_v = sum_j G_j 1[v = i_j] - q_v sum_j G_j, computed
    in fp32 from G (error dG per token) and from q = exp(log q) (relative error expm1(Elp_v) + 2u), then rounded to
    bf16:  u16 |dz| + (1 + u16) [(dG + gamma_{K+2} S) (1[v in index] + q_v) + S q_v (expm1(Elp_v) + 2u)]."""
    import torch

    q = logp64.exp()
    ind = torch.zeros_like(q).scatter_(-1, index.long(), 1.0)
    K1 = index.shape[-1]
    S, dG = S[:, None], dG[:, None]
    return U16 * dz64.abs() + (1 + U16) * ((dG + gamma(K1 + 2) * S) * (ind + q) + S * q * (Elp.expm1() + 2 * U32))


def check_numeric_loss(run: Run, sizes: dict, dev, budget: Budget) -> dict:
    import torch

    from verl_eopd import EOPDSettings
    from verl_eopd.core import eopd_loss

    dense = _dense_reference()
    N, V, K = sizes["N"], sizes["V"], sizes["K"]
    z, y = _teacher_logits(N, V, dev, seed=3)
    z64 = z.double()
    lq64 = torch.log_softmax(z64, -1)
    x = _loss_inputs(N, V, K, lq64.gather(-1, y[:, None])[:, 0], dev, seed=4)
    tok = x["t_logp"].gather(-1, y[:, None])[:, 0]
    zz = z[None].clone().requires_grad_(True)
    chunk = {} if torch.device(dev).type == "cuda" else {"chunk_bytes": 16 * 4 * V}
    loss, stats = eopd_loss(zz, y[None], x["old"][None], x["t_ids"][None], x["t_lp"][None], x["mask"][None],
                            teacher_entropy=x["t_ent"][None], teacher_token_logprobs=tok[None], **chunk)
    loss.backward()
    _sync(dev)
    zr = z64[None].clone().requires_grad_(True)
    loss64, _ = dense.dense_eopd_loss(zr, y[None], x["old"][None], x["t_ids"][None], x["t_lp"][None], x["mask"][None],
                                      x["t_ent"][None], tok[None], EOPDSettings())
    loss64.backward()
    Elp = _logp_bound(z64, lq64, V)
    lbound, S, dG = _loss_bound(x, lq64, y, Elp, K)
    index = torch.cat([x["t_ids"], y[:, None]], -1)
    dzb = _dz_bound(zr.grad[0], lq64, Elp, S, dG, index)
    figs = {
        "loss": {"value": float(loss.detach()), "ref": float(loss64.detach()), **_ratio_fig(
            (loss.detach().double() - loss64.detach()).abs().reshape(1).cpu(), torch.tensor([lbound]))},
        "grad_logits": _ratio_fig((zz.grad[0].double() - zr.grad[0]).abs(), dzb),
        "grad_dtype": str(zz.grad.dtype),
        "stats_loss_equals_loss": stats["loss"] == float(loss.detach()),
        "gate_frac": stats["gate_frac"], "pg_clipfrac": stats["pg_clipfrac"],
    }
    return _numeric_verdict(figs)


def check_numeric_loss_hidden(run: Run, sizes: dict, dev, budget: Budget) -> dict:
    import torch

    from verl_eopd import EOPDSettings
    from verl_eopd.core import eopd_loss_from_hidden

    dense = _dense_reference()
    N, V, H, K = sizes["N"], sizes["V"], sizes["H"], sizes["K"]
    h, w, y = _hidden_inputs(N, V, H, dev, seed=5)
    h64, w64 = h.double(), w.double()
    with torch.no_grad():
        z64 = h64 @ w64.T
        lq64 = torch.log_softmax(z64, -1)
    x = _loss_inputs(N, V, K, lq64.gather(-1, y[:, None])[:, 0], dev, seed=6)
    tok = x["t_logp"].gather(-1, y[:, None])[:, 0]
    hh, ww = h[None].clone().requires_grad_(True), w.clone().requires_grad_(True)
    loss, stats = eopd_loss_from_hidden(hh, ww, y[None], x["old"][None], x["t_ids"][None], x["t_lp"][None],
                                        x["mask"][None], teacher_entropy=x["t_ent"][None],
                                        teacher_token_logprobs=tok[None])
    loss.backward()
    _sync(dev)
    hr, wr = h64[None].clone().requires_grad_(True), w64.clone().requires_grad_(True)
    zr = hr @ wr.T
    zr.retain_grad()
    loss64, _ = dense.dense_eopd_loss(zr, y[None], x["old"][None], x["t_ids"][None], x["t_lp"][None],
                                      x["mask"][None], x["t_ent"][None], tok[None], EOPDSettings())
    loss64.backward()
    dz64 = zr.grad[0]
    del zr
    dz = _matmul_bf16_bound(h64, w64, z64, H)
    Elp = _logp_bound(z64, lq64, V, dz)
    max_dz = float(dz.max())
    del z64, dz
    lbound, S, dG = _loss_bound(x, lq64, y, Elp, K)
    index = torch.cat([x["t_ids"], y[:, None]], -1)
    dzb = _dz_bound(dz64, lq64, Elp, S, dG, index)
    del lq64, Elp
    # dh = dz W (bf16 GEMM over V, fp32 accumulation, bf16 result); dW = sum_t dz_t^T h_t over N rows in fp32,
    # cast to bf16 once
    wa, ha = w64.abs(), h64.abs()
    dza = dz64.abs() + dzb
    bound_h = (1 + U16) * (dzb @ wa + gamma(V) * (dza @ wa)) + U16 * hr.grad[0].abs()
    bound_w = (1 + U16) * (dzb.T @ ha + gamma(N + 1) * (dza.T @ ha)) + U16 * wr.grad.abs()
    del dza, dzb
    figs = {
        "loss": {"value": float(loss.detach()), "ref": float(loss64.detach()), **_ratio_fig(
            (loss.detach().double() - loss64.detach()).abs().reshape(1).cpu(), torch.tensor([lbound]))},
        "grad_hidden": _ratio_fig((hh.grad[0].double() - hr.grad[0]).abs(), bound_h),
        "grad_lm_head": _ratio_fig((ww.grad.double() - wr.grad).abs(), bound_w),
        "grad_lm_head_rel_fro": float((ww.grad.double() - wr.grad).norm() / wr.grad.norm()),
        "grad_dtypes": [str(hh.grad.dtype), str(ww.grad.dtype)],
        "max_logit_error_bound": max_dz,
        "gate_frac": stats["gate_frac"], "pg_clipfrac": stats["pg_clipfrac"],
    }
    return _numeric_verdict(figs)


# --------------------------------------------------------------------------------------------------
# Counts: kernel launches and host syncs
# --------------------------------------------------------------------------------------------------


_SYNC_OP_NAMES = ("_local_scalar_dense", "item", "is_nonzero", "equal", "nonzero", "masked_select", "_unique2",
                  "unique_dim", "unique_consecutive", "repeat_interleave")


def _counter():
    """A TorchDispatchMode counting aten ops (views included: they dispatch but launch nothing) and the host syncs
    among them: reads of a device value (`_local_scalar_dense`, nonzero, ...), copies to the CPU from another
    device, boolean indexing (as tests/test_kernels_gpu_sizing.py's CountOps, on real tensors)."""
    import torch
    from torch.utils._python_dispatch import TorchDispatchMode

    aten = torch.ops.aten
    sync_ops = {getattr(aten, n).default if n != "repeat_interleave" else aten.repeat_interleave.Tensor
                for n in _SYNC_OP_NAMES}
    index_ops = (aten.index.Tensor, aten.index_put_.default, aten.index_put.default, aten._index_put_impl_.default)

    class Count(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.ops = collections.Counter()
            self.syncs: list = []

        @property
        def total(self) -> int:
            return sum(self.ops.values())

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            kwargs = kwargs or {}
            self.ops[func.name()] += 1
            src = args[0] if args and isinstance(args[0], torch.Tensor) else None
            to_host = False
            if src is not None and func is aten._to_copy.default:
                dst = torch.device(kwargs.get("device") or src.device)
                to_host = dst.type == "cpu" and src.device.type != "cpu"
            elif func is aten.copy_.default and len(args) > 1 and isinstance(args[1], torch.Tensor):
                to_host = args[0].device.type == "cpu" and args[1].device.type != "cpu"
            bool_index = func in index_ops and any(
                i is not None and i.dtype in (torch.bool, torch.uint8) for i in args[1])
            if func in sync_ops or to_host or bool_index:
                self.syncs.append(func.name())
            return func(*args, **kwargs)

    return Count()


def _passes(sizes: dict, dev):
    """The six passes of item 3 on real tensors of `sizes` (bf16): (name, run, prep) in order; a backward's prep
    runs its forward (uncounted) so that each measurement has an output to go back through."""
    import torch

    from verl_eopd.core import kernels

    N, V, H, K = sizes["N"], sizes["V"], sizes["H"], sizes["K"]
    h, w, y = _hidden_inputs(N, V, H, dev, seed=7)
    h.requires_grad_(True)
    w.requires_grad_(True)
    g = _gen(dev, 8)
    idx = torch.randint(0, V, (N, K + 1), generator=g, device=dev)
    state = {}

    def logits():
        if "z" not in state:
            with torch.no_grad():
                state["z"] = (h.detach() @ w.detach().T).requires_grad_(True)
        return state["z"]

    def student_fwd():
        state["out"] = kernels.student_logprobs_at_from_hidden(h, w, idx, with_entropy=True)[0]

    def student_bwd():
        state.pop("out").backward(torch.ones(N, K + 1, device=dev) / N)

    def teacher():
        kernels.teacher_stats_from_hidden(h.detach(), w.detach(), y, K)

    def logits_fwd():
        state["lq"] = kernels.student_logprobs_at(logits(), idx, with_entropy=True)[0]

    def logits_bwd():
        state.pop("lq").backward(torch.ones(N, K + 1, device=dev) / N)

    def logits_teacher():
        kernels.teacher_stats(logits().detach(), y, K)

    def cleanup():
        h.grad = w.grad = None
        if "z" in state:
            state["z"].grad = None
        state.pop("out", None)
        state.pop("lq", None)

    return [("student_fwd", student_fwd, None), ("student_bwd", student_bwd, student_fwd),
            ("teacher", teacher, None), ("logits_fwd", logits_fwd, None), ("logits_bwd", logits_bwd, logits_fwd),
            ("logits_teacher", logits_teacher, None)], cleanup


def _device_events(prof) -> collections.Counter:
    """Kernel, memcpy and memset events the profiler saw on the GPU, by name."""
    from torch.autograd import DeviceType

    c = collections.Counter()
    for e in prof.events():
        if getattr(e, "device_type", None) == DeviceType.CUDA:
            c[e.name] += 1
    return c


def check_kernel_launches(run: Run, sizes: dict, dev, budget: Budget) -> dict:
    import torch

    from verl_eopd.core.kernels import chunk_sizing

    cuda = torch.device(dev).type == "cuda"
    passes, cleanup = _passes(sizes, dev)
    for _, fn, _ in passes:  # warm-up: the once-per-process probes, cuBLAS handles, the allocator
        fn()
    cleanup()
    _sync(dev)
    kinds = {"student_fwd": "student", "student_bwd": "student", "teacher": "teacher", "logits_fwd": "logits",
             "logits_bwd": "logits", "logits_teacher": "logits"}
    figs, ok = {}, True
    for name, fn, prep in passes:
        if budget.left() <= 0:
            figs[name] = {"skipped": "check budget spent"}
            ok = False
            continue
        sz = chunk_sizing("cuda", torch.bfloat16, sizes["V"], kind=kinds[name])
        chunks = math.ceil(sizes["N"] / sz.rows)
        bound = PER_CHUNK[name] * chunks + FIXED
        entry = {"chunks_on_cuda_sizing": chunks, "item3_aten_op_bound": bound}
        if cuda:
            from torch.profiler import ProfilerActivity, profile

            if prep:
                prep()
            _sync(dev)
            with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
                fn()
                _sync(dev)
            ev = _device_events(prof)
            launches = sum(ev.values())
            entry.update(cuda_launches=launches, by_kernel=dict(ev.most_common(15)),
                         memcpy_memset=sum(v for k, v in ev.items() if k.startswith(("Memcpy", "Memset"))),
                         within_bound=launches <= bound)
            ok &= launches <= bound
        else:
            entry.update(cuda_launches=None, note="no CUDA: launches not measured; aten ops on this device's "
                                                  "sizing only")
        if prep:
            prep()
        counter = _counter()
        with counter:
            fn()
        entry["aten_ops"] = counter.total
        entry["aten_top"] = dict(counter.ops.most_common(10))
        figs[name] = entry
        cleanup()
    if cuda:
        total = sum(figs[n].get("cuda_launches") or 0 for n in ("student_fwd", "student_bwd", "teacher"))
        figs["from_hidden_micro_batch_launches"] = total
        figs["item3_from_hidden_aten_bound"] = 1100
        ok &= total <= 1100
    return {"ok": ok if cuda else None, "figures": figs}


def _sync_debug_count(fn) -> tuple:
    """Runs fn() under torch.cuda.set_sync_debug_mode('warn'); returns (syncs warned, their first messages)."""
    import warnings

    import torch

    prev = torch.cuda.get_sync_debug_mode()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            fn()
        finally:
            torch.cuda.set_sync_debug_mode(prev)
    msgs = [str(w.message).splitlines()[0][:120] for w in caught if "synchroniz" in str(w.message)]
    return len(msgs), msgs[:3]


def check_host_syncs(run: Run, sizes: dict, dev, budget: Budget) -> dict:
    """Per pass: the forward of eopd_loss / eopd_loss_from_hidden / the kernels alone reads the device once, the
    backward never, teacher_stats(_from_hidden) once (item 3)."""
    import torch

    from verl_eopd.core import eopd_loss, eopd_loss_from_hidden, kernels

    cuda = torch.device(dev).type == "cuda"
    N, V, H, K = sizes["N"], sizes["V"], sizes["H"], sizes["K"]
    h, w, y = _hidden_inputs(N, V, H, dev, seed=9)
    g = _gen(dev, 10)
    idx = torch.randint(0, V, (N, K + 1), generator=g, device=dev)
    t_lp = torch.log_softmax(torch.randn(1, N, 4 * K, generator=g, device=dev), -1)[..., :K] - 0.3
    t_lp = t_lp.sort(-1, descending=True).values
    t_ids = torch.randint(0, V, (1, N, K), generator=g, device=dev)
    old = -torch.rand(1, N, generator=g, device=dev) * 4
    mask = torch.ones(1, N, dtype=torch.bool, device=dev)
    with torch.no_grad():
        z = (h @ w.T)[None]
    ent = torch.rand(1, N, generator=g, device=dev) * 3
    tok = -torch.rand(1, N, generator=g, device=dev) * 4
    hh, ww, zz = h[None].clone().requires_grad_(True), w.clone().requires_grad_(True), z.clone().requires_grad_(True)
    exact = dict(teacher_entropy=ent, teacher_token_logprobs=tok)
    fwds = {
        "eopd_loss_from_hidden": lambda: eopd_loss_from_hidden(hh, ww, y[None], old, t_ids, t_lp, mask, **exact)[0],
        "eopd_loss_from_hidden_topk_only": lambda: eopd_loss_from_hidden(hh, ww, y[None], old, t_ids, t_lp, mask)[0],
        "eopd_loss": lambda: eopd_loss(zz, y[None], old, t_ids, t_lp, mask, **exact)[0],
        "student_logprobs_at_from_hidden": lambda: kernels.student_logprobs_at_from_hidden(hh[0], ww, idx)[0].sum(),
        "student_logprobs_at": lambda: kernels.student_logprobs_at(zz[0], idx)[0].sum(),
    }
    teachers = {
        "teacher_stats_from_hidden": lambda: kernels.teacher_stats_from_hidden(h, w, y, K),
        "teacher_stats": lambda: kernels.teacher_stats(z[0], y, K),
    }
    fwds["eopd_loss_from_hidden"]().backward()  # warm-up: the once-per-process probes read the device
    teachers["teacher_stats"]()
    hh.grad = ww.grad = zz.grad = None
    _sync(dev)
    figs, ok = {}, True

    def measure(fn):
        c = _counter()
        with c:
            res = fn()
        _sync(dev)
        return res, c.syncs

    for name, fwd in fwds.items():
        if budget.left() <= 0:
            figs[name] = {"skipped": "check budget spent"}
            ok = False
            continue
        loss, d_fwd = measure(fwd)
        _, d_bwd = measure(loss.backward)
        e = {"dispatch_syncs_fwd": len(d_fwd), "dispatch_syncs_bwd": len(d_bwd), "dispatch_ops": d_fwd + d_bwd}
        if cuda:
            held = {}
            nf, mf = _sync_debug_count(lambda: held.__setitem__("loss", fwd()))
            nb, mb = _sync_debug_count(lambda: held.pop("loss").backward())
            e.update(cuda_syncs_fwd=nf, cuda_syncs_bwd=nb, messages=mf + mb)
            e["ok"] = nf <= 1 and nb == 0 and len(d_fwd) <= 1 and not d_bwd
        else:
            e["ok"] = len(d_fwd) <= 1 and not d_bwd
        ok &= e["ok"]
        figs[name] = e
        hh.grad = ww.grad = zz.grad = None
    for name, fn in teachers.items():
        _, d = measure(fn)
        e = {"dispatch_syncs": len(d), "dispatch_ops": d}
        if cuda:
            n, m = _sync_debug_count(fn)
            e.update(cuda_syncs=n, messages=m)
            e["ok"] = n <= 1 and len(d) <= 1
        else:
            e["ok"] = len(d) <= 1
        ok &= e["ok"]
        figs[name] = e
    return {"ok": ok, "figures": figs}


# --------------------------------------------------------------------------------------------------
# Benchmarks (scripts/bench_loss.py, scripts/bench_hidden.py workers, in this process)
# --------------------------------------------------------------------------------------------------


def _verl_importable() -> Optional[str]:
    """verl's version when `import verl` works (its column of the benchmarks needs it), else None."""
    if importlib.util.find_spec("verl") is None:
        return None
    try:
        import verl

        return getattr(verl, "__version__", "unknown")
    except Exception:
        return None


def _run_cases(cases, work, budget: Budget, dev) -> list:
    """Runs work(case) for each case while the check's budget lasts (a case is started only when the time left
    exceeds 1.5x the longest case so far); skipped cases are listed with the reason."""
    results, longest = [], 0.0
    for case in cases:
        if budget.left() < 1.5 * longest:
            results.append({**case, "skipped": f"budget: {budget.left():.0f} s left < 1.5 x {longest:.0f} s"})
            continue
        t0 = time.monotonic()
        try:
            results.append({**case, **work(case)})
        except Exception as exc:  # an OOM or a missing import: that case only
            results.append({**case, "skipped": f"{type(exc).__name__}: {str(exc).splitlines()[0][:160]}"})
        longest = max(longest, time.monotonic() - t0)
        _free(dev)
    return results


def _ratio(a: Optional[dict], b: Optional[dict], key: str) -> Optional[float]:
    if not a or not b or "skipped" in a or "skipped" in b or b[key] <= 0:
        return None
    return a[key] / b[key]


def check_bench_loss(run: Run, sizes: dict, dev, budget: Budget) -> dict:
    import bench_loss as bl

    from verl_eopd.core import DEFAULT_CHUNK_BYTES

    device = "cuda" if str(dev).startswith("cuda") else "cpu"
    impls = ["eopd", "naive_dense"]
    verl = _verl_importable() if not run.args.tiny else None
    if verl:
        impls.append("verl_native")
    cases = [dict(impl=i, T=T) for T in sizes["T"] for i in impls]
    res = _run_cases(cases, lambda c: bl.worker(c["impl"], c["T"], sizes["K"], sizes["dtype"], device, sizes["V"],
                                                sizes["reps"], DEFAULT_CHUNK_BYTES), budget, dev)
    keep = ("impl", "T", "time_ms", "times_ms", "extra_peak_mib", "peak_mib", "mem_method", "loss", "grad_finite",
            "skipped")
    res = [{k: r[k] for k in keep if k in r} for r in res]
    by = {(r["impl"], r["T"]): r for r in res}
    ratios = []
    for T in sizes["T"]:
        e, n, v = by.get(("eopd", T)), by.get(("naive_dense", T)), by.get(("verl_native", T))
        row = {"T": T, "time_eopd_over_naive": _ratio(e, n, "time_ms"),
               "peak_eopd_over_naive": _ratio(e, n, "extra_peak_mib"),
               "time_eopd_over_verl_native": _ratio(e, v, "time_ms"),
               "peak_eopd_over_verl_native": _ratio(e, v, "extra_peak_mib")}
        if row["peak_eopd_over_naive"] is not None and T >= bl.NAIVE_TARGET_MIN_T:
            row["target_peak_vs_naive"] = {"at_most": bl.TARGET_MEM_NAIVE,
                                           "met": row["peak_eopd_over_naive"] <= bl.TARGET_MEM_NAIVE}
        if row["time_eopd_over_verl_native"] is not None:
            row["target_time_vs_native"] = {"at_most": bl.TARGET_TIME,
                                            "met": row["time_eopd_over_verl_native"] <= bl.TARGET_TIME}
            if row["peak_eopd_over_verl_native"] is not None:
                row["target_peak_vs_native"] = {"at_most": bl.TARGET_MEM_NATIVE,
                                                "met": row["peak_eopd_over_verl_native"] <= bl.TARGET_MEM_NATIVE}
        ratios.append(row)
    figs = {"cases": res, "ratios": ratios, "verl": verl or "not importable: verl_native column not run",
            "device": device}
    finite = all(r.get("grad_finite", True) for r in res)
    return {"ok": finite, "figures": figs}


def check_bench_hidden(run: Run, sizes: dict, dev, budget: Budget) -> dict:
    import bench_hidden as bh

    from verl_eopd.core import DEFAULT_CHUNK_BYTES

    device = "cuda" if str(dev).startswith("cuda") else "cpu"
    impls = ["hidden", "logits", "teacher_hidden", "teacher_logits"]
    verl = _verl_importable() if not run.args.tiny else None
    if verl:
        impls.append("verl_native")
    cases = [dict(impl=i, T=T) for T in sizes["T"] for i in impls]
    res = _run_cases(cases, lambda c: bh.worker(c["impl"], c["T"], sizes["H"], sizes["V"], sizes["K"],
                                                sizes["dtype"], device, sizes["reps"], DEFAULT_CHUNK_BYTES),
                     budget, dev)
    keep = ("impl", "T", "H", "time_ms", "extra_peak_mib", "net_extra_peak_mib", "skipped")
    res = [{k: r[k] for k in keep if k in r} for r in res]
    by = {(r["impl"], r["T"]): r for r in res}
    ratios = []
    for T in sizes["T"]:
        for a, b in (("hidden", "logits"), ("teacher_hidden", "teacher_logits"), ("hidden", "verl_native")):
            ra, rb = by.get((a, T)), by.get((b, T))
            row = {"T": T, "pair": f"{a}/{b}", "time": _ratio(ra, rb, "time_ms"),
                   "net_extra_peak": _ratio(ra, rb, "net_extra_peak_mib")}
            if b == "logits" and row["time"] is not None:
                row["target_time"] = {"at_most": bh.TARGET_TIME, "met": row["time"] <= bh.TARGET_TIME}
                if T >= bh.TARGET_MEM_MIN_T and row["net_extra_peak"] is not None:
                    row["target_net_peak"] = {"at_most": bh.TARGET_MEM, "met": row["net_extra_peak"] <= bh.TARGET_MEM}
            ratios.append(row)
    return {"ok": None, "figures": {"cases": res, "ratios": ratios, "device": device,
                                    "verl": verl or "not importable: verl_native column not run"}}


# --------------------------------------------------------------------------------------------------
# env and the driver
# --------------------------------------------------------------------------------------------------


def _dist_version(dist: str) -> Optional[str]:
    """The installed distribution's version (read from its metadata: nothing is imported), None when absent."""
    from importlib import metadata

    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


def check_env(run: Run, sizes: dict, dev, budget: Budget) -> dict:
    import torch

    import verl_eopd

    env = {"python": platform.python_version(), "torch": torch.__version__, "cuda": torch.version.cuda,
           "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
           "triton": _dist_version("triton"), "transformers": _dist_version("transformers"),
           "verl": _dist_version("verl"),
           "verl_eopd": getattr(verl_eopd, "__version__", None), "verl_eopd_from": os.path.dirname(verl_eopd.__file__),
           "host": platform.node(), "device": str(dev)}
    env["core_sha1"] = _core_sha1()
    try:
        env["git_commit"] = subprocess.run(["git", "-C", ROOT, "rev-parse", "HEAD"], capture_output=True, text=True,
                                           timeout=10).stdout.strip() or None
    except Exception:
        env["git_commit"] = None
    if torch.device(dev).type == "cuda":
        p = torch.cuda.get_device_properties(dev)
        env.update(device_name=p.name, capability=f"{p.major}.{p.minor}", gpu_mem_gib=round(p.total_memory / 2**30, 1),
                   multiprocessors=p.multi_processor_count, driver=_driver(),
                   allow_bf16_reduced_precision_reduction=torch.backends.cuda.matmul.
                   allow_bf16_reduced_precision_reduction,
                   note="numeric checks run with allow_bf16_reduced_precision_reduction=False (fp32 GEMM "
                        "reductions, the bounds' model); the counts and benchmarks with the value above")
    else:
        env.update(device_name=platform.processor() or platform.machine(), cpu_threads=torch.get_num_threads())
    run.doc["env"] = env
    return {"ok": None, "figures": env}


def _core_sha1() -> str:
    """First 10 hex digits of the SHA-1 of verl_eopd/core/*.py as imported (the kernels checked; the device
    machine's copy of the tree may have no .git), as scripts/bench_loss.py records it."""
    import hashlib

    import verl_eopd.core as core

    h = hashlib.sha1()
    for name in sorted(os.listdir(os.path.dirname(core.__file__))):
        if name.endswith(".py"):
            with open(os.path.join(os.path.dirname(core.__file__), name), "rb") as f:
                h.update(f.read())
    return h.hexdigest()[:10]


def _driver() -> Optional[str]:
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=10).stdout.strip()
        return out or None
    except Exception:
        return None


FUNCS = {"env": check_env, "numeric_teacher_stats": check_numeric_teacher_stats,
         "numeric_teacher_hidden": check_numeric_teacher_hidden, "numeric_loss": check_numeric_loss,
         "numeric_loss_hidden": check_numeric_loss_hidden, "kernel_launches": check_kernel_launches,
         "host_syncs": check_host_syncs, "bench_loss": check_bench_loss, "bench_hidden": check_bench_hidden}
for _c in CHECKS:
    _c.fn = FUNCS[_c.name]


def plan(args) -> list[dict]:
    """What a run would do: one row per check (name, kind, gating, budget, sizes, what it shows)."""
    rows = []
    for c in CHECKS:
        selected = not args.only or c.name in args.only or c.name == "env"
        rows.append({"name": c.name, "kind": c.kind, "gating": c.gating, "budget_s": c.budget_s,
                     "sizes": c.tiny if args.tiny else c.sizes, "selected": selected, "what": c.what})
    return rows


def _print_plan(rows, args) -> None:
    total = sum(r["budget_s"] for r in rows if r["selected"])
    print(f"gpu_checks plan: device={args.device} tiny={bool(args.tiny)} deadline={args.deadline_s:.0f} s "
          f"(budgets of the selected checks: {total:.0f} s)")
    for r in rows:
        mark = " " if r["selected"] else "-"
        sizes = " ".join(f"{k}={v}" for k, v in r["sizes"].items()) or "-"
        print(f"{mark} {r['name']:<24} {r['kind']:<8} budget {r['budget_s']:>4.0f} s  {sizes}")
        print(f"    {r['what']}")


def run_checks(args) -> int:
    try:
        import torch
    except ImportError:
        raise SystemExit(f"gpu_checks: torch is not importable by {sys.executable}. Fix: run it with the python that "
                         "has torch (e.g. PYTHON=/path/to/python bash scripts/gpu_checks.sh)") from None

    dev = torch.device(args.device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("gpu_checks: --device cuda but torch sees no GPU (torch.cuda.is_available() is False). "
                         "Fix: run on the lent GPU, or use --device cpu --tiny for the CPU code path")
    run = Run(args)
    _watchdog(run)
    for c in CHECKS:
        sizes = c.tiny if args.tiny else c.sizes
        base = {"kind": c.kind, "gating": c.gating, "budget_s": c.budget_s, "sizes": sizes, "what": c.what}
        if args.only and c.name not in args.only and c.name != "env":
            run.record(c.name, {**base, "status": "skipped", "ok": None, "reason": "not selected (--only)"})
            continue
        if c.name != "env" and run.left() < c.budget_s:
            run.record(c.name, {**base, "status": "skipped", "ok": None,
                                "reason": f"global deadline: {run.left():.0f} s left < budget {c.budget_s:.0f} s"})
            print(f"[skip] {c.name}: {run.left():.0f} s left < budget {c.budget_s:.0f} s", flush=True)
            continue
        run.current = c.name
        run.record(c.name, {**base, "status": "running", "ok": None})
        budget = Budget(run, c.budget_s)
        try:
            with _fp32_gemm_reductions(dev) if c.kind == "numeric" else contextlib.nullcontext():
                res = c.fn(run, sizes, dev, budget)
            ok = res.get("ok")
            status = "info" if ok is None else ("pass" if ok else "fail")
            entry = {**base, "status": status, "ok": ok, "figures": res.get("figures", {})}
        except Exception as exc:  # recorded, then the next check (a numeric check that raises fails)
            import traceback

            entry = {**base, "status": "error" if c.gating else "info", "ok": False if c.gating else None,
                     "reason": f"{type(exc).__name__}: {exc}"[:2000],
                     "traceback": traceback.format_exc()[-3000:]}
        entry["elapsed_s"] = round(budget.elapsed(), 2)
        entry["over_budget"] = budget.elapsed() > c.budget_s
        run.record(c.name, entry)
        run.current = None
        print(f"[{entry['status']}] {c.name} ({entry['elapsed_s']:.1f} s)", flush=True)
        _free(dev)
    code = run.finish()
    print(f"gpu_checks: {len(run.doc['passed'])} passed, failed {run.doc['failed']}, skipped {run.doc['skipped']}; "
          f"{run.doc['wall_s']:.0f} s; JSON: {args.out}", flush=True)
    return code


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    default_out = os.path.join(os.environ["OUT"], "gpu_checks.json") if os.environ.get("OUT") else None
    ap.add_argument("--out", default=default_out, help="the JSON file (default: $OUT/gpu_checks.json when $OUT is set)")
    ap.add_argument("--device", default="cuda", help="cuda (default), cuda:N, or cpu (with --tiny: the tests)")
    ap.add_argument("--tiny", action="store_true", help="toy sizes (a few seconds on CPU)")
    ap.add_argument("--dry-run", action="store_true", help="print the plan and exit 0; touches no GPU")
    ap.add_argument("--deadline-s", type=float, default=DEFAULT_DEADLINE_S,
                    help=f"global deadline in seconds from the start (default {DEFAULT_DEADLINE_S:.0f}): checks "
                         "whose budget no longer fits are skipped; the watchdog stops a check still running "
                         f"{HARD_STOP_GRACE_S:.0f} s after it")
    ap.add_argument("--only", nargs="+", choices=[c.name for c in CHECKS], help="run these checks (and env) only")
    args = ap.parse_args(argv)
    args.deadline_from_start = argv is None  # the command line: from process start; main(argv) in a test: from now
    if args.deadline_s <= 0:
        ap.error(f"--deadline-s must be > 0, got {args.deadline_s}")
    if args.dry_run:
        _print_plan(plan(args), args)
        return 0
    if not args.out:
        ap.error("--out is required when $OUT is not set (e.g. --out gpu_checks.json)")
    return run_checks(args)


if __name__ == "__main__":
    sys.exit(main())
