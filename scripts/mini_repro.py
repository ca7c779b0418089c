"""Laptop-scale test of the paper's claims on the embedded tiny pair: OPD vs EOPD vs an adaptive gate,
seed-paired, with held-out accuracy curves, Avg@k / Pass@k and paired tests (Holm-corrected).

    python scripts/mini_repro.py                 # 2 tasks x 3 arms x 5 seeds; writes docs/mini_repro/
    python scripts/mini_repro.py --quick --out /tmp/mr     # smoke run (2 seeds, a few steps)

What runs and what is measured: verl_eopd/math/repro.py. Training is the plain loop of
verl_eopd/math/loop.py around verl_eopd's own objective, teacher statistics and EOS remap (the default
run's shape); docs/mini_repro.md compares it with runs of verl's trainer.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from verl_eopd.cpu.embedded import ADD, MULTIPLE
from verl_eopd.math.loop import LoopConfig
from verl_eopd.math.repro import ARMS, correct, figures, markdown, run, verdict_table

ROOT = Path(__file__).resolve().parents[1]


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tasks", nargs="+", default=[ADD, MULTIPLE], choices=[ADD, MULTIPLE],
                   help="embedded pairs: sums (one answer) and multiples (several answers, teacher uncertain on them)")
    p.add_argument("--arms", nargs="+", default=list(ARMS), choices=list(ARMS))
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2, 3, 4])
    p.add_argument("--steps", type=int, default=60, help="rollout batches per run")
    p.add_argument("--batch", type=int, default=512, help="responses per rollout batch (one PPO mini-batch)")
    p.add_argument("--epochs", type=int, default=4, help="PPO epochs per rollout batch")
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--eval-every", type=int, default=10)
    p.add_argument("--k", type=int, default=16, help="samples per held-out problem for Avg@k / Pass@1..k")
    p.add_argument("--ab-prompts", type=int, default=200, help="fixed held-out prompts for claims (a) and (b)")
    p.add_argument("--out", default=str(ROOT / "docs" / "mini_repro"), help="results.json, results.md, figures")
    p.add_argument("--quick", action="store_true", help="smoke run: 2 seeds, opd + eopd, 3 steps of 32, k 4")
    args = p.parse_args(argv)
    if args.quick:
        args.seeds, args.arms, args.steps, args.batch, args.k, args.ab_prompts, args.eval_every = \
            [0, 1], ["opd", "eopd"], 3, 32, 4, 32, 3
    if min(args.steps, args.batch, args.epochs, args.k, args.ab_prompts, args.eval_every) < 1 or args.k < 8 and not args.quick:
        p.error("--steps, --batch, --epochs, --ab-prompts, --eval-every must be >= 1 and --k >= 8 (Pass@8 is a claim)")
    if "opd" not in args.arms:
        p.error("--arms must include opd: every claim compares an EOPD arm with OPD")
    if len(args.seeds) < 2:
        p.error("--seeds: a paired test needs at least 2 seeds")
    cfg = LoopConfig(steps=args.steps, batch=args.batch, ppo_epochs=args.epochs, lr=args.lr, eval_every=args.eval_every)
    out = Path(args.out)
    t0 = time.time()
    summaries = []
    for task in args.tasks:
        summary = run(args.arms, args.seeds, cfg, args.k, args.ab_prompts, out / task, task=task)
        figures(summary, out / task)
        summaries.append(summary)
    rows = correct([row for s in summaries for row in s["verdicts"]])  # one family over every task
    (out / "verdicts.json").write_text(json.dumps(rows, indent=1))
    command = " ".join(["python scripts/mini_repro.py", *argv])
    text = "\n\n".join([f"Command: `{command}` ({(time.time() - t0) / 60:.1f} min on this machine).",
                         *[markdown(s) for s in summaries], verdict_table(rows)])
    (out / "results.md").write_text(text + "\n")
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
