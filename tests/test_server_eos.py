"""The server route's end-token remap (integration/server_eos.py): a Base student's final end token is sent to
verl's teacher pool as the chat teacher's, and the teacher's end token comes back as the student's."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import types

import pytest
import torch

from verl_eopd.integration import server_eos as se

S, T = 0, 2  # <|endoftext|> (Base student), <|im_end|> (chat teacher) in the tiny tokenizers


@pytest.mark.unit
def test_the_teacher_gets_its_own_end_token_only_at_the_end():
    assert se.remap_sequence([9, 8, 7, S], S, T) == [9, 8, 7, T]
    assert se.remap_sequence([9, S, 7, 6], S, T) == [9, S, 7, 6]  # cut response: no stop, nothing to remap
    assert se.remap_sequence([], S, T) == []


@pytest.mark.unit
def test_ids_come_back_in_the_students_tokens_with_and_without_the_token_column():
    topk = torch.tensor([[T, 5, 6], [5, 6, 7], [S, T, 6]], dtype=torch.int32)  # row 2 already holds S: untouched
    assert se.map_back(topk, 3, S, T).tolist() == [[S, 5, 6], [5, 6, 7], [S, T, 6]]
    # column K: the scored tokens (row j holds token j + 1; the last row is the dummy 0)
    with_col = torch.cat([topk, torch.tensor([[T], [T], [0]], dtype=torch.int32)], dim=1)
    got = se.map_back(with_col, 3, S, T, remapped=True)
    assert got.dtype == torch.int32 and got[:, :3].tolist() == se.map_back(topk, 3, S, T).tolist()
    assert got[:, -1].tolist() == [T, S, 0]  # only the remapped final token; a T the student wrote stays T
    assert se.map_back(with_col, 3, S, T, remapped=False)[:, -1].tolist() == [T, T, 0]  # not remapped: untouched


@pytest.mark.unit
def test_the_wrapper_sends_the_remapped_copy_and_maps_the_answer_back():
    seen = {}

    async def original(self, sequence_ids, multi_modal_data=None, mm_processor_kwargs=None, mm_processor_output=None,
                       routing_key=None):
        seen["ids"] = list(sequence_ids)
        n = len(sequence_ids)
        ids = torch.tensor([[T, 4] for _ in range(n)], dtype=torch.int32)
        ids = torch.cat([ids, torch.tensor([[t] for t in [*sequence_ids[1:], 0]], dtype=torch.int32)], dim=1)
        return ids, torch.zeros(n, 3)

    manager = types.SimpleNamespace(distillation_loss_config=types.SimpleNamespace(topk=2))
    wrapped = se.with_eos_remap(original, S, T)
    sent = [11, 12, 13, S]
    ids, lps = asyncio.run(wrapped(manager, sent, routing_key=None))
    assert seen["ids"] == [11, 12, 13, T] and sent == [11, 12, 13, S]  # the caller's list is not modified
    assert ids[:, 0].tolist() == [S] * 4 and ids[:, -1].tolist() == [12, 13, S, 0]  # column: the student's tokens
    # a response the student ended with the teacher's token itself (or cut): nothing sent changes, nothing renamed
    ids, _ = asyncio.run(wrapped(manager, [11, T, 13, T], routing_key=None))
    assert seen["ids"] == [11, T, 13, T] and ids[:, -1].tolist() == [T, 13, T, 0]
    assert getattr(wrapped, se._PATCHED) and wrapped.__wrapped__ is original


@pytest.mark.integration
def test_the_plugin_patches_verls_teacher_manager_when_asked(fresh_python):
    code = ("import json, verl\n"
            "from verl.experimental.teacher_loop import teacher_manager as m\n"
            "from verl_eopd.integration import patches, server_eos\n"
            "fn = m.AsyncTeacherLLMServerManager.compute_teacher_logprobs_single\n"
            "print(json.dumps([bool(getattr(fn, server_eos._PATCHED, False)), 'server-eos-remap' in patches.applied()]))")
    for value, expected in (("0,2", [True, True]), ("", [False, False])):
        out = fresh_python(["-c", code], env={**os.environ, se.ENV: value})
        assert out.returncode == 0, out.stderr[-2000:]
        assert json.loads(out.stdout.strip().splitlines()[-1]) == expected, value


@pytest.mark.integration
def test_the_server_route_asks_for_the_remap_only_when_the_end_tokens_differ(tiny_models, tmp_path):
    """A Base-style student (its tokenizer ends with <|endoftext|>) and the chat teacher (<|im_end|>)."""
    from hydra import compose, initialize_config_dir
    from transformers import AutoTokenizer

    import verl_eopd
    from verl_eopd.main import prepare

    base = tmp_path / "base_student"
    shutil.copytree(tiny_models["student"], base)
    tok = AutoTokenizer.from_pretrained(tiny_models["student"])
    tok.eos_token = "<|endoftext|>"
    tok.save_pretrained(base)

    def env(student, *extra):
        conf = os.path.join(os.path.dirname(verl_eopd.__file__), "conf")
        with initialize_config_dir(config_dir=conf, version_base=None):
            cfg = compose(config_name="eopd_trainer", overrides=[
                "algorithm=eopd_server", f"actor_rollout_ref.model.path={student}",
                f"data.train_files={tiny_models['train']}", f"data.val_files={tiny_models['val']}",
                f"distillation.teacher_models.teacher_model.model_path={tiny_models['teacher']}",
                "actor_rollout_ref.actor.ppo_micro_batch_size_per_gpu=2",
                "actor_rollout_ref.rollout.log_prob_micro_batch_size_per_gpu=2", *extra])
        _, e, _, _ = prepare(cfg)
        assert cfg.ray_kwargs.ray_init.runtime_env.env_vars.get(se.ENV) == e.get(se.ENV)
        return e

    s_eos, t_eos = tok.convert_tokens_to_ids("<|endoftext|>"), tok.convert_tokens_to_ids("<|im_end|>")
    assert env(base)[se.ENV] == f"{s_eos},{t_eos}"
    assert se.ENV not in env(tiny_models["student"])  # same end token: nothing to remap
    assert se.ENV not in env(base, "distillation.distillation_loss.eos_remap=false")  # the user's choice
