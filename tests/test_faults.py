"""Faults lose nothing: the command line killed with SIGKILL (mid-step, and during a checkpoint save), then run
again unchanged, resumes from the last complete checkpoint and ends at the same step, having trained on
exactly the prompts an uninterrupted run trains on, step by step (verl's dataloader state is part of the
checkpoint). tests/fault_inject.py is the injected fault and the prompt log."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.e2e

HERE = Path(__file__).parent
PROMPTS = 16  # prompts per step (one response each)
STEPS = 4


def _command(root: Path, name: str) -> list[str]:
    return [sys.executable, "-m", "verl_eopd.main", "algorithm=eopd", f"trainer.experiment_name={name}",
            f"trainer.default_local_dir={root / 'ckpt' / name}", f"trainer.total_training_steps={STEPS}",
            "trainer.save_freq=1", "trainer.max_actor_ckpt_to_keep=2", "trainer.val_before_train=false",
            "trainer.test_freq=-1", "trainer.logger=[console,file]", f"data.train_batch_size={PROMPTS}",
            f"actor_rollout_ref.actor.ppo_mini_batch_size={PROMPTS}", "actor_rollout_ref.actor.ppo_epochs=1",
            f"reward.custom_reward_function.path={HERE / 'fault_inject.py'}",
            "reward.custom_reward_function.name=compute_score"]


def _env(root: Path, name: str, **extra) -> dict:
    env = {**os.environ, "VERL_FILE_LOGGER_ROOT": str(root / "metrics"),
           "EOPD_TEST_PROMPT_LOG": str(root / f"{name}.prompts"),
           "PYTHONPATH": os.pathsep.join([str(HERE), os.environ.get("PYTHONPATH", "")]),
           # the plugin first: it registers the CPU platform that verl's checkpoint module resolves on import
           "VERL_USE_EXTERNAL_MODULES": "verl_eopd.plugin,fault_inject", **extra}
    return env


def _run(root: Path, name: str, **extra) -> subprocess.CompletedProcess:
    proc = subprocess.run(_command(root, name), cwd=root, env=_env(root, name, **extra), capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-4000:]
    return proc


def _run_until_killed(root: Path, name: str, **extra) -> None:
    """Start the command, wait for the injected fault's marker, SIGKILL the driver's whole process group."""
    marker = root / f"{name}.marker"
    log = open(root / f"{name}.killed.log", "w")
    proc = subprocess.Popen(_command(root, name), cwd=root, env=_env(root, name, EOPD_TEST_MARKER=str(marker), **extra),
                            stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    deadline = time.time() + 600
    while not marker.exists():
        if proc.poll() is not None:
            log.close()
            raise AssertionError(f"the run ended (rc {proc.returncode}) before the fault:\n"
                                 + (root / f"{name}.killed.log").read_text()[-3000:])
        assert time.time() < deadline, "no fault within 10 min"
        time.sleep(0.5)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(timeout=60)
    log.close()
    time.sleep(3)  # Ray's reaper takes the cluster down once the driver is gone


def _steps_trained(root: Path, name: str) -> list[int]:
    path = root / "metrics" / "verl-eopd" / f"{name}.jsonl"
    return [r["step"] for r in map(json.loads, path.read_text().splitlines()) if "actor/loss" in r["data"]]


def _prompts_by_step(root: Path, name: str) -> list[list[int]]:
    idx = [int(line.split()[1]) for line in (root / f"{name}.prompts").read_text().splitlines()]
    return [sorted(idx[i:i + PROMPTS]) for i in range(0, len(idx) - len(idx) % PROMPTS, PROMPTS)]


def _tracker(root: Path, name: str) -> int:
    return int((root / "ckpt" / name / "latest_checkpointed_iteration.txt").read_text())


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """The uninterrupted run: the prompts of each step."""
    root = tmp_path_factory.mktemp("faults")
    _run(root, "whole")
    assert _steps_trained(root, "whole") == list(range(1, STEPS + 1))
    by_step = _prompts_by_step(root, "whole")
    assert len(by_step) == STEPS and len({tuple(s) for s in by_step}) == STEPS
    return root, by_step


def test_sigkill_mid_step_then_the_same_command_resumes_without_skipping_or_repeating(reference):
    root, whole = reference
    # killed while scoring step 3's rollouts: steps 1 and 2 are checkpointed
    _run_until_killed(root, "killed", EOPD_TEST_HANG_AFTER=str(2 * PROMPTS + 3))
    assert _tracker(root, "killed") == 2
    before_kill = _prompts_by_step(root, "killed")[:2]
    log = root / "killed.prompts"
    log.rename(root / "killed.before.prompts")
    _run(root, "killed")  # the same command
    assert _steps_trained(root, "killed")[-2:] == [3, 4]
    assert _tracker(root, "killed") == STEPS
    after = _prompts_by_step(root, "killed")
    assert before_kill + after == whole  # no prompt skipped or repeated, step by step


def test_kill_during_a_checkpoint_save_resumes_from_the_previous_checkpoint(reference):
    root, whole = reference
    # the save of step 2 is torn and never recorded: the tracker still names step 1, whose files are intact
    _run_until_killed(root, "torn", EOPD_TEST_HANG_IN_SAVE="2")
    assert _tracker(root, "torn") == 1
    ckpt = root / "ckpt" / "torn"
    assert (ckpt / "global_step_1" / "actor").is_dir() and (ckpt / "global_step_1" / "data.pt").is_file()
    first_two = _prompts_by_step(root, "torn")[:2]
    (root / "torn.prompts").rename(root / "torn.before.prompts")
    proc = _run(root, "torn")
    assert f"resumed at step 1 from {ckpt / 'global_step_1'}" in proc.stdout
    assert _steps_trained(root, "torn")[-3:] == [2, 3, 4]
    assert _tracker(root, "torn") == STEPS
    # step 2 is trained again from step 1's state, on the same prompts; nothing after it is lost or repeated
    assert first_two[:1] + _prompts_by_step(root, "torn") == whole
    assert first_two[1] == whole[1]
