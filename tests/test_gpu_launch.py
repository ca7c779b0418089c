"""The card's command on GPU machines (issue 23, items 1 and 5), checked before Ray with stand-ins: a visible GPU
(`verl_eopd.cpu.platform.gpu_available`) and importable or missing vllm / sglang / flash-attn / tensorboard
(`importlib.util.find_spec`). `verl_eopd.main.prepare` runs every check of a launch, verl's `validate_config`
included, on local tiny models and data (the tokenizer check is real); nothing starts Ray or loads weights."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest
from conftest import compose_trainer

pytestmark = pytest.mark.integration

ALGORITHMS = ("eopd", "opd", "eopd_grpo", "eopd_server")


def _machine(monkeypatch, gpu=True, modules=("vllm", "tensorboard")):
    """This machine: a GPU or not, and which of vllm, sglang, flash_attn, tensorboard import."""
    import importlib.util

    from verl_eopd.cpu import platform as cpu

    monkeypatch.setattr(cpu, "gpu_available", lambda: gpu)
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    real = importlib.util.find_spec
    stubbed = ("vllm", "sglang", "flash_attn", "tensorboard")

    def find_spec(name, *a):
        if name in stubbed:
            return object() if name in modules else None
        return real(name, *a)

    monkeypatch.setattr(importlib.util, "find_spec", find_spec)


def _generic(models, algorithm="eopd", train=None):
    """The README's command with the user's models and data and nothing else."""
    return [f"algorithm={algorithm}", f"actor_rollout_ref.model.path={models['student']}",
            f"distillation.teacher_models.teacher_model.model_path={models['teacher']}",
            f"data.train_files={train or models['train']}", f"data.val_files={models['val']}"]


def _prepare(overrides):
    """`python -m verl.trainer.main <overrides>` up to Ray: compose, then prepare with the command's keys as the
    user's (as verl_eopd.main does)."""
    from verl_eopd.main import prepare

    cfg = compose_trainer(*overrides)
    algorithm = next(o.split("=", 1)[1] for o in overrides if o.startswith("algorithm="))
    prepared = prepare(cfg, user_keys=[o.split("=", 1)[0].lstrip("+~") for o in overrides], algorithm=algorithm)
    return cfg, prepared


def _fix(message: str) -> str:
    m = re.search(r"Fix: ([\w.]+=[^\s,;<>()]+)", message)
    assert m, f"no pasteable fix in: {message}"
    return m.group(1).rstrip(".")


