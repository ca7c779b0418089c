"""The compact console: one short line per step from verl's metrics, `trainer.console: full` keeps verl's line."""

from __future__ import annotations

import pytest
import torch
from omegaconf import OmegaConf

from verl_eopd.integration.console import CompactConsole, compact_line, compact_tracking, console_mode



STEP = {"actor/eopd/rkl_mean": 0.41234, "actor/eopd/fkl_gated_mean": torch.tensor(0.2101), "actor/eopd/gate_frac": 0.1834,
        "actor/eopd/student_entropy_mean": 0.405, "critic/score/mean": 0.3125, "timing_s/step": 10.49,
        **{f"actor/other_{i}": float(i) for i in range(200)}}


@pytest.mark.unit
def test_a_step_is_one_short_line_with_the_eopd_columns():
    line = compact_line(STEP, 12, 60)
    assert line == "[eopd] step 12/60 rkl 0.412 fkl 0.210 gate 0.183 H 0.405 score 0.31 10.5s"
    assert "\n" not in line and len(line) < 120


@pytest.mark.unit
def test_validation_records_show_each_data_source():
    val = {"val-core/eopd_tiny_add/acc/mean@1": 0.4694, "val-core/eopd_tiny_multiple/acc/mean@1": 0.5,
           "val-aux/eopd_tiny_add/reward/mean@1": 0.47}
    assert compact_line(val, 0, 60) == "[eopd] step 0/60 validation: eopd_tiny_add 46.9%, eopd_tiny_multiple 50.0%"
    assert compact_line({**STEP, **val}, 60, 60).endswith("10.5s validation: eopd_tiny_add 46.9%, eopd_tiny_multiple 50.0%")


class _Tracking:  # verl's Tracking: a dict of backends under .logger
    def __init__(self):
        self.logger = {"console": object(), "file": object()}


@pytest.mark.unit
def test_the_console_backend_is_swapped_only_in_compact_mode(capsys):
    cfg = OmegaConf.create({"trainer": {"console": "compact"}})
    t = compact_tracking(_Tracking(), cfg, 60)
    assert isinstance(t.logger["console"], CompactConsole) and not isinstance(t.logger["file"], CompactConsole)
    t.logger["console"].log(STEP, 3)
    assert capsys.readouterr().out.startswith("[eopd] step 3/60 rkl 0.412")
    full = compact_tracking(_Tracking(), OmegaConf.create({"trainer": {"console": "full"}}), 60)
    assert not isinstance(full.logger["console"], CompactConsole)
    assert compact_tracking(None, cfg, 60) is None  # verl's trainer before fit


@pytest.mark.unit
def test_an_unknown_console_mode_names_the_key():
    with pytest.raises(ValueError, match=r"trainer.console='verbose'.*trainer.console=compact"):
        console_mode(OmegaConf.create({"trainer": {"console": "verbose"}}))
    assert console_mode(OmegaConf.create({"trainer": {}})) == "compact"


@pytest.mark.integration
def test_verls_config_dump_becomes_one_line_and_other_prints_pass(monkeypatch, capsys):
    import verl.trainer.main_ppo as main_ppo

    from verl_eopd.integration.console import quiet_config_dump

    monkeypatch.setattr(main_ppo, "pprint", main_ppo.pprint)  # restored after the test
    quiet_config_dump()
    main_ppo.pprint({"actor_rollout_ref": {"x": 1}, "trainer": {"y": list(range(500))}})
    out = capsys.readouterr().out
    assert out.count("\n") == 1 and "--cfg job" in out and "trainer.console=full" in out
    main_ppo.pprint("Initial validation metrics: {'a': 1}")  # the compact lines show the accuracies
    main_ppo.pprint({"other": 1})
    assert capsys.readouterr().out == "{'other': 1}\n"


class FakeClock:
    """A clock the test moves by hand: no wall time is read."""

    def __init__(self, now: float = 1000.0):
        self.now = now

    def __call__(self) -> float:
        return self.now


