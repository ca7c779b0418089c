"""EOPDLossConfig validation, YAML/dataclass agreement, and registration in verl through the entry point."""

from __future__ import annotations

import dataclasses
import importlib.resources
import json
import os
import subprocess
import sys

import pytest
from omegaconf import OmegaConf

from verl_eopd.config import EOPDLossConfig

RUNTIME_FIELDS = {"global_batch_info", "loss_settings"}


def test_paper_defaults():
    c = EOPDLossConfig()
    assert (c.loss_mode, c.topk, c.entropy_threshold, c.fkl_coef, c.clip_ratio_low, c.clip_ratio_high, c.gate) == (
        "eopd", 16, 0.8, 1.0, 0.2, 0.2, "hard")
    assert c.use_policy_gradient is False and c.loss_max_clamp is None and c.log_prob_min_clamp is None
    assert c.loss_settings.use_topk


def test_yaml_defaults_equal_dataclass_defaults_and_every_key_is_commented():
    path = importlib.resources.files("verl_eopd") / "conf" / "distillation_loss" / "eopd.yaml"
    text = path.read_text()
    node = OmegaConf.to_container(OmegaConf.create(text))
    fields = {f.name: f for f in dataclasses.fields(EOPDLossConfig) if f.name not in RUNTIME_FIELDS}
    assert set(node) == set(fields), set(node) ^ set(fields)
    for name, f in fields.items():
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        if name == "_target_":
            assert node[name] == "verl_eopd.config.EOPDLossConfig"
        else:
            assert node[name] == default, name
    lines = text.splitlines()
    for i, line in enumerate(lines):
        if line and not line.startswith("#") and ":" in line:
            assert lines[i - 1].startswith("#"), f"key without a comment line: {line}"


def test_yaml_instantiates_through_verls_omega_conf_to_dataclass():
    from verl.utils.config import omega_conf_to_dataclass

    path = importlib.resources.files("verl_eopd") / "conf" / "distillation_loss" / "eopd.yaml"
    node = OmegaConf.create(path.read_text())
    node.entropy_threshold = 1.3
    cfg = omega_conf_to_dataclass(node)
    assert isinstance(cfg, EOPDLossConfig) and cfg.entropy_threshold == 1.3


@pytest.mark.parametrize(
    "key,value",
    [
        ("entropy_threshold", -0.1), ("entropy_threshold", float("nan")), ("topk", 0), ("topk", 2.5),
        ("gate", "sigmoid"), ("fkl_coef", -1.0), ("gate_temperature", 0.0), ("gate_quantile", 0.0),
        ("gate_quantile", 1.5), ("entropy_estimator", "exact"), ("clip_ratio_low", 1.0), ("clip_ratio_high", -0.2),
        ("clip_ratio_c", 0.5), ("use_policy_gradient", True), ("loss_max_clamp", 10.0), ("log_prob_min_clamp", -10.0),
        ("use_chunked_topk", True), ("teacher_vocab_size", 4), ("logits_chunk_mb", 0), ("loss_mode", "k3"),
        ("distillation_loss_coef", -2.0),
    ],
)
def test_invalid_values_fail_at_build_time_naming_the_key(key, value):
    with pytest.raises(ValueError) as e:
        EOPDLossConfig(**{key: value})
    assert f"distillation.distillation_loss.{key}=" in str(e.value)
    assert "Fix:" in str(e.value)


def test_registration_is_idempotent_and_dispatch_leaves_other_modes_alone():
    import verl.trainer.distillation.losses as vl

    from verl_eopd import plugin

    plugin.register()
    plugin.register()
    assert vl.DISTILLATION_LOSS_REGISTRY["eopd"] is plugin.eopd_distillation_loss
    assert vl.compute_topk_loss.__wrapped__.__module__ == "verl.trainer.distillation.losses"
    assert plugin.check()["registered"]


def test_other_verl_version_is_refused_loudly(monkeypatch):
    import verl

    from verl_eopd import plugin

    monkeypatch.setattr(verl, "__version__", "0.10.0")
    with pytest.raises(plugin.VerlVersionError, match="0.10.0"):
        plugin._check_verl_version()


def _run(code: str, **env) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                          env={**os.environ, **env})


def test_plain_import_verl_registers_eopd_in_a_fresh_process():
    """No import of verl_eopd: verl's own `verl.plugins` entry-point discovery must register the loss."""
    code = ("import json, verl, verl.trainer.distillation.losses as L; "
            "print(json.dumps({'eopd': 'eopd' in L.DISTILLATION_LOSS_REGISTRY, "
            "'dispatch': getattr(L.compute_topk_loss, '_eopd_dispatch', False)}))")
    out = _run(code)
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout.strip().splitlines()[-1]) == {"eopd": True, "dispatch": True}
    off = _run(code, VERL_USE_EXTERNAL_PLUGINS="none")
    assert json.loads(off.stdout.strip().splitlines()[-1])["eopd"] is False


def test_plugin_check_command():
    out = subprocess.run([sys.executable, "-m", "verl_eopd.plugin"], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert "'registered': True" in out.stdout