@pytest.mark.parametrize("nnodes", [1, 2])
@pytest.mark.parametrize("algorithm", ALGORITHMS)
def test_the_generic_command_is_the_papers_run_on_gpus(tiny_models, no_model_loads, monkeypatch, algorithm, nnodes):
    """8 GPUs per node, one or two nodes: vllm, FSDP2 for the actor and the teacher, dynamic batch sizes (verl's
    worker asserts: no micro-batch needed, the log-prob passes follow the actor), the presets' run-level values,
    a run name from the models and data, and no CPU setting anywhere."""
    _machine(monkeypatch)
    cfg, (loss, env, on_cpu, embedded) = _prepare(
        _generic(tiny_models, algorithm) + ["trainer.n_gpus_per_node=8", f"trainer.nnodes={nnodes}"])
    aref, trainer = cfg.actor_rollout_ref, cfg.trainer
    assert not on_cpu and embedded is None and "VERL_PLATFORM" not in env
    assert trainer.device == "cuda" and (trainer.n_gpus_per_node, trainer.nnodes) == (8, nnodes)
    assert aref.rollout.name == "vllm" and aref.rollout.dtype == "bfloat16"
    assert "bypass_mode" not in cfg.algorithm.rollout_correction or not cfg.algorithm.rollout_correction.bypass_mode
    assert aref.actor.strategy == "fsdp2" and aref.ref.strategy == "fsdp2"
    assert aref.actor.fsdp_config.strategy == "fsdp2" and aref.ref.fsdp_config.strategy == "fsdp2"
    # verl's ActorRolloutRefWorker.init_model asserts (engine_workers.py)
    assert aref.actor.use_dynamic_bsz is True and aref.rollout.log_prob_use_dynamic_bsz is True
    assert aref.ref.log_prob_use_dynamic_bsz is True
    assert aref.actor.ppo_max_token_len_per_gpu >= cfg.data.max_prompt_length + cfg.data.max_response_length
    assert aref.rollout.log_prob_max_token_len_per_gpu is not None
    # the run
    run = (trainer.total_epochs, trainer.save_freq, trainer.max_actor_ckpt_to_keep, trainer.test_freq)
    assert run == (3, 50, 2, 25)
    assert list(trainer.logger) == ["console", "file", "tensorboard"] and trainer.val_before_train is True
    assert cfg.data.apply_chat_template_kwargs.enable_thinking is False
    assert trainer.project_name == "verl-eopd"
    assert re.fullmatch(rf"{algorithm}_student_from_teacher_train_[0-9a-f]{{8}}", trainer.experiment_name)
    assert trainer.default_local_dir.endswith(f"checkpoints/verl-eopd/{trainer.experiment_name}")
    assert Path(trainer.default_local_dir).is_absolute()
    assert env["VERL_FILE_LOGGER_PATH"].endswith(f"verl-eopd/{trainer.experiment_name}.jsonl")
    assert cfg.ray_kwargs.ray_init.runtime_env.env_vars.VERL_FILE_LOGGER_PATH == env["VERL_FILE_LOGGER_PATH"]
    if nnodes == 2:  # a path the user exported reaches every node's processes too, made absolute
        monkeypatch.setenv("VERL_FILE_LOGGER_PATH", "logs/mine.jsonl")
        cfg, (_, env, _, _) = _prepare(
            _generic(tiny_models, algorithm) + ["trainer.n_gpus_per_node=8", f"trainer.nnodes={nnodes}"])
        assert env["VERL_FILE_LOGGER_PATH"] == str(Path("logs/mine.jsonl").resolve())
        assert cfg.ray_kwargs.ray_init.runtime_env.env_vars.VERL_FILE_LOGGER_PATH == env["VERL_FILE_LOGGER_PATH"]
    if algorithm == "eopd_server":
        assert loss.teacher_route == "server" and cfg.distillation.enabled
        assert cfg.distillation.teacher_models.teacher_model.inference.name == "vllm"
    else:
        assert loss.teacher_route == "ref" and not cfg.distillation.enabled


def test_the_generic_command_composes_from_the_command_line(tmp_path, tiny_models, fresh_python):
    """`python -m verl.trainer.main` with the models and data prints the presets' FSDP2 and run-level values."""
    import os

    out = fresh_python(["-m", "verl.trainer.main", *_generic(tiny_models), "--cfg", "job"], cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-2000:]
    import yaml

    cfg = yaml.safe_load(out.stdout)
    actor = cfg["actor_rollout_ref"]["actor"]
    assert actor["strategy"] == "fsdp2" and actor["fsdp_config"]["strategy"] == "fsdp2"
    assert cfg["trainer"]["total_epochs"] == 3 and cfg["trainer"]["experiment_name"] == "auto"
    assert cfg["data"]["apply_chat_template_kwargs"] == {"enable_thinking": False}
    assert os.path.basename(cfg["actor_rollout_ref"]["model"]["path"]) == "student"


def test_sglang_when_vllm_is_missing_and_the_users_backend_wins(tiny_models, no_model_loads, monkeypatch):
    _machine(monkeypatch, modules=("sglang",))
    cfg, _ = _prepare(_generic(tiny_models))
    assert cfg.actor_rollout_ref.rollout.name == "sglang"
    _machine(monkeypatch, modules=("vllm", "sglang"))
    cfg, _ = _prepare(_generic(tiny_models) + ["actor_rollout_ref.rollout.name=sglang"])
    assert cfg.actor_rollout_ref.rollout.name == "sglang"


