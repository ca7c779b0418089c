"""Tolerances derived from the dtype and the number of reductions (not from what one machine observed).

Two fp32 computations of the same sum in different orders (another micro-batching, another rank count, another
CPU's BLAS blocking) differ by at most 2 gamma_n sum_i |x_i|, gamma_n = n u / (1 - n u) (Higham, Accuracy and
Stability of Numerical Algorithms, 2nd ed., eq. 3.4 and 4.4), u = 2^-24 for fp32. A parameter gradient here is
a sum over the batch's T response tokens of per-token terms, each itself the end of a chain of reductions over
the vocabulary (log-softmax, V terms) and the hidden size (matmuls, H terms): n = T + V + H. With
sum_i |x_i| <= T max_t |x_t| and the assumption that no single token's term exceeds the tensor's largest entry
(no catastrophic cancellation between tokens; the batches here are random, not adversarial), per tensor

    |g_a - g_b| <= 2 gamma_n T max|g|        (fp32_grad_bound)

For the suite's tiny models (T <= 100, n <= 500) that is at most 6e-4 of max|g|: a real bug (a term dropped, a
wrong normaliser, a gate on other tokens, a coefficient off by 10%) moves gradients by a fraction of max|g|,
far above it.

AdamW's first step maps a gradient g to lr g / (|g| + eps) (bias corrections cancel at step 1), which is not
Lipschitz at g ~ eps: a gradient entry near zero that differs in its last bits between two runs can move its
parameter by up to 2 lr. adamw_first_step_bound gives the exact difference that the two runs' own gradients
imply, plus the rounding of the update itself.
"""

from __future__ import annotations

import math

import torch

U32 = 2.0 ** -24  # fp32 unit roundoff
U16 = 2.0 ** -8  # bf16 unit roundoff
U64 = 2.0 ** -53  # fp64 unit roundoff


def gamma(n: int, u: float = U32) -> float:
    assert n * u < 1
    return n * u / (1 - n * u)


def fp32_grad_bound(g: torch.Tensor, *, tokens: int, vocab: int, hidden: int, sides: int = 2) -> float:
    """Largest |g_a - g_b| between two summation orders of the gradient tensor `g` (module docstring); sides=1
    against a float64 reference (gamma_n T max|g|)."""
    return sides * gamma(tokens + vocab + hidden) * tokens * float(g.abs().max())


def assert_grads_close(got: dict, ref: dict, *, tokens: int, vocab: int, hidden: int, what: str = "grad",
                       sides: int = 2) -> None:
    """Every gradient tensor within fp32_grad_bound of the reference (and both the same set of tensors)."""
    assert set(got) == set(ref), set(got) ^ set(ref)
    for name in ref:
        a, b = got[name].double(), ref[name].double()
        bound = fp32_grad_bound(b, tokens=tokens, vocab=vocab, hidden=hidden, sides=sides)
        diff = float((a - b).abs().max())
        assert diff <= bound, f"{what} {name}: max |diff| {diff:.3g} > derived fp32 bound {bound:.3g}"


def adamw_first_step_bound(g_a: torch.Tensor, g_b: torch.Tensor, p: torch.Tensor, *, lr: float, clip_a: float,
                           clip_b: float, eps: float = 1e-8) -> torch.Tensor:
    """Per-entry bound on |p_a - p_b| after one AdamW step from the same parameters: the difference the two
    runs' gradients imply through lr c g / (|c g| + eps) (c: each run's global-norm clip factor), plus a few
    fp32 roundings of the update (weight decay, the division, the subtraction)."""
    def step(g, c):
        g = g.double() * c
        return g / (g.abs() + eps)

    return lr * (step(g_a, clip_a) - step(g_b, clip_b)).abs() + 8 * U32 * (p.double().abs() + lr)


# ------------------------------------------------------------------------------------------------ per-token values
# Values derived from one row of logits (log-probabilities, entropies, the per-token loss terms) are bounded in two
# steps: how far the two sides' logits can lie apart (dz: fp32_logit_bound for two fp32 forwards of a model, or
# gamma_H (|h| @ |W|^T) for one fp32 matmul against an exact one), then the fp32 rounding of the log-softmax and of
# the sums over the row (V terms). exp and log are taken within 1 ulp (2u), as in PyTorch's CPU kernels.