@pytest.mark.unit
def test_the_step_line_ends_with_elapsed_and_an_eta_from_the_pace_since_the_first_step(capsys):
    clock = FakeClock()
    console = CompactConsole(60, clock=clock)
    clock.now += 41.0  # validation before training
    console.log({"val-core/math500/acc/mean@1": 0.25}, 0)
    assert capsys.readouterr().out == "[eopd] step 0/60 validation: math500 25.0% | 0:41 elapsed\n"
    clock.now += 12.0  # step 1 took 12 s (timing_s/step): the pace is anchored at its start, t = 41 s
    console.log({"critic/score/mean": 0.5, "timing_s/step": 12.0}, 1)
    # 12 s per step x 59 steps left = 708 s
    assert capsys.readouterr().out == "[eopd] step 1/60 score 0.50 12.0s | 0:53 elapsed, ETA 11:48\n"
    clock.now += 3 * 20.0 + 30.0  # steps 2-4 at 20 s each and a 30 s checkpoint save: (53+90-41) s / 4 steps
    console.log({"critic/score/mean": 0.5, "timing_s/step": 20.0}, 4)
    assert capsys.readouterr().out.endswith("20.0s | 2:23 elapsed, ETA 23:48\n")  # 102/4 x 56 = 1428 s
    clock.now += 3600.0
    console.log({"timing_s/step": 20.0}, 60)
    assert capsys.readouterr().out.endswith("20.0s | 1:02:23 elapsed, ETA 0:00\n")  # the last step: nothing left


@pytest.mark.unit
def test_a_resumed_run_measures_its_own_pace_and_an_unknown_total_gives_no_eta(capsys):
    clock = FakeClock(5.0)
    console = CompactConsole(174, clock=clock)
    clock.now += 100.0  # loading the checkpoint of step 100, validating
    console.log({"timing_s/step": 40.0}, 101)  # anchor: step 100 done at t = 60 s after the start
    assert capsys.readouterr().out == "[eopd] step 101/174 40.0s | 1:40 elapsed, ETA 48:40\n"  # 40 x 73 = 2920 s
    no_total = CompactConsole(0, clock=clock)
    no_total.log({"timing_s/step": 40.0}, 3)
    assert capsys.readouterr().out == "[eopd] step 3/0 40.0s | 0:00 elapsed\n"


@pytest.mark.unit
def test_compact_tracking_gives_the_console_the_trainers_total():
    t = compact_tracking(_Tracking(), OmegaConf.create({"trainer": {"console": "compact"}}), 174)
    assert t.logger["console"].total_steps == 174 and t.console_logger is t.logger["console"]


@pytest.mark.unit
def test_a_resumed_runs_file_log_keeps_the_earlier_launches_lines(tmp_path, monkeypatch, capsys):
    """verl's own Tracking with its `file` backend (which reopens the log with "wb"): the lines read after the
    checkpoint loads come back at the head, a partial line of a killed launch is dropped, and the repeated step
    reads as its last line (math.curves.read_run)."""
    from verl.utils.tracking import Tracking

    from verl_eopd.integration.console import earlier_launches_log, keep_earlier_launches
    from verl_eopd.math.curves import read_run

    path = tmp_path / "m" / "run.jsonl"
    path.parent.mkdir()
    earlier = b'{"step":1,"data":{"actor/loss":1.0}}\n{"step":2,"data":{"actor/loss":2.0}}\n'
    path.write_bytes(earlier + b'{"step":3,"data":{"act')  # killed mid-line during step 3
    monkeypatch.setenv("VERL_FILE_LOGGER_PATH", str(path))
    cfg = OmegaConf.create({"trainer": {"logger": ["console", "file"], "project_name": "p", "experiment_name": "e"}})
    kept = earlier_launches_log(cfg)
    assert kept == (str(path), earlier)
    tracking = Tracking(project_name="p", experiment_name="e", default_backend=["file"])
    assert path.read_bytes() == b""  # what verl alone leaves of the earlier launches
    keep_earlier_launches(tracking, kept)
    tracking.log({"actor/loss": 2.5}, step=2)  # the resumed run repeats step 2 (checkpointed at step 1)
    tracking.log({"actor/loss": 3.0}, step=3)
    tracking.logger["file"].finish()
    assert path.read_bytes().startswith(earlier) and path.read_bytes().count(b"\n") == 4
    assert read_run(str(path))["actor/loss"] == {1: 1.0, 2: 2.5, 3: 3.0}
    assert "the 2 lines of earlier launches kept" in capsys.readouterr().out
    assert earlier_launches_log(OmegaConf.create({"trainer": {"logger": ["console"]}})) is None  # no file logger
    path.unlink()
    assert earlier_launches_log(cfg) is None  # a first launch: nothing to keep
    keep_earlier_launches(tracking, None)
