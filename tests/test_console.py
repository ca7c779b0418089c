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