@pytest.mark.parametrize("algorithm", ["eopd", "eopd_server"])
def test_a_gpu_machine_without_vllm_or_sglang_fails_before_ray_with_the_install_command(tiny_models, no_model_loads,
                                                                                       monkeypatch, algorithm):
    """Never the CPU settings or the hf backend: the run stops naming the key and the install command."""
    _machine(monkeypatch, modules=())
    with pytest.raises(ValueError) as e:
        _prepare(_generic(tiny_models, algorithm))
    message = str(e.value)
    assert message.startswith("actor_rollout_ref.rollout.name is not set") and "neither vllm nor sglang" in message
    assert "Fix: pip install 'verl[vllm]==0.9.1'" in message
    # the user's vllm on a machine that cannot import it: the same install command
    with pytest.raises(ValueError) as e:
        _prepare(_generic(tiny_models, algorithm) + ["actor_rollout_ref.rollout.name=vllm"])
    assert str(e.value).startswith("actor_rollout_ref.rollout.name=vllm: this GPU machine cannot import vllm")
    assert "Fix: pip install 'verl[vllm]==0.9.1'" in str(e.value)


@pytest.mark.parametrize("override", ["distillation.teacher_models.teacher_model.inference.name=hf",
                                      "actor_rollout_ref.rollout.name=hf"])
def test_eopd_server_with_an_hf_teacher_on_gpus_is_refused_before_ray(tiny_models, no_model_loads, monkeypatch,
                                                                       override):
    """verl 0.9.1 refuses an hf top-k teacher after Ray has started (only the CPU platform patches it); here it
    stops before, and the fix pasted after the bad override passes every check."""
    _machine(monkeypatch)
    with pytest.raises(ValueError) as e:
        _prepare(_generic(tiny_models, "eopd_server") + [override])
    message = str(e.value)
    assert message.startswith("distillation.teacher_models.teacher_model.inference.name=hf:"), message
    fix = _fix(message)
    assert fix == "distillation.teacher_models.teacher_model.inference.name=vllm"
    _prepare(_generic(tiny_models, "eopd_server") + [override, fix])


@pytest.mark.parametrize("gpu", [True, False])
@pytest.mark.parametrize("key", ["actor_rollout_ref.actor.strategy", "actor_rollout_ref.ref.strategy"])
def test_fsdp1_is_refused_before_ray_and_the_fix_passes(tiny_models, no_model_loads, monkeypatch, key, gpu):
    """FSDP1 (verl's `fsdp`) runs code no test of the package runs: refused with a pasteable `...strategy=fsdp2`."""
    _machine(monkeypatch, gpu=gpu)
    override = f"{key}=fsdp"
    with pytest.raises(ValueError) as e:
        _prepare(_generic(tiny_models) + [override])
    message = str(e.value)
    assert message.startswith(override + ": FSDP1 is not supported"), message
    assert _fix(message) == f"{key}=fsdp2"
    cfg, _ = _prepare(_generic(tiny_models) + [override, _fix(message)])
    assert cfg.actor_rollout_ref.actor.strategy == cfg.actor_rollout_ref.ref.strategy == "fsdp2"


def test_every_value_the_user_writes_wins(tiny_models, no_model_loads, monkeypatch):
    _machine(monkeypatch, modules=("vllm", "sglang", "tensorboard"))
    cfg, _ = _prepare(_generic(tiny_models) + [
        "trainer.total_epochs=2", "trainer.save_freq=10", "trainer.max_actor_ckpt_to_keep=5", "trainer.test_freq=-1",
        "trainer.logger=[console,wandb]", "trainer.project_name=mine", "trainer.experiment_name=run1",
        "data.apply_chat_template_kwargs.enable_thinking=true", "actor_rollout_ref.rollout.name=sglang",
        "actor_rollout_ref.actor.ppo_micro_batch_size_per_gpu=2"])
    trainer = cfg.trainer
    run = (trainer.total_epochs, trainer.save_freq, trainer.max_actor_ckpt_to_keep, trainer.test_freq)
    assert run == (2, 10, 5, -1) and list(trainer.logger) == ["console", "wandb"]
    assert (trainer.project_name, trainer.experiment_name) == ("mine", "run1")
    assert trainer.default_local_dir.endswith("checkpoints/mine/run1")
    assert cfg.data.apply_chat_template_kwargs.enable_thinking is True
    aref = cfg.actor_rollout_ref
    assert aref.rollout.name == "sglang"  # the user's backend over verl's default vllm
    # a micro-batch set by the user keeps fixed micro-batches; the unset ones are fitted to the batches
    assert aref.actor.use_dynamic_bsz is False and aref.actor.ppo_micro_batch_size_per_gpu == 2
    assert aref.rollout.log_prob_micro_batch_size_per_gpu == 16 and aref.ref.log_prob_micro_batch_size_per_gpu == 16


