"""EOPDLossConfig validation, YAML/dataclass agreement, and registration in verl through the entry point."""

from __future__ import annotations

import dataclasses
import importlib.resources
import json
import os

import pytest
from omegaconf import OmegaConf

from verl_eopd.integration.config import EOPDLossConfig

pytestmark = pytest.mark.integration

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
            assert node[name] == "verl_eopd.integration.config.EOPDLossConfig"
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


def test_registration_is_idempotent_and_refuses_a_foreign_eopd(monkeypatch):
    import verl.trainer.distillation.losses as vl

    from verl_eopd import plugin
    from verl_eopd.integration.loss import eopd_distillation_loss, register_loss

    register_loss()
    register_loss()
    assert vl.DISTILLATION_LOSS_REGISTRY["eopd"] is eopd_distillation_loss
    assert vl.DISTILLATION_SETTINGS_REGISTRY["eopd"].use_topk
    assert plugin.check()["registered"]
    monkeypatch.setitem(vl.DISTILLATION_LOSS_REGISTRY, "eopd", lambda **kw: None)
    with pytest.raises(RuntimeError, match="already registered"):
        register_loss()


def test_verls_topk_processor_is_not_rebound():
    """No global patch of verl's loss module: its top-k processor is verl's own function."""
    import verl.trainer.distillation.losses as vl

    import verl_eopd.plugin  # noqa: F401  (the plugin is loaded: still nothing rebound)

    assert vl.compute_topk_loss.__module__ == "verl.trainer.distillation.losses"
    assert not hasattr(vl.compute_topk_loss, "__wrapped__")


def test_bound_loss_routes_eopd_to_its_processor_and_other_calls_to_verl(monkeypatch):
    """`eopd_ppo_loss` sends the processor call (student_logits given) to EOPD's processor and the final call
    to verl's distillation_ppo_loss, unchanged: both branches are called here with spies."""
    import verl.trainer.distillation.losses as vl

    from verl_eopd.integration import loss as L

    calls = []
    monkeypatch.setattr(L, "eopd_logits_processor", lambda *a, **k: calls.append(("eopd", a, k)) or "eopd-out")
    monkeypatch.setattr(vl, "distillation_ppo_loss", lambda *a, **k: calls.append(("verl", a, k)) or "verl-out")
    logits = object()
    assert L.eopd_ppo_loss("cfg", "dcfg", data="td", student_logits=logits) == "eopd-out"
    assert L.eopd_ppo_loss("cfg", "dcfg", model_output="mo", data="td", dp_group="g") == "verl-out"
    assert calls[0] == ("eopd", ("cfg", "dcfg", "td", logits, "thd"), {})
    assert calls[1] == ("verl", ("cfg", "dcfg"), {"model_output": "mo", "data": "td", "dp_group": "g"})


def test_other_verl_version_is_refused_loudly(monkeypatch):
    import verl

    from verl_eopd.integration.version import VerlVersionError, check_verl_version

    monkeypatch.setattr(verl, "__version__", "0.10.0")
    with pytest.raises(VerlVersionError, match="0.10.0"):
        check_verl_version()


def _clean(**env) -> dict:
    """This environment minus what other tests' in-process CPU set-up exported, plus ENV."""
    return {**{k: v for k, v in os.environ.items() if k not in ("VERL_USE_EXTERNAL_MODULES", "VERL_PLATFORM")}, **env}


def test_plain_import_verl_registers_eopd_in_a_fresh_process(fresh_python):
    """No import of verl_eopd: verl's own `verl.plugins` entry-point discovery must register the loss."""
    code = ("import json, verl, verl.trainer.distillation.losses as L; "
            "from verl.workers.rollout.replica import RolloutReplicaRegistry as R; "
            "print(json.dumps({'eopd': 'eopd' in L.DISTILLATION_LOSS_REGISTRY, 'hf': 'hf' in R._registry}))")
    out = fresh_python(["-c", code], env=_clean())
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout.strip().splitlines()[-1]) == {"eopd": True, "hf": True}
    off = fresh_python(["-c", code], env=_clean(VERL_USE_EXTERNAL_PLUGINS="none"))
    assert json.loads(off.stdout.strip().splitlines()[-1])["eopd"] is False


