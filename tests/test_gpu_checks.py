"""scripts/gpu_checks.py (issue 23, item 6) on CPU: the dry run lists every check without touching a GPU, the
numeric and count checks run at toy sizes (their float64 comparisons pass here too), the JSON has its schema, a
kernel made wrong by hand fails its check and the exit status, and the global deadline skips what does not fit."""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import subprocess
import sys

import pytest
import torch

pytestmark = pytest.mark.unit

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "scripts", "gpu_checks.py")
STATUSES = {"pass", "fail", "error", "skipped", "info"}


def _load():
    spec = importlib.util.spec_from_file_location("gpu_checks", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    sys.modules["gpu_checks"] = mod  # dataclasses look their module up there
    spec.loader.exec_module(mod)
    return mod


gc_mod = _load()
NAMES = [c.name for c in gc_mod.CHECKS]


def _run_inprocess(args, out):
    """main(args) in this process (torch is imported already); the thread count a bench worker sets is put back."""
    threads = torch.get_num_threads()
    try:
        return gc_mod.main([*args, "--out", str(out)])
    finally:
        torch.set_num_threads(threads)


def test_the_plan_covers_every_check_and_fits_the_deadline():
    assert NAMES == list(gc_mod.FUNCS) and len(set(NAMES)) == len(NAMES)
    kinds = {c.name: c.kind for c in gc_mod.CHECKS}
    for need in ("numeric_teacher_stats", "numeric_teacher_hidden", "numeric_loss", "numeric_loss_hidden",
                 "kernel_launches", "host_syncs", "bench_loss", "bench_hidden"):
        assert need in kinds
    assert {kinds[n] for n in NAMES if n.startswith("numeric")} == {"numeric"}
    # the budgets fit the global deadline, and deadline + watchdog grace + start-up fit the 8 minutes
    assert sum(c.budget_s for c in gc_mod.CHECKS) <= gc_mod.DEFAULT_DEADLINE_S
    assert gc_mod.DEFAULT_DEADLINE_S + gc_mod.HARD_STOP_GRACE_S + 10 <= 8 * 60


def test_dry_run_lists_every_check_and_touches_no_gpu():
    """A fresh interpreter: the dry run prints each check's name, budget and sizes, exits 0 and never imports
    torch (so it cannot initialise CUDA)."""
    code = ("import importlib.util, sys\n"
            f"spec = importlib.util.spec_from_file_location('g', {SCRIPT!r})\n"
            "m = sys.modules['g'] = importlib.util.module_from_spec(spec); spec.loader.exec_module(m)\n"
            "rc = m.main(['--dry-run'])\n"
            "print('RC', rc, 'TORCH', 'torch' in sys.modules)\n")
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60,
                       env={k: v for k, v in os.environ.items() if k != "OUT"})
    assert p.returncode == 0, p.stderr
    assert "RC 0 TORCH False" in p.stdout
    lines = p.stdout.splitlines()
    for c in gc_mod.CHECKS:
        row = [ln for ln in lines if ln[2:].split(" ")[0] == c.name]
        assert len(row) == 1, (c.name, p.stdout)
        assert f"budget {c.budget_s:>4.0f} s" in row[0]
        for k, v in c.sizes.items():
            assert f"{k}={v}" in row[0], (c.name, k, row[0])
    # the command line of the script itself, as the docs show it
    p = subprocess.run([sys.executable, SCRIPT, "--dry-run", "--tiny", "--only", "numeric_loss"], capture_output=True,
                       text=True, timeout=60)
    assert p.returncode == 0, p.stderr
    assert "  numeric_loss " in p.stdout and "- bench_loss " in p.stdout and "V=320" in p.stdout


def test_the_launch_bounds_are_item_3s():
    """The per-chunk aten-op bounds the launch check compares with are tests/test_kernels_gpu_sizing.py's."""
    import test_kernels_gpu_sizing as item3

    assert gc_mod.PER_CHUNK == item3.PER_CHUNK and gc_mod.FIXED == item3.FIXED
    assert gc_mod.CHECKS[NAMES.index("kernel_launches")].sizes["N"] == item3.TOKENS