def model_logit_scale(model) -> float:
    """Z >= sum_k |h_k W_ik| for every logit z_i of a Hugging Face causal LM whose lm head reads an RMSNorm output h
    (Qwen3): ||h||_2 <= sqrt(H) max|norm weight| (h = g * x / rms(x)), so by Cauchy-Schwarz the lm head's absolute
    terms sum to at most sqrt(H) max|g| max_i ||W_i||_2. Also bounds max|z|."""
    h = model.config.hidden_size
    g = float(model.model.norm.weight.detach().abs().max())
    w = float(model.lm_head.weight.detach().double().norm(dim=-1).max())
    return h ** 0.5 * g * w


def fp32_logit_bound(model, seq_len: int) -> float:
    """|z_a - z_b| for the logits of two fp32 forwards of `model` over the same sequence of <= seq_len tokens, in any
    layout (padded or packed, another micro-batching, another BLAS blocking): 2 gamma_n Z (module docstring), n the
    reduction chain through the network, per layer the RMSNorms, q/k/v/o and gate/up projections (5 H terms), q.k and
    the attention's weighted sum over <= seq_len positions (2 S), the MLP's down projection (I), then the final norm and
    the lm head (2 H); Z = model_logit_scale, the lm head's absolute terms (as for gradients, the rounding of the body
    is taken at the scale of the sum it feeds: no catastrophic cancellation in a random model)."""
    c = model.config
    n = c.num_hidden_layers * (5 * c.hidden_size + c.intermediate_size + 2 * seq_len) + 2 * c.hidden_size
    return 2 * gamma(n) * model_logit_scale(model)


