"""The plain distillation loop of the mini reproduction (verl_eopd/math/loop.py): its batching matches the
model run on each sequence alone, and its step is verl_eopd's objective on exactly those tensors."""

from __future__ import annotations

import pytest
import torch

pytestmark = pytest.mark.integration


def test_response_logits_match_each_sequence_run_alone(tiny_models):
    from transformers import AutoModelForCausalLM

    from verl_eopd.math.loop import _response_logits

    model = AutoModelForCausalLM.from_pretrained(tiny_models["student"], dtype=torch.float32, attn_implementation="sdpa")
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(3, 300, (n,), generator=g).tolist() for n in (5, 9, 7)]
    responses = [torch.randint(3, 300, (n,), generator=g).tolist() for n in (4, 1, 6)]
    logits, ids, mask = _response_logits(model, prompts, responses, pad_id=0)
    assert logits.shape[:2] == (3, 6) and mask.sum(-1).tolist() == [4, 1, 6]
    for b, (p, r) in enumerate(zip(prompts, responses)):
        alone = model(input_ids=torch.tensor([p + r])).logits[0, len(p) - 1:len(p) + len(r) - 1]
        torch.testing.assert_close(logits[b, :len(r)], alone, atol=1e-4, rtol=1e-4)
        assert ids[b, :len(r)].tolist() == r


def test_generate_stops_at_the_end_token_and_greedy_is_deterministic(tiny_models):
    from transformers import AutoModelForCausalLM

    from verl_eopd.math.loop import generate

    model = AutoModelForCausalLM.from_pretrained(tiny_models["student"], dtype=torch.float32, attn_implementation="sdpa")
    prompts = [[5, 6, 7], [8, 9]]
    a = generate(model, prompts, max_new_tokens=6, eos_id=2, pad_id=0, greedy=True)
    b = generate(model, prompts, max_new_tokens=6, eos_id=2, pad_id=0, greedy=True)
    assert a == b and all(1 <= len(r) <= 6 for r in a)
    assert all(2 not in r[:-1] for r in a)  # nothing after the end token
