"""`from_hidden` through verl's real FSDP2 engine on CPU: the actor engine that never builds the [tokens, V]
logits (integration/hidden.py) gives the same loss and parameter gradients as verl's engine with the EOPD
logits processor, for pure EOPD and with the task loss, with and without remove-padding, on an untied and a
tied-embedding student; its log-prob pass equals verl's; the teacher's payload from hidden states equals the
payload from logits."""

from __future__ import annotations

import pytest
import torch

from test_teacher import _batch as teacher_batch
from test_teacher import _td as teacher_td
from test_teacher import _teacher_worker
from test_verl_engine import (
    _compare_grads,
    _median_teacher_entropy,
    _total_loss,
    eopd_loss_fn,
    make_batch,
    make_engine,
    run_step,
    to_tensordict,
)

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def models(verl_cpu, tiny_models, tmp_path_factory):
    """The tiny student and a tied-embedding copy of it (Qwen3-0.6B/1.7B/4B tie the lm head to the embedding)."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    cfg = AutoConfig.from_pretrained(tiny_models["student"])
    cfg.tie_word_embeddings = True
    torch.manual_seed(7)
    tied = AutoModelForCausalLM.from_config(cfg)
    with torch.no_grad():
        tied.lm_head.weight.mul_(20.0)  # the shared table: large logits, spread entropies
    path = str(tmp_path_factory.mktemp("tied"))
    tied.save_pretrained(path)
    AutoTokenizer.from_pretrained(tiny_models["student"]).save_pretrained(path)
    assert tied.lm_head.weight is tied.model.embed_tokens.weight
    return {"untied": tiny_models["student"], "tied": path}


def _engine(model_path: str, hidden: bool, use_remove_padding: bool = True):
    from verl_eopd.integration.hidden import ACTOR_MODEL_TYPE, actor_engine_class

    actor_engine_class()  # registers the from_hidden engine
    return make_engine(model_path, model_type=ACTOR_MODEL_TYPE if hidden else "language_model",
                       use_remove_padding=use_remove_padding)


@pytest.mark.parametrize("model", ["untied", "tied"])
@pytest.mark.parametrize("use_remove_padding", [True, False])
@pytest.mark.parametrize("task", [False, True])
def test_hidden_engine_equals_the_logits_engine(models, model, use_remove_padding, task):
    batch = make_batch(models[model], seed=4)
    loss_fn = eopd_loss_fn(entropy_threshold=_median_teacher_entropy(batch), use_task_rewards=task,
                           distillation_loss_coef=0.5)
    res = {}
    for hidden in (False, True):
        engine = _engine(models[model], hidden, use_remove_padding)
        td = to_tensordict(batch, topk=True, distillation_only=not task, use_remove_padding=use_remove_padding,
                           exact_teacher=True)
        if task:  # non-zero advantages, so the task loss has a gradient
            shape = td["advantages"].shape
            td["advantages"] = torch.linspace(-1, 1, shape.numel()).reshape(shape)
        res[hidden] = run_step(engine, td, loss_fn)
    (out_l, g_l), (out_h, g_h) = res[False], res[True]
    assert _total_loss(out_h) == pytest.approx(_total_loss(out_l), abs=1e-6, rel=1e-5)
    assert any(g.abs().max() > 0 for g in g_l.values())
    _compare_grads(g_h, g_l, atol=4e-6, rtol=1e-4)  # fp32: the kept chunk uses exp(log p), the rest softmax(z)
    for key in ("eopd/gate_frac", "eopd/fkl_mean", "eopd/rkl_mean", "eopd/student_entropy_mean"):
        assert out_h["metrics"][key] == pytest.approx(out_l["metrics"][key], abs=1e-6, rel=1e-5), key


@pytest.mark.parametrize("use_remove_padding", [True, False])
def test_hidden_engine_log_prob_pass_equals_verls(models, use_remove_padding):
    """verl's old-log-prob pass (forward only, no distillation fields): log pi(y) and the entropy."""
    from verl.utils import tensordict_utils as tu

    batch = make_batch(models["untied"], seed=5)
    outs = {}
    for hidden in (False, True):
        engine = _engine(models["untied"], hidden, use_remove_padding)
        td = to_tensordict(batch, topk=False, distillation_only=False, use_remove_padding=use_remove_padding)
        tu.assign_non_tensor(td, calculate_entropy=True, distillation_use_topk=False)
        with engine.eval_mode(), torch.no_grad():
            out = engine.forward_backward_batch(td, None, forward_only=True)
        outs[hidden] = out
    for key in ("log_probs", "entropy"):
        a = torch.cat([o["model_output"][key].values() for o in outs[False]["model_output"]]) \
            if isinstance(outs[False]["model_output"], list) else outs[False]["model_output"][key]
        b = torch.cat([o["model_output"][key].values() for o in outs[True]["model_output"]]) \
            if isinstance(outs[True]["model_output"], list) else outs[True]["model_output"][key]
        a = a.values() if getattr(a, "is_nested", False) else a
        b = b.values() if getattr(b, "is_nested", False) else b
        torch.testing.assert_close(b, a, atol=1e-5, rtol=1e-5, msg=lambda m, k=key: f"{k}: {m}")


def test_teacher_payload_from_hidden_equals_payload_from_logits(verl_cpu, tiny_models):
    batch = teacher_batch(seed=6)
    outs = {}
    for hidden in (False, True):
        worker = _teacher_worker(tiny_models, from_hidden=hidden)
        outs[hidden] = worker.infer_batch(teacher_td(batch))
    for key in ("teacher_ids", "teacher_logprobs", "teacher_entropy", "teacher_token_logprob"):
        for a, b in zip(outs[False][key].unbind(), outs[True][key].unbind()):
            if key == "teacher_ids":
                assert torch.equal(a, b)
            else:
                torch.testing.assert_close(b, a, atol=1e-6, rtol=1e-6, msg=lambda m, k=key: f"{k}: {m}")
