"""What the server (top-k only) route approximates, measured against the exact (reference-worker) route.

Synthetic LLM-like teacher distributions over the Qwen3 vocabulary (V = 151,936): Zipf-shaped logits
-s * log(rank) with Gaussian noise, s drawn so the exact entropies span 0 to ~6 nats. For each top-k width
K the script compares, token by token:

  * the gate decision 1[H > tau] from the exact entropy vs from the top-k estimate (midpoint of the bounds),
    per bin of exact entropy, and how often the bounds alone decide it (interval entirely above/below tau);
  * the sampled token's teacher log-prob: fraction outside the top-k (the fallback) and the fallback's error;
  * the EOPD loss with the exact entropy vs the top-k estimate (exact token log-prob in both), for a
    student that is a perturbed teacher; the fallback's effect is its error on A_t = log pi_T - log pi_old.

    python scripts/topk_route_agreement.py [--tokens 4096] [--tau 0.8] [--out docs/topk_route.md]
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from verl_eopd.core import (
    entropy_from_topk,
    eopd_loss,
    teacher_stats,
    token_logprob_from_topk,
)

BINS = (0.0, 0.4, 0.8, 1.2, 2.0, 4.0, float("inf"))


def synthetic_teacher(n: int, V: int, gen: torch.Generator) -> torch.Tensor:
    """[n, V] logits: Zipf slope s per row (log-uniform in [1.2, 7.2]) plus noise, random token order."""
    s = torch.exp(torch.empty(n, 1).uniform_(0.0, 1.8, generator=gen)) * 1.2
    base = -torch.log(torch.arange(1, V + 1, dtype=torch.float32))
    logits = s * base + 0.5 * torch.randn(n, V, generator=gen)
    perm = torch.randperm(V, generator=gen)
    return logits[:, perm]


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens", type=int, default=4096)
    ap.add_argument("--vocab", type=int, default=151936)
    ap.add_argument("--tau", type=float, default=0.8)
    ap.add_argument("--ks", type=int, nargs="+", default=[4, 16, 64, 128])
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=str, default=None)
    args = ap.parse_args()
    gen = torch.Generator().manual_seed(args.seed)
    V, tau, kmax = args.vocab, args.tau, max(args.ks)

    H, TOPI, TOPL, TOK, TOKLP, STUDENT = [], [], [], [], [], []
    for start in range(0, args.tokens, 256):
        n = min(256, args.tokens - start)
        t_logits = synthetic_teacher(n, V, gen)
        s_logits = t_logits * 0.9 + 0.3 * torch.randn(n, V, generator=gen)  # a student near the teacher
        y = torch.multinomial(torch.softmax(s_logits, -1), 1, generator=gen).squeeze(-1)  # on-policy sample
        st = teacher_stats(t_logits.unsqueeze(0), y.unsqueeze(0), kmax)
        H.append(st["entropy"][0]), TOPI.append(st["topk_ids"][0]), TOPL.append(st["topk_logprobs"][0])
        TOK.append(y), TOKLP.append(st["token_logprobs"][0])
        STUDENT.append(s_logits)
    H, TOPI, TOPL = torch.cat(H), torch.cat(TOPI), torch.cat(TOPL)
    TOK, TOKLP, STUDENT = torch.cat(TOK), torch.cat(TOKLP), torch.cat(STUDENT)
    old = torch.log_softmax(STUDENT, -1).gather(-1, TOK[:, None]).squeeze(-1)
    mask = torch.ones(1, args.tokens, dtype=torch.bool)

    lines = [f"tokens {args.tokens}, V {V}, tau {tau}, seed {args.seed}; exact teacher entropy: mean "
             f"{H.mean():.2f}, {(H > tau).float().mean():.1%} of tokens above tau", ""]
    lines += ["| K | gate agreement | decided by the bounds alone | tokens outside top-k | fallback abs error "
              "(nats, median) | est. entropy abs error (nats, mean) | loss change from the entropy estimate |",
              "|---|---|---|---|---|---|---|"]
    per_bin = {}
    for k in args.ks:
        ids, lp = TOPI[:, :k], TOPL[:, :k]
        est, lo, hi = entropy_from_topk(lp, V)
        agree = ((est > tau) == (H > tau)).float()
        decided = ((lo > tau) | (hi <= tau)).float()
        tok_lp, in_topk = token_logprob_from_topk(ids, lp, TOK, V)
        out = ~in_topk
        fb_err = (tok_lp - TOKLP).abs()[out]
        x = STUDENT.unsqueeze(0)
        exact, _ = eopd_loss(x, TOK[None], old[None], ids[None], lp[None], mask, teacher_entropy=H[None],
                             teacher_token_logprobs=TOKLP[None], entropy_threshold=tau)
        # entropy estimate alone (exact token log-prob): how much the gate approximation moves the loss
        gate_only, _ = eopd_loss(x, TOK[None], old[None], ids[None], lp[None], mask,
                                 teacher_token_logprobs=TOKLP[None], entropy_threshold=tau)
        rel = (gate_only - exact).abs() / exact.abs().clamp_min(1e-6)
        lines.append(
            f"| {k} | {agree.mean():.1%} | {decided.mean():.1%} | {out.float().mean():.1%} | "
            f"{(fb_err.median().item() if out.any() else 0.0):.2f} | {(est - H).abs().mean():.3f} | {rel.item():.2%} |")
        for b in range(len(BINS) - 1):
            sel = (H >= BINS[b]) & (H < BINS[b + 1])
            per_bin.setdefault(b, {})[k] = (agree[sel].mean().item() if sel.any() else float("nan"), int(sel.sum()))
    lines += ["", "Gate agreement by exact teacher entropy (tokens in the bin):", "",
              "| exact H (nats) | tokens | " + " | ".join(f"K = {k}" for k in args.ks) + " |",
              "|---|---|" + "---|" * len(args.ks)]
    for b, by_k in per_bin.items():
        n = next(iter(by_k.values()))[1]
        lines.append(f"| [{BINS[b]}, {BINS[b + 1]}) | {n} | " + " | ".join(
            f"{by_k[k][0]:.1%}" for k in args.ks) + " |")
    text = "\n".join(lines)
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n")


if __name__ == "__main__":
    main()