def test_fixed_micro_batches_when_the_user_turns_dynamic_batching_off(tiny_models, no_model_loads, monkeypatch):
    """use_dynamic_bsz=false and no micro-batch: each one cuts its rank's share (2 nodes x 8 GPUs: 32 prompts per
    mini-batch -> 2 per rank; 128 per rollout batch -> 8), and verl's checks pass."""
    _machine(monkeypatch)
    cfg, _ = _prepare(_generic(tiny_models) + ["trainer.nnodes=2", "actor_rollout_ref.actor.use_dynamic_bsz=false"])
    aref = cfg.actor_rollout_ref
    assert aref.actor.use_dynamic_bsz is False and aref.actor.ppo_micro_batch_size_per_gpu == 2
    assert aref.rollout.log_prob_micro_batch_size_per_gpu == 8 and aref.ref.log_prob_micro_batch_size_per_gpu == 8


def test_a_token_budget_below_one_sequence_is_refused_and_the_fix_passes(tiny_models, no_model_loads, monkeypatch):
    _machine(monkeypatch)
    bad = ["data.max_response_length=20000"]
    with pytest.raises(ValueError) as e:
        _prepare(_generic(tiny_models) + bad)
    assert str(e.value).startswith("actor_rollout_ref.actor.ppo_max_token_len_per_gpu=16384:")
    fix = _fix(str(e.value))
    assert fix == "actor_rollout_ref.actor.ppo_max_token_len_per_gpu=21024"
    _prepare(_generic(tiny_models) + bad + [fix])


def test_without_tensorboard_the_loggers_are_console_and_file(tiny_models, no_model_loads, monkeypatch):
    _machine(monkeypatch, modules=("vllm",))
    cfg, _ = _prepare(_generic(tiny_models))
    assert list(cfg.trainer.logger) == ["console", "file"]


def _other_data(tmp_path, models) -> str:
    """The same training file under another folder (same file name, other data as far as a run knows)."""
    other = tmp_path / "other_data"
    other.mkdir()
    shutil.copy(models["train"], other / "train.parquet")
    return str(other / "train.parquet")


def test_the_run_name_and_checkpoint_folder_follow_the_models_and_data(tmp_path, tiny_models, no_model_loads,
                                                                       monkeypatch):
    _machine(monkeypatch)
    first, _ = _prepare(_generic(tiny_models))
    again, _ = _prepare(_generic(tiny_models))
    other, _ = _prepare(_generic(tiny_models, train=_other_data(tmp_path, tiny_models)))
    opd, _ = _prepare(_generic(tiny_models, "opd"))
    assert first.trainer.experiment_name == again.trainer.experiment_name  # one run, one name: it resumes
    names = {first.trainer.experiment_name, other.trainer.experiment_name, opd.trainer.experiment_name}
    folders = {first.trainer.default_local_dir, other.trainer.default_local_dir, opd.trainer.default_local_dir}
    assert len(names) == 3 and len(folders) == 3


def test_relative_model_and_data_paths_become_absolute(tmp_path, tiny_models, no_model_loads, monkeypatch):
    """Relative paths (from the run's directory; tests run in their own tmp cwd) are recorded absolute: Ray
    workers on other nodes and the checkpoint's record of its models and data need them."""
    _machine(monkeypatch)
    shutil.copytree(Path(tiny_models["student"]), tmp_path / "s")
    shutil.copy(tiny_models["train"], tmp_path / "t.parquet")
    cfg, _ = _prepare(["algorithm=eopd", "actor_rollout_ref.model.path=s",
                       f"distillation.teacher_models.teacher_model.model_path={tiny_models['teacher']}",
                       "data.train_files=[t.parquet]", f"data.val_files={tiny_models['val']}"])
    assert cfg.actor_rollout_ref.model.path == str(tmp_path / "s")
    assert list(cfg.data.train_files) == [str(tmp_path / "t.parquet")]


