"""Sweep eopd_grpo's `distillation_loss_coef` on the embedded tiny pair: GRPO alone, GRPO + c x EOPD for each c,
EOPD alone; seed-paired, held-out greedy accuracy, the two terms' gradient norms, Holm-corrected paired tests.

    python scripts/grpo_coef_sweep.py                      # 5 seeds; writes docs/eopd_grpo/
    python scripts/grpo_coef_sweep.py --quick --out /tmp/s # smoke run (2 seeds, 2 steps of 32)

What runs and what is measured: verl_eopd/math/coef_sweep.py.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from verl_eopd.cpu.embedded import ADD, MULTIPLE
from verl_eopd.math.coef_sweep import COEFS, markdown, run
from verl_eopd.math.loop import LoopConfig

ROOT = Path(__file__).resolve().parents[1]


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--task", default=ADD, choices=[ADD, MULTIPLE])
    p.add_argument("--coefs", nargs="+", type=float, default=list(COEFS))
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2, 3, 4])
    p.add_argument("--steps", type=int, default=60)
    p.add_argument("--prompts", type=int, default=128, help="prompts per rollout batch")
    p.add_argument("--n", type=int, default=4, help="responses per prompt (GRPO's group)")
    p.add_argument("--epochs", type=int, default=4)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--eval-every", type=int, default=10)
    p.add_argument("--out", default=str(ROOT / "docs" / "eopd_grpo"))
    p.add_argument("--quick", action="store_true", help="smoke run: 2 seeds, 2 steps of 8 prompts x 4")
    args = p.parse_args(argv)
    if args.quick:
        args.seeds, args.steps, args.prompts, args.eval_every = [0, 1], 2, 8, 2
    if min(args.steps, args.prompts, args.epochs, args.eval_every) < 1 or args.n < 2:
        p.error("--steps, --prompts, --epochs, --eval-every must be >= 1 and --n >= 2 (GRPO needs a group)")
    if any(c <= 0 for c in args.coefs):
        p.error("--coefs must be > 0 (GRPO alone, c = 0, is always an arm)")
    if len(args.seeds) < 2:
        p.error("--seeds: a paired test needs at least 2 seeds")
    cfg = LoopConfig(steps=args.steps, batch=args.prompts * args.n, rollouts_per_prompt=args.n, ppo_epochs=args.epochs,
                     lr=args.lr, eval_every=args.eval_every)
    t0 = time.time()
    summary = run(args.seeds, cfg, Path(args.out), coefs=tuple(args.coefs), task=args.task)
    text = f"Command: `{' '.join(['python scripts/grpo_coef_sweep.py', *argv])}` " \
           f"({(time.time() - t0) / 60:.1f} min on this machine).\n\n" + markdown(summary)
    (Path(args.out) / "results.md").write_text(text + "\n")
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
