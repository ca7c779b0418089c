"""Faults lose nothing: the command line killed with SIGKILL (mid-step, and during a checkpoint save), then run
again unchanged, resumes from the last complete checkpoint and ends at the same step, having trained on
exactly the prompts an uninterrupted run trains on, step by step (verl's dataloader state is part of the
checkpoint), and with the very model and optimizer state the last checkpoint saved. The uninterrupted order
is verl's own sampler's (verl.trainer.ppo.utils.create_rl_sampler over the same data config), computed here
without a run. tests/fault_inject.py is the injected fault, the prompt log and the state digests."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import ONE_AGENT_WORKER

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
            "reward.custom_reward_function.name=compute_score", ONE_AGENT_WORKER]


def _env(root: Path, name: str, **extra) -> dict:
    env = {**os.environ, "VERL_FILE_LOGGER_ROOT": str(root / "metrics"),
           "EOPD_TEST_PROMPT_LOG": str(root / f"{name}.prompts"), "EOPD_TEST_STATE_LOG": str(root / f"{name}.state"),
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
    marker.unlink(missing_ok=True)  # an earlier launch's fault
    log = open(root / f"{name}.killed.log", "w")
    # unbuffered: the killed driver's console (its log file) keeps every line it printed
    proc = subprocess.Popen(_command(root, name), cwd=root,
                            env=_env(root, name, EOPD_TEST_MARKER=str(marker), PYTHONUNBUFFERED="1", **extra),
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
    _wait_until_gone(f"EOPD_TEST_MARKER={marker}".encode())


def _wait_until_gone(entry: bytes, timeout: float = 120.0) -> None:
    """Wait until no process carries `entry` in its environment: the killed run's Ray processes (raylet, GCS,
    workers; each inherits the driver's environment) are gone once Ray's reaper has taken the cluster down."""
    deadline = time.time() + timeout
    while True:
        alive = []
        for pid in filter(str.isdigit, os.listdir("/proc")):
            try:
                with open(f"/proc/{pid}/environ", "rb") as f:
                    if entry in f.read().split(b"\0"):
                        alive.append(pid)
            except OSError:  # gone meanwhile, or not ours to read
                continue
        if not alive:
            return
        assert time.time() < deadline, f"processes of the killed run still alive after {timeout:.0f} s: {alive}"
        time.sleep(0.2)


def _steps_trained(root: Path, name: str) -> list[int]:
    path = root / "metrics" / "verl-eopd" / f"{name}.jsonl"
    return [r["step"] for r in map(json.loads, path.read_text().splitlines()) if "actor/loss" in r["data"]]


def _prompts_by_step(root: Path, name: str) -> list[list[int]]:
    idx = [int(line.split()[1]) for line in (root / f"{name}.prompts").read_text().splitlines()]
    return [sorted(idx[i:i + PROMPTS]) for i in range(0, len(idx) - len(idx) % PROMPTS, PROMPTS)]


def _tracker(root: Path, name: str) -> int:
    return int((root / "ckpt" / name / "latest_checkpointed_iteration.txt").read_text())


def _states(root: Path, name: str) -> list[dict]:
    path = root / f"{name}.state"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """The prompts of each step of an uninterrupted run: verl's sampler over the run's data config (the embedded
    pair's training split; verl's dataloader takes the sampler's indices PROMPTS at a time, dropping nothing
    before STEPS x PROMPTS)."""
    import pandas as pd
    from hydra import compose, initialize_config_dir
    from verl.trainer.ppo.utils import create_rl_sampler

    import verl_eopd
    from verl_eopd.cpu.embedded import embedded_pair

    root = tmp_path_factory.mktemp("faults")
    conf = str(Path(verl_eopd.__file__).parent / "conf")
    with initialize_config_dir(config_dir=conf, version_base=None):
        cfg = compose(config_name="eopd_trainer", overrides=[a for a in _command(root, "whole")[3:] if "=" in a
                                                                 and not a.startswith("reward.")])
    rows = pd.read_parquet(embedded_pair()["train"])
    order = list(iter(create_rl_sampler(cfg.data, list(range(len(rows))))))
    index = [int(rows.iloc[i]["extra_info"]["index"]) for i in order[:STEPS * PROMPTS]]
    by_step = [sorted(index[i:i + PROMPTS]) for i in range(0, STEPS * PROMPTS, PROMPTS)]
    assert len({tuple(s) for s in by_step}) == STEPS
    return root, by_step


@pytest.fixture(scope="module")
def faulted(reference) -> dict:
    """One run faulted twice, three launches of the same command (save_freq=1, STEPS steps):
    1. killed during the checkpoint save of step 2 (a torn model file, never recorded: the tracker names step 1);
    2. the same command resumes from step 1 and is killed with SIGKILL mid-step 4, while scoring its rollouts
       (steps 2 and 3 are checkpointed);
    3. the same command resumes from step 3 and ends at step STEPS.
    Each launch's prompts and console are kept apart; the metrics file is read after each launch: it keeps every
    launch's lines (integration/console.keep_earlier_launches; verl's file logger alone empties it on resume), so a
    launch's trained steps are the lines it added."""
    root, whole = reference
    name, ckpt = "faulted", root / "ckpt" / "faulted"
    out: dict = {"root": root, "whole": whole, "ckpt": ckpt, "prompts": [], "console": [], "trained": [],
                 "tracker": [], "file": []}

    def keep(launch: int, console: str) -> None:
        out["tracker"].append(_tracker(root, name))
        out["prompts"].append(_prompts_by_step(root, name))
        (root / f"{name}.prompts").rename(root / f"{name}.{launch}.prompts")
        out["console"].append(console)
        out["file"].append(_steps_trained(root, name))
        before = out["file"][-2] if len(out["file"]) > 1 else []
        out["trained"].append(out["file"][-1][len(before):])

    _run_until_killed(root, name, EOPD_TEST_HANG_IN_SAVE="2")
    out["torn_actor_dir"] = (ckpt / "global_step_1" / "actor").is_dir()
    out["torn_data_file"] = (ckpt / "global_step_1" / "data.pt").is_file()
    keep(1, (root / f"{name}.killed.log").read_text())
    # launch 2 scores steps 2 and 3 (2 x PROMPTS prompts), then 3 prompts of step 4 before the kill
    _run_until_killed(root, name, EOPD_TEST_HANG_AFTER=str(2 * PROMPTS + 3))
    keep(2, (root / f"{name}.killed.log").read_text())
    keep(3, _run(root, name).stdout)
    out["states"] = _states(root, name)
    return out


