"""Promised refusals (docs/verl_integration.md "Known limits", README): a Megatron actor or reference, a LoRA
actor with the reference-worker teacher, and a teacher whose embedding table is smaller than the student's
tokenizer. Each fails in `verl_eopd.main.prepare` (every check of a run) before Ray starts or any weights load,
with "key=value: why. Fix: ..." naming the key; where the fix is an override, pasting it makes the run pass.
(The helpers follow tests/test_entrypoint.py.)"""

from __future__ import annotations

import re

import pytest
from conftest import compose_trainer

pytestmark = pytest.mark.integration


def _run(models, *overrides):
    """verl_eopd.main.prepare on the tiny pair with `overrides` (the checks of `python -m verl_eopd.main`)."""
    from verl_eopd.main import prepare

    cfg = compose_trainer(
        "algorithm=eopd", f"actor_rollout_ref.model.path={models['student']}",
        f"data.train_files={models['train']}", f"data.val_files={models['val']}",
        f"distillation.teacher_models.teacher_model.model_path={models['teacher']}",
        "actor_rollout_ref.actor.ppo_micro_batch_size_per_gpu=2",
        "actor_rollout_ref.rollout.log_prob_micro_batch_size_per_gpu=2",
        "actor_rollout_ref.ref.log_prob_micro_batch_size_per_gpu=2", *overrides)
    return prepare(cfg, user_keys=[o.split("=", 1)[0].lstrip("+~") for o in overrides])


def _fix(message: str) -> str:
    """The `key=value` override right after "Fix:"."""
    m = re.search(r"Fix: ([\w.]+=[^\s,;<>()]+)", message)
    assert m, f"no pasteable fix in: {message}"
    return m.group(1).rstrip(".")


@pytest.mark.parametrize("override,fix", [
    ("actor_rollout_ref.actor.strategy=megatron", "actor_rollout_ref.actor.strategy=fsdp2"),
    ("actor_rollout_ref.ref.strategy=megatron", "actor_rollout_ref.ref.strategy=fsdp2"),
    ("actor_rollout_ref.model.lora_rank=8", "actor_rollout_ref.model.lora_rank=0"),
    ("actor_rollout_ref.model.lora.rank=8", "actor_rollout_ref.model.lora.rank=0"),
])
def test_refused_before_any_model_loads_naming_the_key_and_the_fix_works(tiny_models, no_model_loads, override, fix):
    with pytest.raises(ValueError) as e:
        _run(tiny_models, override)
    message = str(e.value)
    assert message.startswith(override + ":"), message  # "key=value: why. Fix: ..."
    assert _fix(message) == fix
    _run(tiny_models, override, fix)  # pasted after the bad override, every check passes


def test_lora_is_accepted_with_the_server_teacher(tiny_models, no_model_loads):
    """The LoRA refusal's other fix: the teacher on verl's teacher pool, where the reference worker is free."""
    with pytest.raises(ValueError) as e:
        _run(tiny_models, "actor_rollout_ref.model.lora_rank=8")
    assert "distillation.distillation_loss.teacher_route=server" in str(e.value)
    from verl_eopd.integration.config import check_run_config

    cfg = compose_trainer(
        "algorithm=eopd_server", "actor_rollout_ref.model.lora_rank=8",
        f"actor_rollout_ref.model.path={tiny_models['student']}", f"data.train_files={tiny_models['train']}",
        f"data.val_files={tiny_models['val']}",
        f"distillation.teacher_models.teacher_model.model_path={tiny_models['teacher']}",
        "actor_rollout_ref.actor.ppo_micro_batch_size_per_gpu=2",
        "actor_rollout_ref.rollout.log_prob_micro_batch_size_per_gpu=2",
        "actor_rollout_ref.ref.log_prob_micro_batch_size_per_gpu=2")
    assert check_run_config(cfg).teacher_route == "server"


def test_a_teacher_with_a_smaller_vocabulary_than_the_students_tokenizer_is_refused(tmp_path, tiny_models,
                                                                                     no_model_loads):
    """Same tokenizer, but the teacher's embedding table has fewer rows than the tokenizer has ids: the teacher
    could not score some of the student's tokens. Refused naming the teacher's key, both sizes and the fix."""
    from tiny import build_tiny_qwen3

    top_id = max(tiny_models["tokenizer"].get_vocab().values())  # 289 for the tests' tokenizer
    small = build_tiny_qwen3(str(tmp_path / "small_teacher"), vocab_size=top_id - 9, tokenizer=tiny_models["tokenizer"])
    with pytest.raises(ValueError) as e:
        _run(tiny_models, f"distillation.teacher_models.teacher_model.model_path={small}")
    message = str(e.value)
    assert message.startswith(f"distillation.teacher_models.teacher_model.model_path={small!r}:"), message
    assert f"embeds {top_id - 9} ids" in message and f"up to {top_id}" in message
    assert "Fix: use a teacher whose vocab covers the student's" in message
