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
    import torch
    from torch.utils.tensorboard import SummaryWriter

    rows = [(s, {"actor/eopd/gate_frac": 0.1 * s, "critic/score/mean": 0.5, "note": "text", "bad": float("nan")})
            for s in (1, 2, 3)]
    from_file = read_run(_jsonl(tmp_path / "run.jsonl", rows))
    # JSON round-trips Python floats exactly: the values are the rows' own floats (0.1 * 3 included)
    assert from_file == {"actor/eopd/gate_frac": {1: 0.1, 2: 0.2, 3: 0.1 * 3},
                         "critic/score/mean": {1: 0.5, 2: 0.5, 3: 0.5}}
    tb = tmp_path / "tb"
    w = SummaryWriter(str(tb))
    for s, d in rows:
        w.add_scalar("actor/eopd/gate_frac", d["actor/eopd/gate_frac"], s)
    w.close()
    from_tb = read_run(str(tb))
    # tensorboard stores a scalar as one fp32 (|fl(x) - x| <= u |x|): exactly the file's value rounded once to fp32
    fp32 = lambda x: float(torch.tensor(x, dtype=torch.float32))  # noqa: E731
    assert from_tb["actor/eopd/gate_frac"] == {s: fp32(v) for s, v in from_file["actor/eopd/gate_frac"].items()}
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
def test_verdicts_pair_seeds_and_holm_correct_the_family():
    """Hand-made results: EOPD's entropy is higher on every seed by a near-constant margin (holds), its
    Pass@k differs by noise (not shown); every test is Holm-corrected over the whole family."""
    from verl_eopd.math.stats import holm, paired_t

    def runs(ent, passk):
        return [{"seed": i, "student_entropy": e, "fkl_high_entropy": 0.5, "pass@4": p, "avg@4": p / 2}
                for i, (e, p) in enumerate(zip(ent, passk))]

    results = {"opd": runs([0.50, 0.52, 0.49, 0.51, 0.50], [40, 42, 38, 41, 39]),
               "eopd": runs([0.60, 0.62, 0.60, 0.61, 0.60], [41, 40, 39, 42, 38])}
    rows = mini_repro.verdicts(results, k=4)
    by = {r["claim"]: r for r in rows}
    assert [r["claim"] for r in rows] == list(mini_repro.claims(4))
    ent = by["a: higher student entropy"]
    ref = paired_t([0.60, 0.62, 0.60, 0.61, 0.60], [0.50, 0.52, 0.49, 0.51, 0.50])
    # exact: verdicts runs paired_t on the same per-seed lists in the same order, and holm on the same p-values
    assert ent["t"] == ref.t and ent["df"] == 4
    assert ent["p_holm"] == holm([r["p"] for r in rows])[0] and ent["verdict"] == "holds"
    assert by["c: higher Pass@4"]["verdict"] == "not shown"
    assert by["b: lower FKL on high-entropy tokens"]["verdict"] == "not shown"  # no difference at all
    flipped = mini_repro.verdicts({"opd": results["eopd"], "eopd": results["opd"]}, k=4)
    assert flipped[0]["verdict"] == "reversed"


def _assert_the_arms_train_different_objectives_on_the_same_rollouts(results: dict) -> None:
    """What results.json must show if OPD and EOPD really are the two objectives, paired by seed.

    Step 1 of a seed starts both arms from the same student with the same sampling seed, so both train on the
    same rollout: its `rkl_mean` (log pi_old - log pi_T on the sampled tokens) and `gate_frac` (from the
    teacher's entropy on them) are equal across the arms. Its recorded metrics come from the last of the PPO
    epochs on that one batch, after the earlier epochs' updates; with the same data the only difference is the
    objective: EOPD adds the forward KL on the gated tokens (teacher entropy > tau = 0.8, the tokens
    `fkl_high_entropy_mean` averages over), so its FKL there ends lower than OPD's (fkl_coef = 0). Identical arms,
    an FKL term switched on in both or in neither, or swapped arms fail this."""
    for opd, eopd in zip(results["opd"], results["eopd"]):
        assert opd["seed"] == eopd["seed"]
        o, e = opd["train_metrics"], eopd["train_metrics"]
        assert len(o["rkl_mean"]) == len(e["rkl_mean"]) == 3  # one record per step
        # exact: both arms run in one process, load the same student, seed the same sampling and compute step 1's
        # rkl_mean (mean of log pi_old - log pi_T, log pi_old taken before any update) and gate_frac (teacher
        # entropy > tau) by the same ops on the same floats; neither depends on fkl_coef, the arms' only difference
        assert e["rkl_mean"][0] == o["rkl_mean"][0], "step 1 should see the same rollout"
        assert e["gate_frac"][0] == o["gate_frac"][0], "step 1 should see the same rollout"
        assert 0 < e["gate_frac"][0] < 1  # some tokens gated, so the FKL term has something to act on
        assert e["fkl_high_entropy_mean"][0] < o["fkl_high_entropy_mean"][0], (opd["seed"], o, e)
        assert e["student_entropy_mean"] != o["student_entropy_mean"]
        held_out = ("student_entropy", "fkl_high_entropy")
        assert [eopd[k] for k in held_out] != [opd[k] for k in held_out]