def test_plugin_command_checks_and_lists_every_patch(fresh_python):
    from verl_eopd.integration.patches import PATCHES

    out = fresh_python(["-m", "verl_eopd.plugin"], env=_clean())
    assert out.returncode == 0, out.stderr
    assert "'registered': True" in out.stdout
    for name, patch in PATCHES.items():
        assert f"] {name}  (verl {patch.verl_version})" in out.stdout, name
    assert "[ACTIVE  ] rollout-registry-hf" in out.stdout  # every process registers the hf backend
    assert "[inactive] cpu-offload-no-pin" in out.stdout  # only with VERL_PLATFORM=cpu
    cpu = fresh_python(["-m", "verl_eopd.plugin"], env=_clean(VERL_PLATFORM="cpu"))
    assert cpu.returncode == 0, cpu.stderr
    assert "[ACTIVE  ] cpu-offload-no-pin" in cpu.stdout and "[ACTIVE  ] teacher-topk-hf" in cpu.stdout


def test_integration_doc_lists_exactly_the_declared_patches():
    """docs/verl_integration.md's patch table names every declared patch and no other."""
    import re

    from verl_eopd.integration.patches import PATCHES

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    with open(os.path.join(root, "docs", "verl_integration.md")) as f:
        text = f.read()
    table = text[text.index("<!-- patches -->"):text.index("<!-- /patches -->")]
    documented = set(re.findall(r"^\| `([a-z0-9-]+)` \|", table, flags=re.M))
    assert documented == set(PATCHES), documented ^ set(PATCHES)


@pytest.mark.parametrize("overrides", [
    (),
    ("algorithm=opd",),
    ("algorithm=eopd_grpo", "data.train_batch_size=8", "distillation.distillation_loss.entropy_threshold=1.5"),
    ("algorithm=eopd_server", "trainer.logger=[console,file]", "+actor_rollout_ref.model.override_config.x=1"),
    ("data.train_batch_size=8", "algorithm=opd", "~trainer.dry_run", "distillation.distillation_loss.topk=4"),
    ("distillation_loss@distillation.distillation_loss=eopd", "algorithm.adv_estimator=grpo"),
])
def test_the_tests_cached_compose_equals_hydras(overrides):
    """conftest.compose_trainer (config-group choices composed once, value overrides applied to a copy) gives the
    config hydra's compose gives, value for value, with the same struct flags; a bad key fails the same way."""
    from hydra import compose, initialize_config_dir
    from hydra.errors import ConfigCompositionException

    from conftest import compose_trainer

    import verl_eopd

    conf = os.path.join(os.path.dirname(verl_eopd.__file__), "conf")
    with initialize_config_dir(config_dir=conf, version_base=None):
        expected = compose(config_name="eopd_trainer", overrides=list(overrides))
    got = compose_trainer(*overrides)
    assert OmegaConf.to_container(got, resolve=False) == OmegaConf.to_container(expected, resolve=False)
    assert OmegaConf.is_struct(got) and OmegaConf.is_struct(expected)
    for cfg in (got, compose_trainer(*overrides)):  # a copy each time: changing one leaves the next alone
        with pytest.raises(Exception, match="trainer.no_such_key"):
            cfg.trainer.no_such_key  # noqa: B018 (struct: unknown keys raise)
        cfg.data.train_batch_size = 12345
    assert compose_trainer(*overrides).data.train_batch_size != 12345
    with pytest.raises(ConfigCompositionException, match="trainer.no_such_key"):
        compose_trainer(*overrides, "trainer.no_such_key=1")
