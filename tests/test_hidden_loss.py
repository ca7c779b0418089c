"""EOPD from hidden states (core: eopd_loss_from_hidden, teacher_stats_from_hidden): the same values, stats and
gradients (on the hidden states and the lm head) as the logits path and as the dense float64 reference on the
materialised logits, fp32 and bf16, with temperature, chunking, tied embeddings and bad input."""

from __future__ import annotations

import pytest
import torch

from dense_reference import dense_eopd_loss, dense_teacher
from verl_eopd import (
    EOPDSettings,
    eopd_loss,
    eopd_loss_from_hidden,
    entropy_from_topk,
    teacher_stats,
    teacher_stats_from_hidden,
    token_logprob_from_topk,
)

pytestmark = pytest.mark.unit


@pytest.fixture(autouse=True)
def small_chunks(monkeypatch):
    """The kernels visit at least 256 or 512 rows per lm-head chunk (16-bit: fp32 work on 32 rows at a time);
    these tiny batches need smaller floors so that every test below runs over several chunks (their chunk_bytes
    set the rows) and a 16-bit chunk over several fp32 pieces."""
    from verl_eopd.core import kernels

    monkeypatch.setattr(kernels, "HIDDEN_MIN_ROWS", 1)
    monkeypatch.setattr(kernels, "TEACHER_HIDDEN_MIN_ROWS", 1)
    monkeypatch.setattr(kernels, "SUB_ROWS_16BIT", 2)  # several fp32 pieces per 16-bit chunk

B, T, H, V, K = 3, 7, 24, 101, 6


def _batch(seed=0, dtype=torch.float32, pad=0):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(B, T, H, generator=g).to(dtype)
    weight = (torch.randn(V, H, generator=g) * 0.4).to(dtype)
    t_hidden = torch.randn(B, T, H, generator=g) * (0.5 + 2 * torch.rand(B, T, 1, generator=g))
    t_weight = torch.randn(V + pad, H, generator=g) * 0.3  # pad > 0: a padded teacher vocabulary (ids >= V dropped)
    ids = torch.randint(0, V, (B, T), generator=g)
    ts = teacher_stats(t_hidden @ t_weight.T, ids.clamp(max=V - 1), K)
    old = torch.log_softmax((hidden.double() @ weight.double().T), -1).gather(-1, ids[..., None]).squeeze(-1).float()
    old = old + 0.3 * torch.randn(B, T, generator=g)
    mask = torch.ones(B, T, dtype=torch.bool)
    mask[0, T - 2:] = False
    mask[-1, :2] = False
    return hidden, weight, ids, old, ts, mask, (t_hidden, t_weight)


def _settings(ts, mask, gate="hard"):
    return EOPDSettings(entropy_threshold=float(ts["entropy"][mask].median()), gate=gate, gate_quantile=0.3)