def matmul_abs(h: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """sum_k |h_k W_ik| for every logit z = h W^T (h [..., H], w [V, H]) in float64 [..., V]: bounds |z_i|, and
    one fp32 product (any blocking) lies within gamma_H times it of the exact one."""
    return h.double().abs() @ w.double().abs().T


def bf16_rounding(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """|a - b| left by rounding each of two equal (or fp32-close) values once to bf16: u16 (|a| + |b|)."""
    return U16 * (a.double().abs() + b.double().abs())


def lm_head_logit_bound(model) -> float:
    """|z_a - z_b| for two fp32 lm heads (whole, or in row chunks) on the same hidden states h: each within
    gamma_H sum_k |h_k W_ik| <= gamma_H Z of the exact product (Z = model_logit_scale)."""
    return 2 * gamma(model.config.hidden_size) * model_logit_scale(model)


def log_softmax_rounding(zmax: float, vocab: int, u: float = U32) -> float:
    """|log p_i - log p_i*| for one fp32 log-softmax of a row of `vocab` logits with |z| <= zmax against the exact
    log-softmax of the same logits: s_j = z_j - m (u R, R <= 2 zmax), exp(s_j) (u R + 2u relative), S = sum_j exp(s_j)
    (V positive terms: gamma_V relative), log S (+ 2u ln V), s_i - log S (u |log p_i| <= u (R + ln V)); the other
    order, z_i - (m + log S), adds u |m| twice. In all u (8 zmax + 3 ln V + 2) + gamma_V."""
    import math

    return u * (8 * zmax + 3 * math.log(vocab) + 2) + gamma(vocab, u)


def log_softmax_bound(zmax: float, vocab: int, dz: float = 0.0, *, sides: int = 2) -> float:
    """|log p_a - log p_b| between two log-softmaxes of rows whose logits differ by <= dz: 2 dz (log p = z -
    logsumexp z moves by at most twice the largest logit move) plus each fp32 side's log_softmax_rounding
    (sides=1 when the other side is a float64 reference, whose rounding is ~1e-16)."""
    return 2 * dz + sides * log_softmax_rounding(zmax, vocab)


def entropy_bound(eps: float, entropy: float, vocab: int, *, sides: int = 2, u: float = U32) -> float:
    """|H_a - H_b| for entropies -sum_j p_j log p_j over `vocab` terms from log-probabilities within eps of each
    other (log_softmax_bound): dH = -sum_j p_j (log p_j + 1) d log p_j moves by at most eps (H + 1); each fp32 side
    rounds p_j = exp(log p_j) (2u), the product (u), and sums V positive terms (gamma_V): (3u + gamma_V) H.
    H <= `entropy` (ln V at most)."""
    return eps * (1 + entropy) + sides * (3 * u + gamma(vocab, u)) * entropy


def fp32_loss_bound(eps: float, lipschitz_mean: float, abs_mean: float, *, tokens: int, k: int,
                    sides: int = 2) -> float:
    """|L_a - L_b| for a token-mean loss L = (1/T) sum_t l_t from log-probabilities within eps of each other.
    Each l_t is Lipschitz in its row's log-probabilities (the clipped policy term max(-r A, -clip(r) A) with constant
    r |A|, the top-k FKL sum_i p~_i (log p~_i - log q_i) with constant 1 since the p~_i sum to 1, times its
    coefficient): eps lipschitz_mean, lipschitz_mean >= the token mean of those constants. Each fp32 side rounds the
    k-term FKL sum, the mean over T tokens and a few elementwise ops (6u): (gamma_{T+k} + 6u) abs_mean, abs_mean >=
    the token mean of the terms' absolute parts (r |A| + coefficient x (ln k + max |log q|))."""
    return eps * lipschitz_mean + sides * (gamma(tokens + k) + 6 * U32) * abs_mean


def assert_within(got: torch.Tensor, want: torch.Tensor, bound, what: str) -> float:
    """max |got - want| <= bound (a float or a tensor broadcastable to got, element by element); returns the
    largest |diff|, for the observed figure in the test's comment. Non-finite entries must match exactly."""
    a, b = torch.as_tensor(got).double(), torch.as_tensor(want).double()
    assert a.shape == b.shape, (what, a.shape, b.shape)
    fin = torch.isfinite(b)
    assert torch.equal(torch.isfinite(a), fin) and torch.equal(a[~fin], b[~fin]), f"{what}: non-finite entries differ"
    diff = (a - b).abs().where(fin, torch.zeros_like(a))
    bound_t = torch.as_tensor(bound, dtype=torch.float64).expand_as(diff)
    worst = int((diff - bound_t).argmax())
    assert bool((diff <= bound_t).all()), (f"{what}: |diff| {float(diff.flatten()[worst]):.3g} at flat index {worst} > "
                                           f"derived bound {float(bound_t.flatten()[worst]):.3g}")
    return float(diff.max()) if diff.numel() else 0.0


# ------------------------------------------------------------------------------- top-k estimates and the PPO term
# Hand-computed float64 references on fp32 inputs: each input is rounded once to fp32 (u |x|), then each fp32 op
# rounds its result (u relative; exp and log 2u). First order, the error of a result is the sum over inputs and
# intermediate results y of |d result / d y| times y's rounding.


def fp32_mean_bound(elem_bound, values: torch.Tensor) -> float:
    """|mean_fp32(a) - mean(b)| over T entries with |a_t - b_t| <= elem_bound_t: mean(elem_bound) plus the fp32
    sum of T terms and the division, gamma_T mean |b| (T - 1 additions and one division: T roundings)."""
    v = torch.as_tensor(values).double().flatten()
    e = torch.as_tensor(elem_bound, dtype=torch.float64).expand_as(torch.as_tensor(values)).flatten()
    return float(e.mean()) + gamma(v.numel()) * float(v.abs().mean())


def topk_tail_rounding(p: list, u: float = U32) -> float:
    """Relative error of the top-k tail mass r = 1 - sum_j exp(lp_j) computed in fp32 from lp_j = fl(log p_j)
    (each within u |log p_j|): each exp within (u |log p_j| + 2u) relative, the k-term sum gamma_k, so the sum lies
    within (1 - r)(u max|log p| + 2u + gamma_k) of 1 - r; the subtraction adds u r. Relative to r:
    (1 - r) / r (u max|log p| + 2u + gamma_k) + u (it grows as the tail r shrinks: cancellation)."""
    import math

    r = 1 - sum(p)
    return (1 - r) / r * (u * max(abs(math.log(x)) for x in p) + 2 * u + gamma(len(p), u)) + u


def topk_logprob_rounding(p: list, n_vocab: int, u: float = U32) -> float:
    """Largest error of any log-mass the top-k estimates take from fp32 top-k log-probs of masses p (k = len(p)):
    a top-k log-prob itself (u |log p_j|), a renormalised one log(p_j / sum p) (+ gamma_{k+2}: the sum and the
    division, then the log), or the uniform-tail log-prob log(r / (n_vocab - k)) (topk_tail_rounding, then the
    division u and the log 2u |log|)."""
    import math

    r = 1 - sum(p)
    tail = topk_tail_rounding(p, u) + u + 2 * u * abs(math.log(r / (n_vocab - len(p))))
    top = u * max(abs(math.log(x)) for x in p) + gamma(len(p) + 2, u)
    return max(tail, top)


def topk_entropy_estimate_bound(p: list, n_vocab: int, upper: float, u: float = U32) -> float:
    """|H_fp32 - H| for a top-k entropy estimate (lower, upper bound or midpoint; docs/topk_route.md) from fp32 top-k
    log-probs of masses p against its float64 value. Every term is x ln(1/x) of a mass x (the p_j, the tail r and
    its pieces) or r ln n (n = n_vocab - k): with each mass's log within eps = topk_logprob_rounding, the x ln x terms
    move by eps (1 + H) (as in entropy_bound) and r ln n by eps r ln n <= eps H, all terms positive and summing to
    at most `upper` (the upper bound, H_K + r ln(n / r)); the estimate's own rounding over <= k + 4 terms:
    (3u + gamma_{k+4}) upper."""
    eps = topk_logprob_rounding(p, n_vocab, u)
    return eps * (1 + 2 * upper) + (3 * u + gamma(len(p) + 4, u)) * upper


def ppo_rkl_fp32_bound(logp, old, t_tok, w=None, clip: tuple = (0.8, 1.2), u: float = U32) -> torch.Tensor:
    """Per token, |w max(-r A, -clip(r) A)| computed in fp32 from fp32-rounded log pi_theta, log pi_old, log pi_T
    against float64 (r = exp(logp - old), A = t_tok - old; the clip's edges are constants). With rho = max(r,
    clip(r)) (the largest factor either branch applies): partials d/dlogp = -w r A, d/dold <= w rho (|A| + 1),
    d/dt_tok <= w rho; intermediates: d (|d| u, factor w r |A|), exp (2u), A (u |A|, factor w rho), the products
    r A, clip(r) A and w x (u each, factor 1):
        u w rho [|A| (|logp| + |old| + |d| + 5) + |old| + |t_tok| + |A|].
    Also bounds the fp32 gradient w.r.t. logp on an unclipped token, -w r A (same roundings). Float64 in, [same shape]."""
    logp, old, t_tok = (torch.as_tensor(x).double() for x in (logp, old, t_tok))
    w = torch.ones_like(logp) if w is None else torch.as_tensor(w).double()
    d, A = logp - old, t_tok - old
    r = d.exp()
    r = torch.maximum(r, r.clamp(*clip))
    return u * w.abs() * r * (A.abs() * (logp.abs() + old.abs() + d.abs() + 5) + old.abs() + t_tok.abs() + A.abs())


def _xlnx_neg(x: torch.Tensor) -> torch.Tensor:
    """h(x) = -x ln x (0 at 0), float64."""
    return -torch.special.xlogy(x, x)


def topk_entropy_bounds_error(topk_logprobs: torch.Tensor, n_vocab: int, eps, u: float = U32) -> tuple:
    """(d_lower, d_upper, d_mid) [...]: how far core.topk.entropy_from_topk's lower bound, upper bound and midpoint,
    computed with unit roundoff u from inputs within eps [..., K] (or a float) of the top-k log-probs lp
    `topk_logprobs` [..., K] (float64, -inf = padding), can lie from the same formulas at lp. First order in u and
    eps, except the tail terms, which use h(x) = -x ln x's modulus |h(a) - h(b)| <= h(delta) for |a - b| <= delta
    <= 1/e (Fannes; h increasing there), so they stay small when the tail r shrinks (topk_tail_rounding's relative
    error grows as 1/r there). With p = e^lp (each within dp = p (eps + 2u), plus fp32's denormal spacing), m = sum
    p, r = 1 - m over n = V - k tail tokens, H_K = -sum p lp:
      H_K:    sum_k p_k ((eps_k + 3u) |lp_k| + eps_k) + gamma_K H_K
      r:      dr = (sum_k dp_k + gamma_K m)(1 + u) + u r
      upper:  U = r ln n + h(r): (1 + 4u)(dr ln n + h(dr)) + 4u U (ln n, ln r, the difference, the product)
      lower:  G = j h(c) + h(rho), c = min(p_min, r), j = floor(r / c): c within dc = dp_min = p_min max_k (eps_k +
              2u) when p_min + dp_min < r - dr (c = p_min on both sides), else max(dp_min, dr); rho within
              D = dr + (j + 1) dc + 3u (r + dr + c); while D + dc <= c / 2 the computed j is j or j +- 1, and G
              (continuous across the floor's steps) moves by j |h(c') - h(c)| + 2 h(D + dc) (D max|h'| near rho when
              rho is farther than D + dc from 0 and c: j cannot step), plus 5u G (the xlogx's and the sum); when
              r + dr < p_min - dc, c = r on both sides and G = h(r) moves by dr max|h'|; otherwise (a tail below the
              rounding) 0 <= G, G' <= max(U, U'): U + dU. The kernel's min(lower tail, upper tail) keeps the larger
              of the two errors.
    The sums H_K + tail add u |result|, the midpoint u |result| more."""
    lp = torch.as_tensor(topk_logprobs).double()
    valid = torch.isfinite(lp)
    eps = torch.as_tensor(eps, dtype=torch.float64).expand_as(lp).where(valid, torch.zeros_like(lp))
    lpv = lp.where(valid, torch.zeros_like(lp))
    p = lpv.exp().where(valid, torch.zeros_like(lp))
    k = lp.shape[-1]
    e = eps + 2 * u
    dp = p * e + 2.0 ** -149  # fp32 exp below the normal range: absolute spacing 2^-149
    m, hk = p.sum(-1), -(p * lpv).sum(-1)
    dh = (p * ((eps + 3 * u) * lpv.abs() + eps)).sum(-1) + gamma(k, u) * hk
    r = (1 - m).clamp_min(0.0)
    dr = (dp.sum(-1) + gamma(k, u) * m) * (1 + u) + u * r
    assert bool((dr <= 1 / math.e).all()), "topk_entropy_bounds_error: input error too large for the tail bound"
    n = (n_vocab - valid.sum(-1)).double()
    tail = n > 0
    lnn = n.clamp_min(1.0).log()
    U = (r * lnn + _xlnx_neg(r)).where(tail, torch.zeros_like(r))
    dU = ((1 + 4 * u) * (dr * lnn + _xlnx_neg(dr)) + 4 * u * U).where(tail, torch.zeros_like(r))
    pmin = p.where(valid, torch.full_like(p, math.inf)).amin(-1)
    c = torch.minimum(pmin, r)
    safe_c = c.where(c > 0, torch.ones_like(c))
    j = torch.floor(r / safe_c).where(c > 0, torch.zeros_like(c))
    rho = (r - j * c).clamp_min(0.0)
    G = j * _xlnx_neg(c) + _xlnx_neg(rho)
    dpmin = pmin.where(valid.any(-1), torch.zeros_like(c)) * e.where(valid, torch.zeros_like(e)).amax(-1)
    dc = torch.where(pmin + dpmin < r - dr, dpmin, torch.maximum(dpmin, dr))  # c = p_min on both sides: p_min's error
    D = dr + (j + 1) * dc + 3 * u * (r + dr + c)
    lo_c = (c - dc).clamp_min(1e-300)
    mvt = dc * torch.maximum((lo_c.log() + 1).abs(), ((c + dc).log() + 1).abs())
    dhc = torch.minimum(_xlnx_neg(dc.clamp_max(1 / math.e)), torch.where(c > dc, mvt, torch.full_like(c, math.inf)))
    regular = tail & (c > 0) & (D + dc <= c / 2) & (D + dc <= 1 / math.e)
    # rho's term: away from 0 and c (by more than D + dc) the computed j is j, and h(rho) moves by D max|h'|;
    # near them j may step by one, and the two h terms it trades move by at most h(D + dc) each
    interior = (rho > D + dc) & (rho + D + dc < c)
    rho_mvt = D * torch.maximum(((rho - D).clamp_min(1e-300).log() + 1).abs(), ((rho + D).log() + 1).abs())
    rho_term = torch.where(interior, rho_mvt, 2 * _xlnx_neg((D + dc).clamp_max(1 / math.e)))
    moved = j * dhc + rho_term
    # r below p_min on both sides: c = r, j = r / r = 1 and rho = 0 exactly in IEEE arithmetic, G = h(r)
    whole = (r + dr < pmin - dc) & (r > dr)
    moved = torch.where(whole, dr * torch.maximum(((r - dr).clamp_min(1e-300).log() + 1).abs(),
                                                  ((r + dr).log() + 1).abs()), moved)
    dG = torch.where(regular | (whole & tail), moved + 5 * u * (G + moved), U + dU)
    dG = torch.maximum(dG, dU).where(tail, torch.zeros_like(r))
    lower, upper = hk + G.where(tail, torch.zeros_like(r)), hk + U
    d_lower = dh + dG + u * (lower + dh + dG)
    d_upper = dh + dU + u * (upper + dh + dU)
    d_mid = (d_lower + d_upper) / 2 + u * ((lower + upper) / 2 + (d_lower + d_upper) / 2)
    return d_lower, d_upper, d_mid