def _check_schema(doc, ran):
    assert doc["schema"] == gc_mod.SCHEMA
    assert set(doc) >= {"started_utc", "finished_utc", "wall_s", "mode", "env", "checks", "failed", "skipped",
                        "passed", "exit_code"}
    assert doc["env"]["torch"] == torch.__version__ and doc["env"]["device"] == "cpu"
    assert "cuda" in doc["env"] and "device_name" in doc["env"] and len(doc["env"]["core_sha1"]) == 10
    assert list(doc["checks"]) == NAMES  # every check has an entry, run or skipped
    for name, c in doc["checks"].items():
        assert c["status"] in STATUSES, (name, c)
        assert {"kind", "gating", "budget_s", "sizes", "ok"} <= set(c)
        if name in ran:
            assert c["status"] != "skipped" and "elapsed_s" in c and "figures" in c, (name, c)
        else:
            assert c["status"] == "skipped" and c["reason"], (name, c)


def test_numeric_and_count_checks_pass_on_cpu_at_toy_size(tmp_path):
    """The float64 comparisons pass on CPU (errors within their derived bounds), the counts run, and the JSON has
    every figure the GPU run will fill."""
    ran = ["env", "numeric_teacher_stats", "numeric_teacher_hidden", "numeric_loss", "numeric_loss_hidden",
           "kernel_launches", "host_syncs"]
    out = tmp_path / "g.json"
    assert _run_inprocess(["--device", "cpu", "--tiny", "--only", *ran[1:]], out) == 0
    doc = json.loads(out.read_text())
    _check_schema(doc, ran)
    assert doc["exit_code"] == 0 and doc["failed"] == []
    for name in ran[1:5]:
        c = doc["checks"][name]
        assert c["status"] == "pass" and c["gating"], (name, c)
        figs = c["figures"]
        assert 0 <= figs["worst_err_over_bound"] <= 1
        errs = [v for v in figs.values() if isinstance(v, dict) and "max_err_over_bound" in v]
        assert len(errs) >= 2 and all(e["bound_at_worst"] > 0 for e in errs)
    assert set(doc["checks"]["numeric_loss_hidden"]["figures"]) >= {"loss", "grad_hidden", "grad_lm_head"}
    assert set(doc["checks"]["numeric_teacher_stats"]["figures"]) >= {"topk_logprobs", "topk_ids", "entropy",
                                                                       "token_logprobs"}
    launches = doc["checks"]["kernel_launches"]
    assert launches["status"] == "info"  # no CUDA: the aten ops are counted, the launches are not
    for p in ("student_fwd", "student_bwd", "teacher", "logits_fwd", "logits_bwd", "logits_teacher"):
        assert launches["figures"][p]["aten_ops"] > 0 and launches["figures"][p]["cuda_launches"] is None
    syncs = doc["checks"]["host_syncs"]
    assert syncs["status"] == "pass"
    assert syncs["figures"]["eopd_loss_from_hidden"]["dispatch_syncs_bwd"] == 0


def test_bench_checks_run_the_bench_workers_on_cpu(tmp_path):
    out = tmp_path / "g.json"
    assert _run_inprocess(["--device", "cpu", "--tiny", "--only", "bench_loss", "bench_hidden"], out) == 0
    doc = json.loads(out.read_text())
    _check_schema(doc, ["env", "bench_loss", "bench_hidden"])
    bl = doc["checks"]["bench_loss"]["figures"]
    assert {(c["impl"], c["T"]) for c in bl["cases"]} == {("eopd", 32), ("naive_dense", 32)}
    assert all(c["time_ms"] > 0 and "extra_peak_mib" in c for c in bl["cases"])
    assert bl["ratios"][0]["time_eopd_over_naive"] > 0
    bh = doc["checks"]["bench_hidden"]["figures"]
    assert {c["impl"] for c in bh["cases"]} == {"hidden", "logits", "teacher_hidden", "teacher_logits"}
    assert {r["pair"] for r in bh["ratios"]} >= {"hidden/logits", "teacher_hidden/teacher_logits"}