@pytest.mark.parametrize("gate", ["hard", "quantile"])
@pytest.mark.parametrize("exact_teacher", [True, False])
@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_from_hidden_equals_dense_float64_reference(gate, exact_teacher, temperature):
    hidden, weight, ids, old, ts, mask, _ = _batch()
    s = _settings(ts, mask, gate)
    h, w = hidden.clone().requires_grad_(True), weight.clone().requires_grad_(True)
    t_ent = ts["entropy"] if exact_teacher else None
    t_tok = ts["token_logprobs"] if exact_teacher else None
    loss, stats = eopd_loss_from_hidden(h, w, ids, old, ts["topk_ids"], ts["topk_logprobs"], mask, s,
                                        temperature=temperature, teacher_entropy=t_ent, teacher_token_logprobs=t_tok,
                                        chunk_bytes=4 * V * 4)  # 4-row chunks: 6 chunks
    loss.backward()
    hr, wr = hidden.double().requires_grad_(True), weight.double().requires_grad_(True)
    if not exact_teacher:  # what eopd_loss uses without exact fields: the top-k estimates
        t_ent, _, _ = entropy_from_topk(ts["topk_logprobs"].double(), V)
        t_tok, _ = token_logprob_from_topk(ts["topk_ids"], ts["topk_logprobs"].double(), ids, V)
    ref, _ = dense_eopd_loss((hr @ wr.T) / temperature, ids, old, ts["topk_ids"], ts["topk_logprobs"], mask, t_ent,
                             t_tok, s)
    ref.backward()
    assert loss.item() == pytest.approx(ref.item(), abs=1e-5, rel=1e-5)
    torch.testing.assert_close(h.grad.double(), hr.grad, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(w.grad.double(), wr.grad, atol=1e-6, rtol=1e-5)
    assert 0 < stats["gate_frac"] < 1


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_from_hidden_equals_the_logits_path_values_stats_and_gradients(dtype):
    hidden, weight, ids, old, ts, mask, _ = _batch(seed=1, dtype=dtype, pad=7)
    s = _settings(ts, mask)
    out = {}
    for path in ("logits", "hidden"):
        h, w = hidden.clone().requires_grad_(True), weight.clone().requires_grad_(True)
        args = (ids, old, ts["topk_ids"], ts["topk_logprobs"], mask, s)
        if path == "logits":
            loss, stats = eopd_loss(h @ w.T, *args, chunk_bytes=3 * V * 4)
        else:
            loss, stats = eopd_loss_from_hidden(h, w, *args, chunk_bytes=3 * V * 4)
        loss.backward()
        out[path] = (loss, stats, h.grad, w.grad)
    (l1, s1, gh1, gw1), (l2, s2, gh2, gw2) = out["logits"], out["hidden"]
    assert gh2.dtype == dtype and gw2.dtype == dtype
    assert set(s1) == set(s2)
    if dtype == torch.float32:
        assert l2.item() == pytest.approx(l1.item(), abs=1e-6)
        for key in s1:
            assert s2[key] == pytest.approx(s1[key], abs=1e-5, rel=1e-5), key
        torch.testing.assert_close(gh2, gh1, atol=1e-6, rtol=1e-5)
        torch.testing.assert_close(gw2, gw1, atol=1e-6, rtol=1e-5)
    else:  # the same bf16 logits per chunk; the lm head's gradient is summed over chunks in fp32, cast once
        assert l2.item() == pytest.approx(l1.item(), abs=1e-3)
        torch.testing.assert_close(gh2.float(), gh1.float(), atol=2e-3, rtol=2e-2)
        torch.testing.assert_close(gw2.float(), gw1.float(), atol=2e-3, rtol=2e-2)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_backward_reuses_the_forwards_last_chunk_once(monkeypatch, dtype, temperature):
    """The backward takes the last chunk from the buffer the forward leaves (log p in fp32, the logits in
    bf16) and recomputes only the others; a second backward through the same graph (retain_graph) recomputes
    every chunk and gives the same gradients as the first."""
    from verl_eopd.core import kernels

    calls = []
    logits = kernels._LmHeadChunk.logits
    monkeypatch.setattr(kernels._LmHeadChunk, "logits", lambda self, h, *a: calls.append(h.shape[0]) or logits(self, h, *a))
    hidden, weight, ids, old, ts, mask, _ = _batch(seed=4, dtype=dtype)
    s = _settings(ts, mask)
    h, w = hidden.clone().requires_grad_(True), weight.clone().requires_grad_(True)
    loss, _ = eopd_loss_from_hidden(h, w, ids, old, ts["topk_ids"], ts["topk_logprobs"], mask, s,
                                    temperature=temperature, chunk_bytes=4 * V * 4)  # 21 rows: 4+4+4+4+4+1
    assert calls == [4, 4, 4, 4, 4, 1]
    calls.clear()
    loss.backward(retain_graph=True)
    assert calls == [4, 4, 4, 4, 4]  # the 1-row last chunk came from the forward
    g1 = (h.grad.clone(), w.grad.clone())
    h.grad = w.grad = None
    calls.clear()
    loss.backward()
    assert calls == [4, 4, 4, 4, 4, 1]  # nothing kept for a second backward: every chunk recomputed
    tol = dict(atol=1e-6, rtol=1e-5) if dtype == torch.float32 else dict(atol=2e-3, rtol=2e-2)
    torch.testing.assert_close(h.grad.float(), g1[0].float(), **tol)  # dW summed in another chunk order
    torch.testing.assert_close(w.grad.float(), g1[1].float(), **tol)
    # the logits path, on the same inputs
    hh, ww = hidden.clone().requires_grad_(True), weight.clone().requires_grad_(True)
    lref, _ = eopd_loss(hh @ ww.T / temperature, ids, old, ts["topk_ids"], ts["topk_logprobs"], mask, s,
                        chunk_bytes=4 * V * 4)
    lref.backward()
    torch.testing.assert_close(h.grad.float(), hh.grad.float(), **tol)
    torch.testing.assert_close(w.grad.float(), ww.grad.float(), **tol)


def test_bf16_from_hidden_is_as_close_to_float64_as_the_logits_path():
    """bf16 error of both paths against the float64 reference on the same bf16 inputs: the chunked (fp32)
    accumulation of the lm head's gradient costs at most a small factor over the logits path's."""
    hidden, weight, ids, old, ts, mask, _ = _batch(seed=2, dtype=torch.bfloat16)
    s = _settings(ts, mask)
    args = (ids, old, ts["topk_ids"], ts["topk_logprobs"], mask, s)
    hr, wr = hidden.double().requires_grad_(True), weight.double().requires_grad_(True)
    ref, _ = dense_eopd_loss(hr @ wr.T, *args[:5], ts["entropy"], ts["token_logprobs"], s)
    ref.backward()
    err = {}
    for path in ("logits", "hidden"):
        h, w = hidden.clone().requires_grad_(True), weight.clone().requires_grad_(True)
        kw = dict(teacher_entropy=ts["entropy"], teacher_token_logprobs=ts["token_logprobs"], chunk_bytes=2 * V * 4)
        loss, _ = (eopd_loss(h @ w.T, *args, **kw) if path == "logits" else eopd_loss_from_hidden(h, w, *args, **kw))
        loss.backward()
        err[path] = max(float((w.grad.double() - wr.grad).abs().max() / wr.grad.abs().max()),
                        float((h.grad.double() - hr.grad).abs().max() / hr.grad.abs().max()))
    assert err["hidden"] < 3 * err["logits"] + 1e-3, err


def test_tied_embeddings_accumulate_both_gradients():
    """Qwen3-0.6B/1.7B/4B tie the lm head to the input embedding: the embedding's own use and the lm head's
    use both reach the one weight, as with the materialised logits."""
    g = torch.Generator().manual_seed(3)
    tokens = torch.randint(0, V, (B, T), generator=g)
    proj = torch.randn(H, H, generator=g) * 0.3
    _, _, ids, old, ts, mask, _ = _batch(seed=3)
    s = _settings(ts, mask)
    grads = {}
    for path in ("logits", "hidden", "dense"):
        emb = (torch.randn(V, H, generator=torch.Generator().manual_seed(4)) * 0.4)
        emb = emb.double() if path == "dense" else emb
        emb.requires_grad_(True)
        hidden = torch.tanh(emb[tokens] @ (proj.double() if path == "dense" else proj))  # a toy body on the embedding
        args = (ids, old, ts["topk_ids"], ts["topk_logprobs"], mask)
        if path == "hidden":
            loss, _ = eopd_loss_from_hidden(hidden, emb, *args, s, chunk_bytes=5 * V * 4,
                                            teacher_entropy=ts["entropy"], teacher_token_logprobs=ts["token_logprobs"])
        elif path == "logits":
            loss, _ = eopd_loss(hidden @ emb.T, *args, s, teacher_entropy=ts["entropy"],
                                teacher_token_logprobs=ts["token_logprobs"])
        else:
            loss, _ = dense_eopd_loss(hidden @ emb.T, *args, ts["entropy"], ts["token_logprobs"], s)
        loss.backward()
        grads[path] = emb.grad.double()
    assert grads["hidden"].abs().max() > 0.05
    torch.testing.assert_close(grads["hidden"], grads["dense"], atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(grads["hidden"], grads["logits"], atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("temperature", [1.0, 0.6])
def test_teacher_stats_from_hidden_equals_teacher_stats_and_dense(dtype, temperature):
    _, _, ids, _, _, _, (t_hidden, t_weight) = _batch(seed=5)
    h, w = t_hidden.to(dtype), t_weight.to(dtype)
    got = teacher_stats_from_hidden(h, w, ids, K, temperature=temperature, chunk_bytes=4 * V * 4)
    logits = h @ w.T
    want = teacher_stats(logits if temperature == 1.0 else logits / temperature, ids, K)
    for key in want:
        if key == "topk_ids":
            assert torch.equal(got[key], want[key])
        else:
            torch.testing.assert_close(got[key], want[key], atol=1e-6, rtol=1e-6)
    dense = dense_teacher((t_hidden.double() @ t_weight.double().T) / temperature, ids, K)
    tol = dict(atol=1e-5, rtol=1e-5) if dtype == torch.float32 else dict(atol=0.1, rtol=0.05)
    torch.testing.assert_close(got["entropy"].double(), dense["entropy"], **tol)
    torch.testing.assert_close(got["token_logprobs"].double(), dense["token_logprobs"], **tol)
    if dtype == torch.float32:
        assert torch.equal(got["topk_ids"], dense["topk_ids"])


def test_packed_rows_and_bad_input():
    hidden, weight, ids, old, ts, mask, _ = _batch()
    s = _settings(ts, mask)
    packed = [t.reshape(1, B * T, *t.shape[2:]) for t in (hidden, ids, old, ts["topk_ids"], ts["topk_logprobs"], mask)]
    a, _ = eopd_loss_from_hidden(packed[0], weight, *packed[1:], s)
    b, _ = eopd_loss_from_hidden(hidden, weight, ids, old, ts["topk_ids"], ts["topk_logprobs"], mask, s)
    assert a.item() == pytest.approx(b.item(), abs=1e-6)
    args = (ids, old, ts["topk_ids"], ts["topk_logprobs"], mask, s)
    with pytest.raises(ValueError, match="hidden must be"):
        eopd_loss_from_hidden(hidden[..., :-1], weight, *args)
    with pytest.raises(ValueError, match=r"weight \(the lm head\) must be \[V, H\]"):
        eopd_loss_from_hidden(hidden, weight[None], *args)
    with pytest.raises(ValueError, match="share a dtype"):
        eopd_loss_from_hidden(hidden, weight.double(), *args)
    with pytest.raises(ValueError, match="temperature"):
        eopd_loss_from_hidden(hidden, weight, *args, temperature=0.0)
    with pytest.raises(ValueError, match="sampled_ids must lie"):
        eopd_loss_from_hidden(hidden, weight[:50], *args)
    bad = hidden.clone()
    bad[1, 3, 0] = float("nan")
    with pytest.raises(ValueError, match="NaN or \\+inf logits at row 10"):
        eopd_loss_from_hidden(bad, weight, *args)
    with pytest.raises(ValueError, match="sampled_ids shape"):
        teacher_stats_from_hidden(hidden, weight, ids[:, :-1], K)


def test_in_place_softmax_is_exact_and_its_fallback_agrees(monkeypatch):
    from verl_eopd.core import kernels

    z = torch.randn(5, 1000) * 6
    z[0, :10] = float("-inf")
    want = torch.softmax(z, -1)
    kernels._IN_PLACE_OK.clear()
    assert torch.equal(kernels._softmax_in_place(z.clone()), want)
    assert kernels._IN_PLACE_OK[("_softmax", "cpu")] is True
    monkeypatch.setitem(kernels._IN_PLACE_OK, ("_softmax", "cpu"), False)  # a backend where aliasing is not exact
    torch.testing.assert_close(kernels._softmax_in_place(z.clone()), want, atol=1e-7, rtol=1e-5)


def test_in_place_log_softmax_and_chunked_entropy(monkeypatch):
    from verl_eopd.core import kernels

    z = torch.randn(37, 1000) * 6  # 37 rows: the entropy's sub-chunks of ENTROPY_ROWS end on a partial one
    z[0, :10] = float("-inf")
    want = torch.log_softmax(z, -1)
    kernels._IN_PLACE_OK.clear()
    got = kernels._log_softmax_in_place(z.clone())
    assert torch.equal(got, want)
    assert kernels._IN_PLACE_OK[("_log_softmax", "cpu")] is True
    monkeypatch.setitem(kernels._IN_PLACE_OK, ("_log_softmax", "cpu"), False)
    torch.testing.assert_close(kernels._log_softmax_in_place(z.clone()), want, atol=1e-5, rtol=1e-6)
    zd = z.double()
    dense = -(torch.softmax(zd, -1) * torch.log_softmax(zd, -1)).nan_to_num(0.0).sum(-1)
    torch.testing.assert_close(kernels._entropy_of_logp(got).double(), dense, atol=1e-5, rtol=1e-5)
