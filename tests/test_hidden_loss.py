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

from tolerances import (
    U16,
    U32,
    assert_grads_close,
    assert_within,
    bf16_rounding,
    entropy_bound,
    fp32_grad_bound,
    fp32_loss_bound,
    gamma,
    log_softmax_bound,
    log_softmax_rounding,
    matmul_abs,
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


def _eps(h, w, temperature=1.0, *, sides: int, rounds: float = 0.0) -> tuple:
    """(eps, zmax): the log-probabilities of logits h W^T / temperature against another evaluation (sides=2: another
    fp32 product, any blocking) or the float64 product of the same inputs (sides=1). Each fp32 product lies within
    gamma_H sum_k |h_k W_ik| (matmul_abs) of the exact one, the division by the temperature within u |z|; `rounds`
    adds further relative roundings of the logits per side (bf16: the product's output and the division, u16 each;
    bf16 inputs against unrounded ones: 2 u16 more). Then tests/tolerances.log_softmax_bound."""
    import math

    S = float(matmul_abs(h, w).max()) / temperature
    per_side = (gamma(h.shape[-1]) + (U32 if temperature != 1.0 else 0.0) + rounds) * S
    return log_softmax_bound(S, w.shape[0], sides * per_side, sides=sides), S


def _lipschitz(eps, logits64, ids, old, t_tok, mask, s) -> tuple:
    """(mean, max, absolute): the EOPD loss's per-token constants in the log-probabilities, r |A| (r = exp(log q_y -
    old), the fp32 side's log q_y within eps of the float64 one) + fkl_coef (the FKL's weights sum to 1), over the
    valid tokens; absolute = their mean + fkl_coef (ln K + max |log q|), the terms' absolute parts."""
    import math

    logq = torch.log_softmax(logits64.detach().double(), -1)
    r = torch.exp(logq.gather(-1, ids[..., None]).squeeze(-1) - old.double() + eps)[mask]
    lip = r * (t_tok.double() - old.double())[mask].abs() + s.fkl_coef
    absolute = float(lip.mean()) + s.fkl_coef * (math.log(K) + float(logq[mask].abs().max()))
    return float(lip.mean()), float(lip.max()), absolute


def _loss_bound(eps, zmax, logits64, ids, old, t_tok, mask, s, *, sides: int) -> float:
    """tests/tolerances.fp32_loss_bound for the EOPD loss on these inputs (constants from _lipschitz)."""
    lip, _, absolute = _lipschitz(eps, logits64, ids, old, t_tok, mask, s)
    return fp32_loss_bound(eps, lip, absolute, tokens=int(mask.sum()), k=K, sides=sides)


def _grad_logit_terms(eps, lips, h, w, n: int, temperature: float = 1.0) -> tuple:
    """(dh, dW): how far the gradients move when the two sides' log-probabilities differ by eps (their logits
    rounded apart, e.g. in bf16). Per token the loss's gradient in the logits G_t = dL/dz_t moves in L1 by at most
    2 eps (lip_t / n) / temperature (its softmax weights and ratio move by eps relative, first order); then
    dh_t = G_t W moves by at most 2 eps lip_max max|W| / (n temperature) and dW = sum_t G_t^T h_t by at most
    2 eps lip_mean max|h| / temperature (n valid tokens)."""
    lip_mean, lip_max, _ = lips
    dh = 2 * eps * lip_max * float(w.double().abs().max()) / (n * temperature)
    dw = 2 * eps * lip_mean * float(h.double().abs().max()) / temperature
    return dh, dw


def _capture_logits(monkeypatch, calls=None) -> list:
    """Records (a copy of) every lm-head chunk's logits the kernels compute, in order (and its row count in calls)."""
    from verl_eopd.core import kernels

    zs = []
    logits = kernels._LmHeadChunk.logits

    def wrapped(self, h, *a):
        z = logits(self, h, *a)
        zs.append(z.detach().clone())
        if calls is not None:
            calls.append(h.shape[0])
        return z

    monkeypatch.setattr(kernels._LmHeadChunk, "logits", wrapped)
    return zs


def _forward_logits(zs: list, rows: int) -> torch.Tensor:
    """The first `rows` rows the kernels computed (the forward's chunks, before any backward recomputes them)."""
    out, n = [], 0
    for z in zs:
        if n >= rows:
            break
        out.append(z)
        n += z.shape[0]
    assert n == rows, (n, rows)
    return torch.cat(out).double()


def _bf16_backward_terms(hidden, weight, args, temperature: float, roundings: int) -> tuple:
    """(dh, dW) tensors: what the logits path's bf16 autograd adds by rounding the loss's gradient in the logits
    G = dL/dz to bf16 `roundings` times (once, and once more through the division by the temperature) before its
    fp32-accumulated products with W and h: roundings u16 (|G| / temperature) @ |W|, and likewise with |h|. G from the
    same loss on fp32 logits of the same inputs."""
    z = (hidden.float() @ weight.float().T / temperature).requires_grad_(True)
    eopd_loss(z, *args)[0].backward()
    g = z.grad.double().abs().reshape(-1, z.shape[-1]) / temperature
    dh = roundings * U16 * (g @ weight.double().abs())
    dw = roundings * U16 * (g.T @ hidden.double().abs().reshape(-1, hidden.shape[-1]))
    return dh.reshape(hidden.shape), dw


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
    # fp32 against float64 on the same inputs (sides=1): loss bound 1.9e-4 to 2.8e-4 (eps x the terms' constants
    # + (gamma_{T+K} + 6u) x their absolute parts), observed 3.0e-7; gradients gamma_{T+V+H} T max|g| = 1.8e-4
    # max|g|, observed 3.0e-7 (dh, max 0.41) and 1.0e-6 (dW, max 1.36)
    eps, zmax = _eps(hidden, weight, temperature, sides=1)
    assert_within(loss.detach(), ref.detach(),
                  _loss_bound(eps, zmax, (hr @ wr.T) / temperature, ids, old, t_tok, mask, s, sides=1), "loss")
    assert_grads_close({"h": h.grad, "w": w.grad}, {"h": hr.grad, "w": wr.grad}, tokens=B * T, vocab=V, hidden=H,
                       sides=1)
    assert 0 < stats["gate_frac"] < 1


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_from_hidden_equals_the_logits_path_values_stats_and_gradients(monkeypatch, dtype):
    hidden, weight, ids, old, ts, mask, _ = _batch(seed=1, dtype=dtype, pad=7)
    s = _settings(ts, mask)
    out = {}
    zs = _capture_logits(monkeypatch)
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
    # two fp32 (bf16: bf16-rounded) products of the same inputs (sides=2): eps = 2 dz + 2 log_softmax_rounding,
    # dz = 2 (gamma_H + rounds) S; the loss and every statistic (token means of terms whose log-probability constants
    # are at most r |A| + fkl_coef, or 1 + H <= 1 + ln V for the entropies) within fp32_loss_bound
    import math

    t_tok, _ = token_logprob_from_topk(ts["topk_ids"], ts["topk_logprobs"].double(), ids, V)
    eps, zmax = _eps(hidden, weight, sides=2, rounds=U16 if dtype == torch.bfloat16 else 0.0)
    hw = hidden.double() @ weight.double().T
    loss_bound = _loss_bound(eps, zmax, hw, ids, old, t_tok, mask, s, sides=2)
    if dtype == torch.bfloat16:  # both round the same fp32 dot products to bf16: dz is what the kernels' chunk
        # logits measure against the full product (0 on this host; a bf16 ulp of the largest logit per side, the
        # worst case, would allow a loss bound of 0.5)
        dz = float((_forward_logits(zs, B * T) - (hidden @ weight.T).reshape(-1, V).double()).abs().max())
        eps = log_softmax_bound(float((hidden @ weight.T).double().abs().max()), V, dz, sides=2)
        loss_bound = _loss_bound(eps, zmax, hw, ids, old, t_tok, mask, s, sides=2)
    # fp32: loss bound 2.8e-4, observed 3.6e-7; bf16: bound 1.1e-4, observed 0
    assert_within(l2.detach(), l1.detach(), loss_bound, "loss")
    # pg_clipfrac and n_tokens count tokens: equal unless a ratio lies within its rounding of a clip edge (none here:
    # checked against the float64 ratios)
    r = torch.exp(torch.log_softmax(hw, -1).gather(-1, ids[..., None]).squeeze(-1) - old.double())[mask]
    edge = torch.minimum((r - (1 - s.clip_ratio_low)).abs(), (r - (1 + s.clip_ratio_high)).abs())
    if float(edge.min()) > 2 * eps * float(r.max()):
        assert s2["pg_clipfrac"] == s1["pg_clipfrac"] and s2["n_tokens"] == s1["n_tokens"]
    stat_bound = loss_bound + fp32_loss_bound(eps, math.log(V), math.log(V), tokens=int(mask.sum()), k=K)
    for key in s1:  # fp32: bound 7.5e-4, observed 4.8e-7; bf16: bound 2.2e-4, observed 0
        assert_within(torch.tensor(float(s2[key])), torch.tensor(float(s1[key])), stat_bound, key)
    if dtype == torch.float32:
        # 2 gamma_{T+V+H} T max|g| = 3.7e-4 max|g|; observed 8.9e-8 (dh, max 0.15) and 2.1e-7 (dW, max 0.32)
        assert_grads_close({"h": gh2, "w": gw2}, {"h": gh1, "w": gw1}, tokens=B * T, vocab=V, hidden=H)
    else:  # the lm head's gradient is summed over chunks in fp32, cast once: each side's fp32 sum (two orders, as
        # above) rounded once to bf16 (bf16_rounding); the logits path's autograd rounds dL/dz to bf16 once more
        # (_bf16_backward_terms); and the two sides' bf16 logits differ by what the kernels' chunk products measure
        # against the full product (0 on this host), carried through _grad_logit_terms. Observed 0
        dh, dw = _grad_logit_terms(eps, _lipschitz(eps, hw, ids, old, t_tok, mask, s), hidden, weight,
                                   int(mask.sum()))
        bh, bw = _bf16_backward_terms(hidden, weight, (ids, old, ts["topk_ids"], ts["topk_logprobs"], mask, s), 1.0, 1)
        for got, want, term in ((gh2, gh1, dh + bh), (gw2, gw1, dw + bw)):
            assert_within(got, want, bf16_rounding(got, want) + term
                          + fp32_grad_bound(want.double(), tokens=B * T, vocab=V, hidden=H), "grad")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_backward_reuses_the_forwards_last_chunk_once(monkeypatch, dtype, temperature):
    """The backward takes the last chunk from the buffer the forward leaves (log p in fp32, the logits in
    bf16) and recomputes only the others; a second backward through the same graph (retain_graph) recomputes
    every chunk and gives the same gradients as the first."""
    from verl_eopd.core import kernels

    calls = []
    zs = _capture_logits(monkeypatch, calls)
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
    def close(got, want, what, logit_term=0.0):  # fp32: 2 gamma_{T+V+H} T max|g| (3.7e-4 max|g|); bf16: plus each
        bound = fp32_grad_bound(want.double(), tokens=B * T, vocab=V, hidden=H)  # side's rounding of its fp32 sum
        if dtype == torch.bfloat16:
            bound = bound + bf16_rounding(got, want)
        assert_within(got, want, bound + logit_term, what)

    # the same logits in both backwards (one kept, the others recomputed by the same ops): dW summed in another
    # chunk order; observed fp32 3.0e-8 (max|g| 0.42), bf16 0
    close(h.grad, g1[0], "dh")
    close(w.grad, g1[1], "dW")
    # the logits path, on the same inputs
    hh, ww = hidden.clone().requires_grad_(True), weight.clone().requires_grad_(True)
    lref, _ = eopd_loss(hh @ ww.T / temperature, ids, old, ts["topk_ids"], ts["topk_logprobs"], mask, s,
                        chunk_bytes=4 * V * 4)
    lref.backward()
    # the logits path: the kernels' chunk logits against its full product (the same ops per row: dz measured, 0 on
    # this host), carried through _grad_logit_terms; in bf16 its autograd also rounds dL/dz to bf16 twice (the
    # division's backward too) before the products (_bf16_backward_terms). Observed fp32 < 1e-7; bf16 9.8e-4 (one
    # bf16 ulp at |g| 0.23), at most 0.38 of an entry's bound
    from verl_eopd import token_logprob_from_topk as tok_lp

    z_full = (hidden @ weight.T / temperature).reshape(-1, V).double()
    dz = float((_forward_logits(zs, B * T) - z_full).abs().max())
    zmax = float(z_full.abs().max())
    eps = log_softmax_bound(zmax, V, dz, sides=2)
    hw = hidden.double() @ weight.double().T / temperature
    lips = _lipschitz(eps, hw, ids, old, tok_lp(ts["topk_ids"], ts["topk_logprobs"].double(), ids, V)[0], mask, s)
    dh, dw = _grad_logit_terms(eps, lips, hidden, weight, int(mask.sum()), temperature)
    if dtype == torch.bfloat16:
        bh, bw = _bf16_backward_terms(hidden, weight, (ids, old, ts["topk_ids"], ts["topk_logprobs"], mask, s),
                                      temperature, 2)
        dh, dw = dh + bh, dw + bw
    close(h.grad, hh.grad, "dh vs logits path", dh)
    close(w.grad, ww.grad, "dW vs logits path", dw)


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
    # gamma_{T+V+H} T max|g| against float64 (sides=1: 1.8e-4 max|g|, 2.7e-2 at max|g| 144), twice that against the
    # fp32 logits path; observed 3.9e-5 and 1.5e-5
    assert_grads_close({"emb": grads["hidden"]}, {"emb": grads["dense"]}, tokens=B * T, vocab=V, hidden=H, sides=1)
    assert_grads_close({"emb": grads["hidden"]}, {"emb": grads["logits"]}, tokens=B * T, vocab=V, hidden=H)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("temperature", [1.0, 0.6])
def test_teacher_stats_from_hidden_equals_teacher_stats_and_dense(monkeypatch, dtype, temperature):
    _, _, ids, _, _, _, (t_hidden, t_weight) = _batch(seed=5)
    h, w = t_hidden.to(dtype), t_weight.to(dtype)
    zs = _capture_logits(monkeypatch)
    got = teacher_stats_from_hidden(h, w, ids, K, temperature=temperature, chunk_bytes=4 * V * 4)
    logits = h @ w.T
    z_full = logits if temperature == 1.0 else logits / temperature
    want = teacher_stats(z_full, ids, K)
    # chunked product against the full one, both in `dtype`: eps = 2 dz + 2 log_softmax_rounding. fp32: dz = 2
    # (gamma_H + u) S, eps 1.3e-4 to 2.2e-4, observed 3.3e-6 at most. bf16: both round the same fp32 dot products
    # (and divisions) to bf16, so dz is what the kernels' chunk logits measure against the full product (0 on this
    # host, eps 2.4e-5 to 3.0e-5; the worst case, a bf16 ulp of the largest logit per side, would allow eps 0.55 to
    # 0.92); observed 0
    bf16 = dtype == torch.bfloat16
    if bf16:
        z_full = z_full.reshape(-1, z_full.shape[-1]).double()
        dz = float((_forward_logits(zs, z_full.shape[0]) - z_full).abs().max())
        eps = log_softmax_bound(float(z_full.abs().max()), w.shape[0], dz, sides=2)
    else:
        eps, _ = _eps(h, w, temperature, sides=2)
    for key in want:
        if key == "topk_ids":
            assert torch.equal(got[key], want[key])
        else:
            tol = entropy_bound(eps, want[key].double(), w.shape[0]) if key == "entropy" else eps
            assert_within(got[key], want[key], tol, key)
    dense = dense_teacher((t_hidden.double() @ t_weight.double().T) / temperature, ids, K)
    # against float64 on the unrounded fp32 inputs (sides=1); bf16 inputs also carry 2 u16 relative per product
    # term. fp32: eps 7e-5 to 1.4e-4, observed < 1e-5; bf16: eps 0.5 to 1.0, observed 2.2e-2 (entropy), 4.6e-2
    eps, _ = _eps(t_hidden, t_weight, temperature, sides=1, rounds=4 * U16 if bf16 else 0.0)
    assert_within(got["entropy"], dense["entropy"], entropy_bound(eps, dense["entropy"], w.shape[0], sides=1), "entropy")
    assert_within(got["token_logprobs"], dense["token_logprobs"], eps, "token_logprobs")
    if dtype == torch.float32:
        assert torch.equal(got["topk_ids"], dense["topk_ids"])


def test_packed_rows_and_bad_input():
    hidden, weight, ids, old, ts, mask, _ = _batch()
    s = _settings(ts, mask)
    packed = [t.reshape(1, B * T, *t.shape[2:]) for t in (hidden, ids, old, ts["topk_ids"], ts["topk_logprobs"], mask)]
    a, _ = eopd_loss_from_hidden(packed[0], weight, *packed[1:], s)
    b, _ = eopd_loss_from_hidden(hidden, weight, ids, old, ts["topk_ids"], ts["topk_logprobs"], mask, s)
    assert a.item() == b.item()  # exact by construction: the same 21 rows in the same order, chunked alike
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
    # two fp32 softmaxes: each p_i within (2 u R + gamma_V + 3u) p_i (z - m: u R, exp: u R + 2u, the V-term sum:
    # gamma_V, the division: u; R the row's range), twice that apart: 1.3e-4 p_i; observed 6.0e-7 (p 0.99)
    rng = (z.max(-1, keepdim=True).values - torch.where(torch.isfinite(z), z, float("inf")).min(-1, keepdim=True).values)
    got = kernels._softmax_in_place(z.clone())
    assert_within(got, want, 2 * (2 * U32 * rng.double() + gamma(z.shape[-1]) + 3 * U32) * want.double(), "softmax")


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
    # two fp32 log-softmaxes of the same logits: 2 log_softmax_rounding = 1.5e-4 (|z| <= 29); observed 3.8e-6
    zmax = float(z[torch.isfinite(z)].abs().max())
    assert_within(kernels._log_softmax_in_place(z.clone()), want, log_softmax_bound(zmax, z.shape[-1], sides=2),
                  "log_softmax")
    zd = z.double()
    dense = -(torch.softmax(zd, -1) * torch.log_softmax(zd, -1)).nan_to_num(0.0).sum(-1)
    # fp32 log-softmax against float64 (eps = log_softmax_rounding), then entropy_bound (sides=1): 3e-4 to 6e-4;
    # observed 5.0e-7
    eps = log_softmax_rounding(zmax, z.shape[-1])
    assert_within(kernels._entropy_of_logp(got), dense, entropy_bound(eps, dense, z.shape[-1], sides=1), "entropy")
