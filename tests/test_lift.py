"""The seed study of the default run's lift (verl_eopd/math/lift.py, scripts/lift_seeds.py): a run's record from a
file log written as verl's FileLogger writes it, the statistics against hand-computed values, and the script's
commands, resume rule, table and failure status, without launching verl."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

from verl_eopd.math.lift import lift_stats, paired_lifts, seed_record

ROOT = Path(__file__).resolve().parents[1]
KEY = "val-core/eopd_tiny_add/acc/mean@1"
T_975 = {2: 4.302652729911275, 5: 2.570581835636314}  # Student t 0.975 quantiles (tables)


def _write_log(path: Path, val: dict[int, float], step_s: list[float], rkl: list[float]) -> None:
    """A JSONL as verl's FileLogger writes it: {"step": n, "data": {...}} per logged step."""
    path.parent.mkdir(parents=True, exist_ok=True)
    lines = []
    for step in range(0, len(step_s) + 1):
        data = {}
        if step in val:
            data[KEY] = val[step]
        if step >= 1:
            data.update({"timing_s/step": step_s[step - 1], "actor/eopd/rkl_mean": rkl[step - 1], "actor/loss": 0.1})
        lines.append(json.dumps({"step": step, "data": data}))
    path.write_text("\n".join(lines) + "\n")


@pytest.mark.unit
def test_seed_record_reads_the_lift_step_time_and_reverse_kl(tmp_path):
    log = tmp_path / "seed.jsonl"
    _write_log(log, {0: 0.197, 3: 0.25, 6: 0.481}, [5.0, 9.0, 4.0, 6.0, 5.5, 7.0], [1.6, 1.2, 1.0, 0.9, 0.7, 0.56])
    r = seed_record(log)
    assert r["val_key"] == KEY and r["last_step"] == 6
    assert r["before"] == pytest.approx(19.7) and r["after"] == pytest.approx(48.1)
    assert r["lift"] == pytest.approx(28.4)
    assert r["median_step_s"] == pytest.approx(5.75)  # (5.5 + 6.0) / 2
    assert r["rkl_first_last"] == [1.6, 0.56]


@pytest.mark.unit
def test_seed_record_refuses_a_log_without_one_validation_series_from_step_0(tmp_path):
    log = tmp_path / "none.jsonl"
    _write_log(log, {}, [5.0], [1.0])
    with pytest.raises(ValueError, match="val_before_train"):
        seed_record(log)
    late = tmp_path / "late.jsonl"
    _write_log(late, {2: 0.3, 4: 0.4}, [5.0] * 4, [1.0] * 4)
    with pytest.raises(ValueError, match="not 0. Fix: trainer.val_before_train=True"):
        seed_record(late)


@pytest.mark.unit
def test_lift_stats_equal_hand_computed_values():
    lifts = [25.0, 22.5, 28.6]  # docs/cpu.md runs A-C
    st = lift_stats(lifts, 25.0)
    mean = sum(lifts) / 3
    sd = math.sqrt(sum((x - mean) ** 2 for x in lifts) / 2)
    half = T_975[2] * sd / math.sqrt(3)
    assert st["mean"] == pytest.approx(mean) and st["sd"] == pytest.approx(sd)
    assert st["ci95"] == pytest.approx([mean - half, mean + half], abs=1e-9)
    assert (st["n"], st["df"], st["reach_target"]) == (3, 2, 2)  # 25.0 counts as reaching 25
    assert st["t"] == pytest.approx((mean - 25) / (sd / math.sqrt(3)))
    # one-sided p of t(2) = 0.2075: for df = 2, P(T > t) = (1 - t / sqrt(t^2 + 2)) / 2 exactly
    assert st["p_one_sided"] == pytest.approx((1 - st["t"] / math.sqrt(st["t"] ** 2 + 2)) / 2, abs=1e-9)
    below = lift_stats([18.6, 22.5, 24.2], 25.0)
    assert below["t"] < 0 and below["p_one_sided"] > 0.5 and below["reach_target"] == 0
    with pytest.raises(ValueError, match=">= 2 seeds"):
        lift_stats([30.0], 25.0)


@pytest.mark.unit
def test_paired_lifts_use_only_the_seeds_both_have():
    a = {4: 28.4, 5: 28.1, 6: 33.9, 7: 30.6, 8: 32.0}
    b = {4: 28.4, 5: 24.2, 6: 18.6, 7: 23.6, 9: 40.0}
    pr = paired_lifts(a, b)
    d = [0.0, 3.9, 15.3, 7.0]
    m = sum(d) / 4
    sd = math.sqrt(sum((x - m) ** 2 for x in d) / 3)
    assert pr["seeds"] == [4, 5, 6, 7] and pr["df"] == 3
    assert pr["mean_diff"] == pytest.approx(m) and pr["t"] == pytest.approx(m / (sd / 2))
    # one-sided p of t(3): for df = 3, P(T > t) = 1/2 - (atan(t / sqrt 3) + sqrt(3) t / (3 + t^2)) / pi exactly
    t = pr["t"]
    assert pr["p_one_sided"] == pytest.approx(0.5 - (math.atan(t / math.sqrt(3)) + math.sqrt(3) * t / (3 + t * t)) / math.pi,
                                              abs=1e-9)
    assert pr["p_two_sided"] == pytest.approx(2 * pr["p_one_sided"], abs=1e-12)
    assert paired_lifts(b, a)["p_one_sided"] == pytest.approx(1 - pr["p_one_sided"], abs=1e-12)
    with pytest.raises(ValueError, match=">= 2 seeds in both"):
        paired_lifts({4: 1.0, 5: 2.0}, {5: 1.0, 6: 2.0})


