"""eopd_grpo with flash-attn installed: verl computes the task log-probs of the same logits the EOPD processor
used, with flash-attn's Triton cross-entropy and `inplace_backward=True`, whose backward writes its gradient
into the logits' storage without bumping their version counter. The EOPD student kernel saves the logits and
recomputes the softmax from them in its own backward, so without a copy it reads the cross-entropy's
gradient instead of the logits and the update is silently wrong.

No flash-attn here: a stand-in with the Triton kernel's contract (returns (losses, z_losses); in place, the
backward writes dlogits into the logits' storage through a handle that autograd does not version) replaces
it inside verl's own `logprobs_from_logits`. The reference is the same step through verl's pure PyTorch path.
"""

from __future__ import annotations

import pytest
import torch

from test_ulysses_slicing import V, _configs, make_data

pytestmark = pytest.mark.integration


class _TritonLikeCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, labels, inplace_backward):
        lse = torch.logsumexp(logits.float(), -1)
        losses = lse - logits.float().gather(-1, labels[:, None]).squeeze(-1)
        ctx.save_for_backward(labels, lse)
        ctx.raw = logits.data  # the kernel's pointer: same storage, outside autograd's version counting
        ctx.inplace = inplace_backward
        return losses, torch.zeros_like(losses)

    @staticmethod
    def backward(ctx, grad_losses, _grad_z):
        labels, lse = ctx.saved_tensors
        d = torch.exp(ctx.raw.float() - lse[:, None])
        d[torch.arange(len(labels)), labels] -= 1.0
        d.mul_(grad_losses[:, None])
        out = ctx.raw if ctx.inplace else torch.empty_like(ctx.raw)
        out.copy_(d)  # the raw write: the saved logits now hold dlogits
        return out, None, None


def _stand_in(logits, labels, inplace_backward=True):
    return _TritonLikeCrossEntropy.apply(logits, labels, inplace_backward)


def _step(monkeypatch, flash: bool, fix: bool):
    """One eopd_grpo-shaped backward: hidden -> lm_head -> logits; the EOPD processor's differentiable terms
    and verl's task log-probs of the same logits (what the PPO loss multiplies by advantages) are combined;
    returns the gradients of the hidden states and of lm_head."""
    from verl.utils import torch_functional as verl_F

    from verl_eopd.integration import loss as L

    monkeypatch.setattr(verl_F, "FLAH_ATTN_CROSS_ENTROPY_LOSS_AVAILABLE", flash)
    monkeypatch.setattr(verl_F, "cross_entropy_loss", _stand_in, raising=False)
    if not fix:
        monkeypatch.setattr(L, "inplace_cross_entropy_follows", lambda data: False)
    data, _ = make_data(token_column=False)
    data["distillation_only"] = False  # task rewards on: verl computes the task log-probs after the processor
    n = data["input_ids"].values().shape[0]
    g = torch.Generator().manual_seed(1)
    hidden = torch.randn(n, 16, generator=g, requires_grad=True)
    head = torch.nn.Linear(16, V, bias=False)
    with torch.no_grad():
        head.weight.copy_(torch.randn(V, 16, generator=g))
    logits = head(hidden)  # [n, V], verl's logits_rmpad
    cfg, dcfg = _configs()
    out = L.eopd_logits_processor(cfg, dcfg, data, logits.unsqueeze(0))
    labels = torch.roll(data["input_ids"].values(), -1)
    task_logp = verl_F.logprobs_from_logits(logits=logits, labels=labels, inplace_backward=True)
    w = torch.randn(3, n, generator=g)
    total = (w[0] * out["eopd_fkl"][0]).sum() + (w[1] * out["eopd_logp"][0]).sum() + (w[2] * task_logp).sum()
    total.backward()
    return hidden.grad.clone(), head.weight.grad.clone()


def test_the_eopd_terms_keep_their_gradient_under_verls_in_place_cross_entropy(monkeypatch):
    ref_h, ref_w = _step(monkeypatch, flash=False, fix=True)  # verl's log_softmax + gather path
    with monkeypatch.context() as m:
        bug_h, bug_w = _step(m, flash=True, fix=False)
    # the emulation reproduces the bug it guards against: without the copy the gradients are wrong
    assert (bug_h - ref_h).abs().max() > 1e-2 * ref_h.abs().max(), "the stand-in no longer overwrites the logits"
    with monkeypatch.context() as m:
        got_h, got_w = _step(m, flash=True, fix=True)
    # two fp32 backward passes (verl's log_softmax + gather, the copied in-place path) through the same [n, V] logits
    # and the 16-wide head: 2 gamma_{n+V+16} n max|g| per tensor (tests/tolerances.py); observed 4.8e-7 (max|g| 10.4)
    # and 2.4e-7 (max|g| 16.9)
    from tolerances import assert_grads_close

    n = ref_h.shape[0]
    assert_grads_close({"hidden": got_h, "head": got_w}, {"hidden": ref_h, "head": ref_w}, tokens=n, vocab=V, hidden=16)


def test_the_copy_is_made_only_on_the_in_place_path(monkeypatch):
    from verl.utils import torch_functional as verl_F

    from verl_eopd.integration.loss import inplace_cross_entropy_follows

    monkeypatch.delenv("VERL_DISABLE_FLASH_ATTN_CE", raising=False)
    monkeypatch.setattr(verl_F, "FLAH_ATTN_CROSS_ENTROPY_LOSS_AVAILABLE", True)
    assert inplace_cross_entropy_follows({"distillation_only": False})
    assert inplace_cross_entropy_follows({})  # verl's default for the key
    assert not inplace_cross_entropy_follows({"distillation_only": True})  # pure distillation: no task log-probs
    monkeypatch.setenv("VERL_DISABLE_FLASH_ATTN_CE", "1")  # verl's switch to its PyTorch path
    assert not inplace_cross_entropy_follows({"distillation_only": False})
    monkeypatch.delenv("VERL_DISABLE_FLASH_ATTN_CE")
    monkeypatch.setattr(verl_F, "FLAH_ATTN_CROSS_ENTROPY_LOSS_AVAILABLE", False)
    assert not inplace_cross_entropy_follows({"distillation_only": False})