@pytest.mark.parametrize("change", ["data", "student"])
def test_resuming_a_checkpoint_of_other_data_or_models_is_refused_before_ray(tmp_path, tiny_models, no_model_loads,
                                                                             monkeypatch, change):
    """A checkpoint folder the user pins (trainer.default_local_dir, as scripts/paper_recipe.sh does) whose
    eopd_settings.json records other training data or another student: refused naming what changed; the escape
    trainer.resume_accept_changed_eopd=true passes; the same data and models resume."""
    from verl_eopd.integration.config import settings_record

    _machine(monkeypatch)
    ckpt = tmp_path / "ckpt"
    where = f"trainer.default_local_dir={ckpt}"
    trained, _ = _prepare(_generic(tiny_models) + [where])
    (ckpt / "global_step_3").mkdir(parents=True)
    (ckpt / "latest_checkpointed_iteration.txt").write_text("3")
    (ckpt / "global_step_3" / "eopd_settings.json").write_text(json.dumps(settings_record(trained)))
    _prepare(_generic(tiny_models) + [where])  # the same run resumes
    if change == "data":
        now = _generic(tiny_models, train=_other_data(tmp_path, tiny_models))
        key = "train_files"
    else:
        other = tmp_path / "other_student"
        shutil.copytree(Path(tiny_models["student"]), other)
        now = [o for o in _generic(tiny_models) if not o.startswith("actor_rollout_ref.model.path=")]
        now.append(f"actor_rollout_ref.model.path={other}")
        key = "student_model_path"
    with pytest.raises(ValueError) as e:
        _prepare(now + [where])
    message = str(e.value)
    assert f"{key}: " in message and "global_step_3" in message
    assert "Fix: trainer.resume_accept_changed_eopd=true" in message
    _prepare(now + [where, _fix(message)])
    _prepare(now + [where, "trainer.resume_mode=disable"])


def test_the_embedded_cpu_default_keeps_its_run_settings(no_model_loads, monkeypatch):
    """No model given, on CPU: the presets' run-level values for real models do not reach the embedded run
    (verl's 30 epochs and unlimited kept checkpoints, its own name, steps, validation and loggers, no thinking
    switch), and FSDP2 as before."""
    _machine(monkeypatch, gpu=False, modules=("tensorboard",))
    cfg, (_, env, on_cpu, embedded) = _prepare(["algorithm=eopd"])
    trainer = cfg.trainer
    assert on_cpu and embedded is not None and env["VERL_PLATFORM"] == "cpu"
    assert (trainer.total_epochs, trainer.max_actor_ckpt_to_keep, trainer.total_training_steps) == (30, None, 60)
    assert (trainer.save_freq, trainer.test_freq, list(trainer.logger)) == (60, 20, ["console", "file"])
    assert (trainer.project_name, trainer.experiment_name) == ("verl-eopd", "tiny_eopd")
    assert trainer.default_local_dir.endswith("checkpoints/verl-eopd/tiny_eopd")
    assert dict(cfg.data.apply_chat_template_kwargs) == {}
    assert cfg.actor_rollout_ref.rollout.name == "hf" and cfg.algorithm.rollout_correction.bypass_mode is True
    assert cfg.actor_rollout_ref.actor.strategy == cfg.actor_rollout_ref.ref.strategy == "fsdp2"
    assert cfg.actor_rollout_ref.actor.use_dynamic_bsz is False


def test_the_embedded_default_on_a_gpu_without_vllm_recomputes_old_log_probs(no_model_loads, monkeypatch):
    """No model given on a GPU machine without vLLM: the hf backend generates on the rollout worker's CPU in the
    rollout dtype (bf16), so its log-probs are not the old log-probs (no bypass mode); its server route (an hf
    teacher) is refused before Ray."""
    _machine(monkeypatch, modules=())
    cfg, (_, env, on_cpu, _) = _prepare(["algorithm=eopd"])
    assert not on_cpu and cfg.actor_rollout_ref.rollout.name == "hf"
    assert cfg.algorithm.rollout_correction.bypass_mode is False
    with pytest.raises(ValueError, match="teacher_model.inference.name=hf"):
        _prepare(["algorithm=eopd_server"])
