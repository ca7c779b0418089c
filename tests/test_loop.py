"""The plain distillation loop of the mini reproduction (verl_eopd/math/loop.py): its batching matches the
model run on each sequence alone, and its step is verl_eopd's objective on exactly those tensors."""

from __future__ import annotations

import pytest
import torch

from tolerances import U32, assert_grads_close, assert_within, fp32_logit_bound, gamma

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
        # two fp32 forwards of the same sequence (padded batch vs alone): fp32_logit_bound (tests/tolerances.py),
        # 2 gamma_n Z with n the network's reduction chain over <= 15 positions (~2e-3 here); observed 3.3e-6
        assert_within(logits[b, :len(r)], alone, fp32_logit_bound(model, 15), f"logits of sequence {b}")
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


def test_grpo_advantages_equal_verls_outcome_grpo():
    import numpy as np
    from verl.trainer.ppo.core_algos import compute_grpo_outcome_advantage

    from verl_eopd.math.loop import grpo_advantages

    g = torch.Generator().manual_seed(0)
    scores = (torch.rand(12, generator=g) > 0.5).float()
    scores[4:8] = 1.0  # a group where every response is right: advantage 0, not a division by zero
    mask = torch.ones(12, 3)
    rewards = torch.zeros(12, 3)
    rewards[:, -1] = scores
    for group in (4, 1):
        want, _ = compute_grpo_outcome_advantage(rewards, mask, np.repeat(np.arange(12 // group), group))
        # fp32 on both sides: the group mean (g terms), the unbiased std (g squares, a sqrt) and the division: each
        # side within gamma_{3g+4} (|A| + max|s| / (std + eps)) per entry; observed 9.5e-7 at |A| 1.3
        sd = scores.view(-1, group).std(-1, keepdim=True).expand(-1, group).reshape(-1) if group > 1 else torch.ones(12)
        got = grpo_advantages(scores, group)
        assert_within(got, want[:, 0], 2 * gamma(3 * group + 4) * (want[:, 0].double().abs()
                                                                     + float(scores.abs().max()) / (sd.double() + 1e-6)),
                      f"advantages, group {group}")


@pytest.mark.parametrize("clip_c", [3.0, 1.5])
def test_ppo_policy_loss_equals_verls_vanilla_loss(clip_c):
    from verl.trainer.ppo.core_algos import compute_policy_loss_vanilla
    from verl.workers.config import ActorConfig

    from verl_eopd.math.loop import ppo_policy_loss

    g = torch.Generator().manual_seed(1)
    B, R = 6, 5
    old = -torch.rand(B, R, generator=g) * 3
    logp = (old + torch.randn(B, R, generator=g) * 0.5).requires_grad_(True)  # ratios beyond both clips
    adv = torch.randn(B, generator=g) * 2
    mask = torch.ones(B, R)
    mask[1, 3:] = 0
    mask[4, 1:] = 0
    cfg = ActorConfig(strategy="fsdp2", rollout_n=1, ppo_micro_batch_size_per_gpu=1, clip_ratio_low=0.2,
                      clip_ratio_high=0.2, clip_ratio_c=clip_c, loss_agg_mode="token-mean")
    logp_ref = logp.detach().clone().requires_grad_(True)
    want, _ = compute_policy_loss_vanilla(old, logp_ref, adv[:, None].expand(B, R), mask, "token-mean", cfg)
    got = ppo_policy_loss(logp, old, adv, mask, 0.2, clip_c)
    # fp32 on both sides, a few elementwise ops per token (logp - old, exp, x A, clamp/max exact, / n: 6u relative,
    # and exp's argument error u |logp - old|) and a mean over the B R entries: loss within 2 (gamma_{BR} + 6u +
    # u max|logp - old|) mean |r A|, each gradient entry within 2 (6u + u |logp - old|) |g|; observed 0 (bit-identical)
    rel = 6 * U32 + U32 * float((logp.detach() - old).abs().max())
    r_a = (torch.exp(logp.detach().double() - old.double()) * adv.double()[:, None]).abs()
    assert_within(got.detach(), want.detach(), 2 * (gamma(B * R) + rel) * float(r_a[mask.bool()].mean()), "loss")
    got.backward()
    want.backward()
    assert_within(logp.grad, logp_ref.grad, 2 * rel * logp_ref.grad.double().abs(), "grad")


def test_grpo_step_adds_coef_times_eopd_to_the_task_loss(tiny_models, monkeypatch):
    """The gradient of one loop step with task rewards equals that of pg + coef x eopd computed here by hand on
    the same sampled responses (gradients, not parameters: AdamW's first step is sign-like and would hide
    a wrong coefficient)."""
    import copy

    from transformers import AutoModelForCausalLM

    from verl_eopd.math import loop

    load = lambda p: AutoModelForCausalLM.from_pretrained(p, dtype=torch.float32, attn_implementation="sdpa")
    student, teacher = load(tiny_models["student"]), load(tiny_models["teacher"])
    twin = copy.deepcopy(student)
    prompts = [[5, 6, 7], [8, 9], [10, 11, 12, 13]]
    reward = lambda i, r: float((sum(r) + i) % 2 == 0)  # any deterministic function of the prompt and response
    cfg = loop.LoopConfig(steps=1, batch=12, rollouts_per_prompt=4, task_rewards=True, distillation_coef=0.3,
                          max_new_tokens=5, topk=4, seed=3, lr=1e-2)
    seen = {}
    real_generate = loop.generate

    def spy(model, batch, **kw):
        seen["batch"], seen["responses"] = batch, real_generate(model, batch, **kw)
        return seen["responses"]

    grads = {}
    real_clip = torch.nn.utils.clip_grad_norm_

    def clip_spy(params, *a, **kw):
        params = list(params)
        grads["loop"] = [p.grad.detach().clone() for p in params]
        return real_clip(params, *a, **kw)

    monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_", clip_spy)
    loop.generate = spy
    try:
        hist = loop.distill(student, teacher, prompts, cfg, student_eos=2, teacher_eos=2, pad_id=0, reward=reward)
    finally:
        loop.generate = real_generate
    batch, resp = seen["batch"], seen["responses"]
    assert len(batch) == 12 and all(batch[4 * j] == batch[4 * j + k] for j in range(3) for k in range(4))
    idx = [prompts.index(p) for p in batch]
    scores = torch.tensor([reward(i, r) for i, r in zip(idx, resp)])
    assert abs(hist[0]["score"] - float(scores.mean())) <= 2 * U32 * abs(float(scores.mean()))  # count / 12, one rounding each
    ts = loop.teacher_statistics(teacher, batch, resp, topk=4, student_eos=2, teacher_eos=2, pad_id=0)
    twin.train()
    s_logits, ids, mask = loop._response_logits(twin, batch, resp, 0)
    logp = torch.log_softmax(s_logits, -1).gather(-1, ids.unsqueeze(-1)).squeeze(-1)
    distill_loss, _ = loop.eopd_loss(s_logits, ids, logp.detach(), ts["topk_ids"], ts["topk_logprobs"], mask,
                                     cfg.settings, teacher_entropy=ts["entropy"],
                                     teacher_token_logprobs=ts["token_logprobs"])
    adv = loop.grpo_advantages(scores, 4)
    pg = loop.ppo_policy_loss(logp, logp.detach(), adv, mask, 0.2, 3.0)
    assert 0 < scores.mean() < 1 and float(pg.abs()) + float(adv.abs().sum()) > 0  # both terms present
    (pg + 0.3 * distill_loss).backward()
    # two fp32 backward passes of the same loss (the loop's and this one): 2 gamma_{T+V+H} T max|g| per tensor,
    # T = the batch's token positions; observed 0 (bit-identical: the same ops in the same order)
    names = [name for name, _ in twin.named_parameters()]
    assert_grads_close(dict(zip(names, grads["loop"])), {n: p.grad for n, p in twin.named_parameters()},
                       tokens=int(s_logits.shape[0] * s_logits.shape[1]) + max(len(p) for p in batch),
                       vocab=s_logits.shape[-1], hidden=twin.config.hidden_size)