def _script(fresh_python, *args: str) -> subprocess.CompletedProcess:
    return fresh_python([str(ROOT / "scripts" / "lift_seeds.py"), *args], timeout=120)


def _lift_seeds():
    """scripts/lift_seeds.py as a module."""
    sys.path.insert(0, str(ROOT / "scripts"))
    try:
        import lift_seeds
    finally:
        sys.path.pop(0)
    return lift_seeds


def _fake_seed(out: Path, seed: int, lift_to: float, cmd_overrides: list[str], rc: int = 0) -> None:
    """A finished seed folder as run_seed leaves it (done.json, the file log under lift/), without running verl."""
    folder = out / f"seed{seed}"
    _write_log(folder / "lift" / f"seed{seed}.jsonl", {0: 0.197, 2: lift_to}, [5.0, 6.0], [1.5, 0.6])
    done = {"seed": seed, "command": _lift_seeds().command(seed, "eopd", cmd_overrides)[1:], "rc": rc, "wall_s": 360.0,
            "commit": "abc", "cpu_capability": "AVX512", "steal_pct": 0.02, "idle_pct": 23.0}
    (folder / "done.json").write_text(json.dumps(done))


@pytest.mark.integration
def test_the_script_prints_commands_resumes_finished_seeds_and_reports_failures(tmp_path, fresh_python):
    out = tmp_path / "mb"
    dry = _script(fresh_python, "--seeds", "4", "5", "--out", str(out), "--dry-run", "--",
                  "actor_rollout_ref.actor.ppo_mini_batch_size=256")
    assert dry.returncode == 0, dry.stderr
    lines = dry.stdout.strip().splitlines()
    assert len(lines) == 2 and not out.exists()
    assert all(f"data.seed={s} actor_rollout_ref.rollout.seed={s}" in ln and "EOPD_CACHE=" in ln
               and ln.endswith("actor_rollout_ref.actor.ppo_mini_batch_size=256") for s, ln in zip((4, 5), lines))
    overrides = ["actor_rollout_ref.actor.ppo_mini_batch_size=256"]
    _fake_seed(out, 4, 0.481, overrides)
    _fake_seed(out, 5, 0.43, overrides)
    base = tmp_path / "default"
    _fake_seed(base, 4, 0.481, [])
    early = _script(fresh_python, "--out", str(out), "--read", "--compare", str(base))  # one seed in both so far
    assert early.returncode == 0 and "needs >= 2 seeds in both, got [4]" in early.stdout, early.stderr
    _fake_seed(base, 5, 0.439, [])
    again = _script(fresh_python, "--seeds", "4", "5", "--out", str(out), "--compare", str(base), "--", *overrides)
    assert again.returncode == 0, again.stderr
    assert again.stdout.count("already done") == 2
    assert "| 4 | 19.7% | 48.1% (step 2) | +28.4 | 5.5 s | 6.0 min | AVX512 | 0.02% | 23% |" in again.stdout
    assert "1 of 2 reach +25" in again.stdout and "paired with" in again.stdout
    summary = json.loads((out / "summary.json").read_text())
    assert summary["paired"]["seeds"] == [4, 5] and summary["paired"]["mean_diff"] == pytest.approx(-0.45)
    # a seed is the same run only on the same pair: another EOPD_PAIR_DIR is run again, not read
    lift_seeds = _lift_seeds()
    cmd = lift_seeds.command(4, "eopd", overrides)
    with pytest.MonkeyPatch.context() as mp:
        mp.delenv("EOPD_PAIR_DIR", raising=False)
        mp.delenv("EOPD_EMBEDDED_TASK", raising=False)
        assert lift_seeds.finished(out / "seed4", cmd)
        mp.setenv("EOPD_PAIR_DIR", str(tmp_path / "another_pair"))
        assert not lift_seeds.finished(out / "seed4", cmd)
        dry = _script(fresh_python, "--seeds", "4", "--out", str(out), "--dry-run", "--", *overrides)
        assert f"EOPD_PAIR_DIR={tmp_path / 'another_pair'} EOPD_CACHE=" in dry.stdout, dry.stdout
    _fake_seed(out, 6, 0.5, overrides, rc=1)
    failed = _script(fresh_python, "--out", str(out), "--read")
    assert failed.returncode == 1 and "seed 6: exit status 1" in failed.stderr
    assert _script(fresh_python, "--out", str(tmp_path / "nothing"), "--read").returncode != 0
