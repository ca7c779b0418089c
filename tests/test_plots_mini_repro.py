"""verl_eopd.math.curves and scripts/plot_metrics.py (file-logger and tensorboard runs, seed bands), the
mini reproduction's verdict rules, and scripts/mini_repro.py end to end."""

import json
import math
import os
import subprocess
import sys

import pytest

from verl_eopd.math import repro as mini_repro
from verl_eopd.math.curves import PANELS, plot, read_run, seed_band, smooth

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _jsonl(path, rows):
    path.write_text("\n".join(json.dumps({"step": s, "data": d}) for s, d in rows) + "\n")
    return str(path)


@pytest.mark.unit
def test_read_run_file_logger_and_tensorboard_agree(tmp_path):
    from torch.utils.tensorboard import SummaryWriter

    rows = [(s, {"actor/eopd/gate_frac": 0.1 * s, "critic/score/mean": 0.5, "note": "text", "bad": float("nan")})
            for s in (1, 2, 3)]
    from_file = read_run(_jsonl(tmp_path / "run.jsonl", rows))
    assert from_file == {"actor/eopd/gate_frac": {1: 0.1, 2: 0.2, 3: pytest.approx(0.3)},
                         "critic/score/mean": {1: 0.5, 2: 0.5, 3: 0.5}}
    tb = tmp_path / "tb"
    w = SummaryWriter(str(tb))
    for s, d in rows:
        w.add_scalar("actor/eopd/gate_frac", d["actor/eopd/gate_frac"], s)
    w.close()
    from_tb = read_run(str(tb))
    assert from_tb["actor/eopd/gate_frac"] == pytest.approx(from_file["actor/eopd/gate_frac"], rel=1e-6)
    with pytest.raises(FileNotFoundError):
        read_run(str(tmp_path / "missing.jsonl"))


@pytest.mark.unit
def test_seed_band_and_smoothing_by_hand():
    steps, mean, std = seed_band([{1: 1.0, 2: 2.0, 3: 9.0}, {1: 3.0, 2: 4.0}])
    assert steps == [1, 2]  # only steps every seed logged
    assert mean == [2.0, 3.0] and std == [1.0, 1.0]
    assert smooth([0.0, 1.0, 1.0], 0.5) == [0.0, 0.5, 0.75]
    assert smooth([3.0, 1.0], 0.0) == [3.0, 1.0]


@pytest.mark.unit
def test_plot_writes_every_panel(tmp_path):
    def run(offset):
        return {key: {s: offset + s * 0.1 for s in range(1, 6)} for key in PANELS.values()}

    groups = {"OPD": [run(0.0), run(0.2)], "EOPD": [run(1.0)]}
    written = plot(groups, str(tmp_path / "plots"), title="t")
    names = sorted(os.path.basename(p) for p in written)
    assert names == sorted([k.replace("/", "_") + ".png" for k in PANELS.values()] + ["metrics.png"])
    for path in written:
        with open(path, "rb") as f:
            assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    with pytest.raises(ValueError, match="none of the metrics"):
        plot({"x": [{"other": {1: 1.0}}]}, str(tmp_path / "none"))


@pytest.mark.integration
def test_plot_metrics_command_line(tmp_path):
    a = _jsonl(tmp_path / "a.jsonl", [(s, {"actor/eopd/gate_frac": 0.2}) for s in (1, 2)])
    out = subprocess.run([sys.executable, os.path.join(ROOT, "scripts", "plot_metrics.py"), "--run", f"EOPD={a}",
                          "--run", f"EOPD={a}", "--out", str(tmp_path / "p")], capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stderr
    assert os.path.exists(tmp_path / "p" / "actor_eopd_gate_frac.png")


@pytest.mark.unit
def test_verdict_rules():
    assert mini_repro.welch_t([1.0, 1.1, 0.9], [0.0, 0.1, -0.1]) == pytest.approx(1.0 / math.sqrt(0.01 / 3 + 0.01 / 3))
    assert mini_repro.verdict([1.0, 1.1, 0.9], [0.0, 0.1, -0.1], +1).startswith("holds")
    assert mini_repro.verdict([1.0, 1.1, 0.9], [0.0, 0.1, -0.1], -1).startswith("reversed")
    assert mini_repro.verdict([1.0, 2.0, 0.0], [0.9, 1.9, -0.1], +1).startswith("not shown")
    assert mini_repro.verdict([1.0], [0.0], +1) == "not testable with one seed"


@pytest.mark.e2e
def test_mini_repro_quick_end_to_end(tmp_path):
    """The CI version: one seed of OPD and EOPD, 4 steps each on the embedded pair, evaluated and written up."""
    out, doc = tmp_path / "runs", tmp_path / "doc" / "mini_repro.md"
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "scripts", "mini_repro.py"), "--quick",
                           "--out", str(out), "--doc", str(doc)], capture_output=True, text=True, timeout=1500)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    figs = doc.parent / "mini_repro"
    for name in ("metrics.png", "pass_at_k.png", "results.json", "opd_s0.jsonl", "eopd_s0.jsonl"):
        assert (figs / name).exists(), name
    results = json.loads((figs / "results.json").read_text())
    for variant in ("opd", "eopd"):
        (run,) = results["runs"][variant]
        assert set(run["eval"]) >= {"avg@4", "pass@1", "pass@4"}
        assert 0.0 <= run["eval"]["pass@1"] <= run["eval"]["pass@4"] <= 100.0
        for key in ("actor/eopd/student_entropy_mean", "actor/eopd/fkl_gated_mean", "actor/eopd/gate_frac",
                    "actor/eopd/fkl_high_entropy_mean", "actor/eopd/high_entropy_frac"):
            assert math.isfinite(run["end"][key])
    text = doc.read_text()
    assert "| student token entropy, end (nats) |" in text and "held-out Pass@4 (%)" in text
    assert "not testable with one seed" in text
    assert "python scripts/mini_repro.py" in text
    # the teacher is far better than the untrained student on the held-out sums (the pair is a real test bed)
    refs = results["references"]
    assert refs["teacher"]["avg@4"] > refs["student before training"]["avg@4"] + 30
