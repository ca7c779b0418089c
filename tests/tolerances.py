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

import torch

U32 = 2.0 ** -24  # fp32 unit roundoff
U16 = 2.0 ** -8  # bf16 unit roundoff


def gamma(n: int, u: float = U32) -> float:
    assert n * u < 1
    return n * u / (1 - n * u)


def fp32_grad_bound(g: torch.Tensor, *, tokens: int, vocab: int, hidden: int) -> float:
    """Largest |g_a - g_b| between two summation orders of the gradient tensor `g` (module docstring)."""
    return 2 * gamma(tokens + vocab + hidden) * tokens * float(g.abs().max())


def assert_grads_close(got: dict, ref: dict, *, tokens: int, vocab: int, hidden: int, what: str = "grad") -> None:
    """Every gradient tensor within fp32_grad_bound of the reference (and both the same set of tensors)."""
    assert set(got) == set(ref), set(got) ^ set(ref)
    for name in ref:
        a, b = got[name].double(), ref[name].double()
        bound = fp32_grad_bound(b, tokens=tokens, vocab=vocab, hidden=hidden)
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