@pytest.mark.e2e
def test_mini_repro_quick_end_to_end(tmp_path):
    """The smoke version: two seeds of OPD and EOPD on both embedded pairs, evaluated, tested (one Holm family
    over both tasks) and written up."""
    from verl_eopd.cpu.embedded import ADD, MULTIPLE

    out = tmp_path / "mr"
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "scripts", "mini_repro.py"), "--quick", "--out", str(out)],
                          capture_output=True, text=True, timeout=1500)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    for task in (ADD, MULTIPLE):
        for name in ("metrics.png", "pass_at_k.png", "results.json"):
            assert (out / task / name).exists(), (task, name)
        results = json.loads((out / task / "results.json").read_text())
        assert results["task"] == task
        for arm in ("opd", "eopd"):
            assert [r["seed"] for r in results["results"][arm]] == [0, 1]
            for run in results["results"][arm]:
                assert 0.0 <= run["pass@1"] <= run["pass@4"] <= 100.0
                assert math.isfinite(run["student_entropy"]) and math.isfinite(run["fkl_high_entropy"])
                assert sorted(int(s) for s in run["curve"]) == [0, 3]
        refs = results["references"]
        assert refs["teacher_greedy"] > refs["student_before_greedy"] + 0.5  # the pair is a real test bed
        _assert_the_arms_train_different_objectives_on_the_same_rollouts(results["results"])
    rows = json.loads((out / "verdicts.json").read_text())
    assert {v["verdict"] for v in rows} <= {"holds", "reversed", "not shown"}
    # 4 claims (entropy, FKL, Pass@4, Avg@4) x 1 EOPD arm x 2 tasks, corrected as one family
    assert len(rows) == 8 and [r["task"] for r in rows] == [ADD] * 4 + [MULTIPLE] * 4
    from verl_eopd.math.stats import holm

    # exact: results.json's floats round-trip through JSON, and the script's correction is holm on these p-values
    assert [r["p_holm"] for r in rows] == holm([r["p"] for r in rows])
    text = (out / "results.md").read_text()
    assert "Holm-corrected over all 8 tests" in text and "| EOPD (tau = 0.8) |" in text and f"### {MULTIPLE}" in text


@pytest.mark.unit
def test_coef_sweep_verdicts_are_paired_holm_corrected_tests_against_the_default():
    from verl_eopd.math import coef_sweep
    from verl_eopd.math.stats import holm, paired_t

    finals = {"grpo_only": [20.0, 25.0, 22.0], "coef_0.2": [47.0, 46.0, 49.0], "coef_1": [46.0, 45.5, 47.0]}
    results = {arm: [{"seed": s, "final": v} for s, v in zip([2, 0, 1], vals)] for arm, vals in finals.items()}
    rows = coef_sweep.verdicts(results, "coef_1")
    assert [r["arm"] for r in rows] == ["grpo_only", "coef_0.2"]
    order = lambda arm: [v for _, v in sorted(zip([2, 0, 1], finals[arm]))]  # noqa: E731 - paired by seed
    want = [paired_t(order(a), order("coef_1")) for a in ("grpo_only", "coef_0.2")]
    # exact: the same paired_t on the same seed-ordered lists, holm on the same p-values
    assert [r["mean_diff"] for r in rows] == [w.mean_diff for w in want]
    assert [r["p_holm"] for r in rows] == holm([w.p for w in want])
    assert rows[0]["verdict"] == "worse" and rows[1]["verdict"] == "no difference shown"
    assert list(coef_sweep.arms((0.05, 1.0))) == ["grpo_only", "coef_0.05", "coef_1", "eopd_only"]


@pytest.mark.e2e
def test_grpo_coef_sweep_quick_end_to_end(tmp_path):
    """The smoke version of the eopd_grpo coefficient sweep: every arm trains with its loss and is evaluated;
    the GRPO arms record both terms' gradient norms."""
    out = tmp_path / "sweep"
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "scripts", "grpo_coef_sweep.py"), "--quick", "--out",
                           str(out)], capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    summary = json.loads((out / "results.json").read_text())
    assert list(summary["results"]) == ["grpo_only", "coef_0.05", "coef_0.2", "coef_1", "eopd_only"]
    for arm, runs in summary["results"].items():
        assert [r["seed"] for r in runs] == [0, 1]
        for r in runs:
            assert 0.0 <= r["final"] <= 100.0
            if arm != "eopd_only":
                assert r["scales"] and all(s["pg_grad_norm"] >= 0 and s["distill_grad_norm"] > 0 for s in r["scales"])
                assert len(r["train_score"]) == 2
    assert len(summary["verdicts"]) == 4 and "Holm-corrected over 4 tests" in (out / "results.md").read_text()
