"""scripts/plot_metrics.py: one validation-accuracy panel per benchmark from verl's `val-core/...` keys, next to
the training panels."""

import importlib.util
import json
import os

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _script():
    spec = importlib.util.spec_from_file_location("plot_metrics", os.path.join(ROOT, "scripts", "plot_metrics.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.unit
def test_validation_panels_pick_each_benchmarks_core_accuracy():
    keys = ["val-core/math500/acc/mean@16", "val-aux/math500/acc/mean@8", "val-aux/math500/reward/mean@16",
            "val-core/math500/acc/maj@16/mean", "val-core/aime24/acc/mean@16", "val-core/aime24/acc/mean@4",
            "val-core/eopd_tiny_add/reward/mean@1", "val-aux/num_turns/mean", "critic/score/mean",
            "val-core/deepmath/acc/best@16/mean"]
    assert _script().validation_panels(keys) == {
        "validation accuracy: aime24 (mean@16)": "val-core/aime24/acc/mean@16",
        "validation reward: eopd_tiny_add (mean@1)": "val-core/eopd_tiny_add/reward/mean@1",
        "validation accuracy: math500 (mean@16)": "val-core/math500/acc/mean@16",
    }


@pytest.mark.integration
def test_plot_metrics_draws_validation_beside_the_training_metrics(tmp_path, capsys):
    import matplotlib

    matplotlib.use("Agg")
    rows = []
    for step in range(0, 51):
        data = {} if step == 0 else {"actor/eopd/gate_frac": 0.2 + 0.001 * step, "critic/score/mean": 0.3}
        if step % 25 == 0:  # trainer.test_freq=25 and val_before_train: steps 0, 25, 50
            data.update({"val-core/math500/acc/mean@16": 0.4 + step / 500, "val-core/aime24/acc/mean@16": 0.05,
                         "val-aux/math500/reward/mean@16": 0.4})
        rows.append(json.dumps({"step": step, "data": data}))
    run = tmp_path / "verl-eopd" / "run.jsonl"
    run.parent.mkdir()
    run.write_text("\n".join(rows) + "\n")

    drawn = {}
    from verl_eopd.math import curves

    original = curves.plot

    def spy(groups, out_dir, panels=None, *args):
        drawn.update(panels or {})
        return original(groups, out_dir, panels, *args)

    module = _script()
    module.plot = spy
    assert module.main(["--run", f"EOPD={run}", "--out", str(tmp_path / "plots")]) == 0
    titles = list(drawn)
    assert titles[:len(curves.PANELS)] == list(curves.PANELS)  # the training panels first, then the benchmarks
    assert titles[len(curves.PANELS):] == ["validation accuracy: aime24 (mean@16)",
                                          "validation accuracy: math500 (mean@16)"]
    printed = capsys.readouterr().out.split()
    for name in ("val-core_math500_acc_mean@16.png", "val-core_aime24_acc_mean@16.png", "actor_eopd_gate_frac.png",
                 "metrics.png"):
        path = str(tmp_path / "plots" / name)
        assert path in printed
        with open(path, "rb") as f:
            assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    drawn.clear()
    module.main(["--run", f"EOPD={run}", "--out", str(tmp_path / "no_val"), "--no-validation"])
    assert drawn == {}  # curves.plot's default panels: the training metrics only
    assert not any(name.startswith("val-core") for name in os.listdir(tmp_path / "no_val"))
    assert os.path.exists(tmp_path / "no_val" / "actor_eopd_gate_frac.png")