def test_kill_during_a_checkpoint_save_resumes_from_the_previous_checkpoint(faulted):
    whole, ckpt = faulted["whole"], faulted["ckpt"]
    # the save of step 2 is torn and never recorded: the tracker still names step 1, whose files are intact
    assert faulted["tracker"][0] == 1
    assert faulted["torn_actor_dir"] and faulted["torn_data_file"]
    first_two = faulted["prompts"][0][:2]
    assert f"resumed at step 1 from {ckpt / 'global_step_1'}" in faulted["console"][1]
    assert faulted["trained"][1] == [2, 3]  # the resumed launch trains step 2 again, then step 3
    assert faulted["tracker"][1] == 3
    # step 2 is trained again from step 1's state, on the same prompts; nothing after it is lost or repeated
    assert first_two[:1] + faulted["prompts"][1][:2] == whole[:3]
    assert first_two[1] == whole[1]
    # restored from step 1's state, not from anything the torn save of step 2 left
    saved = [e for e in faulted["states"] if e["event"] == "save"]
    loads = [e for e in faulted["states"] if e["event"] == "load"]
    assert loads[0]["path"] == str(ckpt / "global_step_1" / "actor")
    step1 = next(e for e in saved if e["step"] == 1 and e["path"] == str(ckpt / "global_step_1" / "actor"))
    assert all(loads[0][k] == step1[k] for k in ("model", "optimizer", "lr"))


def test_sigkill_mid_step_then_the_same_command_resumes_without_skipping_or_repeating(faulted):
    whole, ckpt, root = faulted["whole"], faulted["ckpt"], faulted["root"]
    # killed while scoring step 4's rollouts: steps 2 and 3 are checkpointed (step 1 by the first launch)
    assert faulted["tracker"][1] == 3
    assert f"resumed at step 3 from {ckpt / 'global_step_3'}" in faulted["console"][2]
    assert faulted["trained"][2] == [4]  # step 4 only: nothing retrained
    assert faulted["tracker"][2] == STEPS
    # no prompt skipped or repeated, step by step, over the three launches
    assert faulted["prompts"][0][:1] + faulted["prompts"][1][:2] + faulted["prompts"][2] == whole
    # the resumed run starts from exactly the state step 3 saved: model weights, AdamW moments and step, lr
    saved = {e["step"]: e for e in faulted["states"] if e["event"] == "save"}
    assert sorted(saved) == [1, 2, 3, 4]
    loads = [e for e in faulted["states"] if e["event"] == "load"]
    assert len(loads) == 2 and loads[1]["path"] == str(ckpt / "global_step_3" / "actor")  # the actor's manager
    for key in ("model", "optimizer", "n_optimizer_states", "lr"):
        assert loads[1][key] == saved[3][key], key
    assert saved[3]["n_optimizer_states"] > 0 and saved[2]["model"] != saved[3]["model"]  # the digests see training
    # the EOPD settings travel with each checkpoint and the resumed run's metrics are EOPD's
    settings = json.loads((ckpt / "global_step_3" / "eopd_settings.json").read_text())
    assert settings["loss_mode"] == "eopd" and settings["entropy_threshold"] == 0.8 and settings["fkl_coef"] == 1.0
    assert json.loads((ckpt / "global_step_4" / "eopd_settings.json").read_text()) == settings
    last = json.loads((root / "metrics" / "verl-eopd" / "faulted.jsonl").read_text().splitlines()[-1])["data"]
    assert all(f"actor/eopd/{k}" in last for k in ("teacher_entropy_mean", "gate_frac", "fkl_mean", "rkl_mean"))


def test_the_metrics_file_keeps_every_launchs_lines(faulted):
    """verl's file logger reopens the file with "wb" on each launch; the resumed launches put the earlier lines
    back first, so the file grows launch by launch and its last line per step is the step that counted."""
    from verl_eopd.math.curves import read_run

    files, root = faulted["file"], faulted["root"]
    assert files[0] and all(files[k][:len(files[k - 1])] == files[k - 1] for k in (1, 2))  # nothing lost
    assert files[2] == faulted["trained"][0] + [2, 3] + [4]  # every launch's trained steps, in launch order
    assert all("lines of earlier launches kept in" in c for c in faulted["console"][1:])
    series = read_run(str(root / "metrics" / "verl-eopd" / "faulted.jsonl"))
    assert sorted(series["actor/loss"]) == list(range(1, STEPS + 1))