def test_a_kernel_made_wrong_fails_its_check_and_the_exit_status(tmp_path, monkeypatch):
    """Mutations by hand: the teacher entropy off by 0.1%, the lm head's gradient 25% too large. Each check fails;
    the run writes the JSON, then exits 1."""
    from verl_eopd.core import kernels

    ent = kernels._entropy_of_logp
    monkeypatch.setattr(kernels, "_entropy_of_logp", lambda *a, **k: ent(*a, **k) * 1.001)
    out = tmp_path / "g.json"
    assert _run_inprocess(["--device", "cpu", "--tiny", "--only", "numeric_teacher_stats"], out) == 1
    doc = json.loads(out.read_text())
    assert doc["failed"] == ["numeric_teacher_stats"] and doc["exit_code"] == 1
    figs = doc["checks"]["numeric_teacher_stats"]["figures"]
    assert figs["entropy"]["max_err_over_bound"] > 1 and figs["token_logprobs"]["max_err_over_bound"] <= 1
    monkeypatch.setattr(kernels, "_entropy_of_logp", ent)

    add = kernels._add_grad_w
    monkeypatch.setattr(kernels, "_add_grad_w", lambda acc, dz, h, f: add(acc, dz * 1.25, h, f))
    run = gc_mod.Run(argparse.Namespace(device="cpu", tiny=True, deadline_s=60.0, only=None, out=None))
    sizes = gc_mod.CHECKS[NAMES.index("numeric_loss_hidden")].tiny
    res = gc_mod.check_numeric_loss_hidden(run, sizes, torch.device("cpu"), gc_mod.Budget(run, 60))
    assert res["ok"] is False
    assert res["figures"]["grad_lm_head"]["max_err_over_bound"] > 1
    assert res["figures"]["grad_hidden"]["max_err_over_bound"] <= 1
    assert res["figures"]["loss"]["max_err_over_bound"] <= 1


def test_the_global_deadline_skips_what_does_not_fit(tmp_path):
    out = tmp_path / "g.json"
    assert _run_inprocess(["--device", "cpu", "--tiny", "--deadline-s", "1"], out) == 0
    doc = json.loads(out.read_text())
    _check_schema(doc, ["env"])
    assert doc["skipped"] == NAMES[1:]
    assert all("global deadline" in doc["checks"][n]["reason"] for n in NAMES[1:])


def test_no_gpu_is_refused_with_the_fix(tmp_path):
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    with pytest.raises(SystemExit, match="--device cpu --tiny"):
        _run_inprocess(["--device", "cuda"], tmp_path / "g.json")
    assert not (tmp_path / "g.json").exists()


def test_the_watchdog_writes_the_json_and_stops_a_check_that_overruns(tmp_path):
    """A check that never returns (here: blocked on an event nobody sets) is stopped by the watchdog after the
    global deadline + grace (shortened here): the JSON is written with that check marked, the exit status is 3."""
    out = tmp_path / "g.json"
    code = ("import importlib.util, sys, threading\n"
            f"spec = importlib.util.spec_from_file_location('g', {SCRIPT!r})\n"
            "m = sys.modules['g'] = importlib.util.module_from_spec(spec); spec.loader.exec_module(m)\n"
            "m.HARD_STOP_GRACE_S = 0.5\n"
            "m.CHECKS[1].budget_s = 0.1\n"
            "m.CHECKS[1].fn = lambda *a: threading.Event().wait()\n"
            f"sys.exit(m.main(['--device', 'cpu', '--tiny', '--deadline-s', '3', '--out', {str(out)!r}]))\n")
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert p.returncode == 3, p.stdout + p.stderr
    doc = json.loads(out.read_text())
    stopped = doc["checks"][NAMES[1]]
    assert stopped["status"] == "skipped" and "watchdog" in stopped["reason"]
    assert doc["checks"]["env"]["status"] == "info" and doc["skipped"] == NAMES[1:]
    assert list(doc["checks"]) == NAMES and "not reached" in doc["checks"][NAMES[2]]["reason"]
    assert all({"kind", "gating", "budget_s", "sizes", "ok"} <= set(c) for c in doc["checks"].values())
    assert "global deadline reached" in p.stdout
