"""End to end on CPU: verl's real v1 trainer distils the embedded tiny student from the tiny teacher.

Each run is the command line itself, `python -m verl_eopd.main ...` in a subprocess (its own Ray session and
process state: embedded default, CPU settings, checks, EOPD trainer, HF rollout backend, teacher in the
reference worker). Metrics are read back from verl's file logger.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import pytest

from conftest import run_main

pytestmark = pytest.mark.e2e

DESIGN_METRICS = ("teacher_entropy_mean", "gate_frac", "fkl_mean", "fkl_gated_mean", "rkl_mean",
                  "student_entropy_mean", "student_entropy_gated_mean", "teacher_topk_mass_mean")
STEPS = 6


# The shipped student (600 SFT steps) is already close to the teacher's format and its remaining reverse KL
# sits on the digits, which 6 steps do not move reliably. These mechanics tests use the same pair with a
# student fine-tuned for 60 steps only (the format is still being learnt, so 6 steps of distillation give
# a clear, seed-robust fall in reverse KL) at lr 1e-3; scripts/mini_repro.py studies the shipped pair.
WEAK_STUDENT_STEPS = 60
LR = "1e-3"


@pytest.fixture(scope="module")
def e2e(tmp_path_factory):
    """A folder for the runs and an EOPD_CACHE holding the weak-student pair (built here, read by the runs)."""
    from verl_eopd.cpu import embedded

    root = tmp_path_factory.mktemp("e2e")
    cache = Path(os.environ["EOPD_CACHE"]).parent / f"weak_student_{WEAK_STUDENT_STEPS}"
    embedded.ensure_embedded_default(cache / embedded.VERSION, student_steps=WEAK_STUDENT_STEPS, verbose=False)
    return {"root": root, "cache": cache}


def _run(e2e: dict, algorithm: str, name: str, *overrides: str) -> list[dict]:
    """One mechanics run: no validation (the default run's test checks it), metrics from verl's file log."""
    root = e2e["root"]
    cmd = [f"algorithm={algorithm}", f"trainer.experiment_name={name}", "trainer.val_before_train=false",
           "trainer.test_freq=-1", "trainer.logger=[console,file]", f"actor_rollout_ref.actor.optim.lr={LR}",
           f"trainer.default_local_dir={root / 'ckpt' / name}", *overrides]
    run_main(cmd, cwd=root, VERL_FILE_LOGGER_ROOT=str(root / "metrics"), EOPD_CACHE=str(e2e["cache"]))
    path = root / "metrics" / "verl-eopd" / f"{name}.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()]


def _series(records, key):
    return [r["data"][key] for r in records if key in r["data"]]


def _check_run(records, steps):
    train = [r for r in records if "actor/loss" in r["data"]]
    assert [r["step"] for r in train] == list(range(1, steps + 1))
    for r in train:
        d = r["data"]
        for k in DESIGN_METRICS:
            assert f"actor/eopd/{k}" in d, k
        assert all(math.isfinite(v) for k, v in d.items() if k.startswith(("actor/", "critic/")) and isinstance(v, float))
        assert 0.0 < d["actor/eopd/gate_frac"] < 1.0
    rkl = _series(train, "actor/eopd/rkl_mean")
    # the student's reverse KL to the teacher falls (last three steps vs the first three, on-policy noise)
    assert sum(rkl[-3:]) < sum(rkl[:3]), rkl
    return train


@pytest.mark.parametrize("algorithm", ["eopd", "opd", "eopd_grpo"])
def test_tiny_default_end_to_end(e2e, algorithm):
    records = _run(e2e, algorithm, f"ci_{algorithm}", f"trainer.total_training_steps={STEPS}", "trainer.save_freq=-1")
    train = _check_run(records, STEPS)
    fkl = _series(train, "actor/eopd/fkl_mean")
    if algorithm == "eopd_grpo":
        assert "critic/score/mean" in train[0]["data"] and "actor/pg_loss" in train[0]["data"]
    assert all(math.isfinite(x) for x in fkl)


def test_checkpoint_and_resume(e2e):
    """Stop after 1 step with a checkpoint, rerun to 2: it resumes at step 1 and trains only step 2."""
    ckpt = e2e["root"] / "ckpt" / "resume"
    first = _run(e2e, "eopd", "ci_resume_a", "trainer.total_training_steps=1", "trainer.save_freq=1",
                 f"trainer.default_local_dir={ckpt}")
    assert [r["step"] for r in first if "actor/loss" in r["data"]] == [1]
    assert (ckpt / "global_step_1" / "actor").is_dir()
    saved = json.loads((ckpt / "global_step_1" / "eopd_settings.json").read_text())
    assert saved["loss_mode"] == "eopd" and saved["entropy_threshold"] == 0.8 and saved["fkl_coef"] == 1.0
    second = _run(e2e, "eopd", "ci_resume_b", "trainer.total_training_steps=2", "trainer.save_freq=1",
                  f"trainer.default_local_dir={ckpt}")
    steps = [r["step"] for r in second if "actor/loss" in r["data"]]
    assert steps == [2], steps
    assert json.loads((ckpt / "global_step_2" / "eopd_settings.json").read_text()) == saved
    for k in DESIGN_METRICS:
        assert f"actor/eopd/{k}" in second[-1]["data"]


def test_server_route_live_on_cpu(e2e):
    """algorithm=eopd_server end to end: verl's own teacher pool (MultiTeacherModelManager, the `hf` backend
    on a logical GPU), top-k payload through the agent loop, with the exact sampled-token column switched on
    in the server process (EOPD_TEACHER_TOKEN_COLUMN via the runtime env): no token needs the fallback."""
    records = _run(e2e, "eopd_server", "ci_server", "trainer.total_training_steps=2", "trainer.save_freq=-1")
    train = [r for r in records if "actor/loss" in r["data"]]
    assert [r["step"] for r in train] == [1, 2]
    for r in train:
        d = r["data"]
        assert d["actor/eopd/teacher_token_fallback_frac"] == 0.0
        assert 0.0 < d["actor/eopd/token_in_topk_frac"] <= 1.0
        assert d["actor/eopd/teacher_entropy_lower_mean"] <= d["actor/eopd/teacher_entropy_mean"] \
            <= d["actor/eopd/teacher_entropy_upper_mean"]
        assert 0.0 < d["actor/eopd/gate_frac"] < 1.0 and math.isfinite(d["actor/loss"])


def test_two_ranks_from_the_command_line(tmp_path):
    """`python -m verl_eopd.main algorithm=eopd trainer.n_gpus_per_node=2 trainer.total_training_steps=2`: Ray's
    logical GPUs and the micro-batches follow the ranks, and two FSDP2 ranks (gloo) train and log EOPD metrics
    (validation and the checkpoint switched off for time)."""
    run_main(["algorithm=eopd", "trainer.n_gpus_per_node=2", "trainer.total_training_steps=2",
              "trainer.val_before_train=false", "trainer.test_freq=-1", "trainer.save_freq=-1"], cwd=tmp_path)
    records = [json.loads(line) for line in (tmp_path / "verl-eopd" / "tiny_eopd.jsonl").read_text().splitlines()]
    train = [r for r in records if "actor/loss" in r["data"]]
    assert [r["step"] for r in train] == [1, 2]
    for r in train:
        assert all(f"actor/eopd/{k}" in r["data"] for k in DESIGN_METRICS)
        assert math.isfinite(r["data"]["actor/loss"]) and 0.0 < r["data"]["actor/eopd/gate_frac"] < 1.0


SHORT_STEPS = 30


def test_default_run_validates_at_both_ends_and_lifts_the_student(tmp_path):
    """The README's main command, shortened to SHORT_STEPS: verl validates greedily on the whole held-out split
    before training and at the end, the student's held-out accuracy rises, and the run ends with the summary
    (student before -> after, the teacher on the same problems, where the checkpoint and metrics are).

    The full 60-step run lifts the shipped student by about 30 points (docs/cpu.md); at 30 steps the rise
    measured is about 10 points, and the test asks for 4 (360 problems, greedy, so one problem is 0.28)."""
    proc = run_main(["algorithm=eopd", f"trainer.total_training_steps={SHORT_STEPS}",
                     f"trainer.test_freq={SHORT_STEPS}", f"trainer.save_freq={SHORT_STEPS}"], cwd=tmp_path)
    path = tmp_path / "verl-eopd" / "tiny_eopd.jsonl"
    records = [json.loads(line) for line in path.read_text().splitlines()]
    key = "val-core/eopd_tiny_add/acc/mean@1"
    val = [(r["step"], r["data"][key]) for r in records if key in r["data"]]
    assert [step for step, _ in val] == [0, SHORT_STEPS], val
    (_, before), (_, after) = val
    assert before <= 0.30, before  # the shipped student starts near the edge, not at the teacher's level
    assert after >= before + 0.04, val
    train = [r["data"] for r in records if "actor/eopd/gate_frac" in r["data"]]
    assert len(train) == SHORT_STEPS and all(0.05 < d["actor/eopd/gate_frac"] < 0.4 for d in train)
    out = proc.stdout
    assert "held-out accuracy" in out and f"{100 * before:.1f}% -> {100 * after:.1f}%" in out, out[-2000:]
    teacher = float(out.split("    teacher ")[1].split("%")[0])
    assert teacher >= 85.0, out[-2000:]
    assert f"checkpoint: {tmp_path / 'checkpoints' / 'verl-eopd' / 'tiny_eopd' / f'global_step_{SHORT_STEPS}'}" in out
    assert f"metrics:    {path}" in out
    # the console a person reads: the header, one compact line per step, no every-metric line
    assert "[verl_eopd] algorithm=eopd on CPU (1 rank), rollout hf" in out
    steps = [line for line in out.splitlines() if "[eopd] step " in line and " rkl " in line]
    assert len(steps) == SHORT_STEPS and all(len(line) < 200 for line in steps), steps[:3]
    assert "actor/pg_loss" not in out and "actor/eopd/gate_frac" not in out
    # the 60-step run stays under 20 KB: this run's console plus 60 - SHORT_STEPS more step lines
    console = len(proc.stdout) + len(proc.stderr)
    per_step = max(len(line) + 1 for line in steps)
    assert console + (60 - SHORT_STEPS) * per_step < 20_000, (console, per_step)
