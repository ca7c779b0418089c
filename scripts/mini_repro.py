"""Laptop-scale test of the paper's claims: OPD vs EOPD vs an adaptive gate on the embedded tiny pair.

    python scripts/mini_repro.py                      # full: 3 variants x 3 seeds, writes docs/mini_repro.md
    python scripts/mini_repro.py --quick --out /tmp/mr --doc /tmp/mr/mini_repro.md   # CI smoke (1 seed, few steps)

Each run is `python -m verl_eopd.main algorithm=<opd|eopd> ...` on the embedded tiny teacher/student and
arithmetic task (CPU, its own Ray session), logging verl's file logger to <out>/<variant>_s<seed>/metrics.jsonl
and saving the final student as a Hugging Face folder. Each final student (and, as references, the initial
student and the teacher) is then evaluated on held-out problems (the task's val split, never trained on):
k = 8 samples at T = 1.0, top-p 0.8 (the paper's protocol), Avg@8 and Pass@1..8.

The claims tested, EOPD vs OPD (paper Sec. 5-6):
  (a) the student's token entropy does not collapse: higher `actor/eopd/student_entropy_mean` at the end;
  (b) lower forward KL to the teacher on high-entropy tokens: lower `actor/eopd/fkl_high_entropy_mean` at the
      end (the tokens whose teacher entropy exceeds tau = 0.8, the same set for every variant);
  (c) better Pass@k on held-out problems.
"End" ("start") = the mean over the last (first) 5 logged steps. A claim "holds" here when the difference has the claimed sign
and Welch's t over seeds exceeds 2; "not shown" when |t| <= 2; "reversed" when t < -2 in the claimed
direction. Outputs: docs/mini_repro.md, docs/mini_repro/*.png, docs/mini_repro/results.json, and the run logs.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from verl_eopd.math.repro import VARIANTS, run

ROOT = Path(__file__).resolve().parents[1]


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--k", type=int, default=8)
    p.add_argument("--problems", type=int, default=200, help="held-out problems evaluated")
    p.add_argument("--max-tokens", type=int, default=16)
    p.add_argument("--lr", type=float, default=3e-4, help="actor learning rate (the embedded default run uses 1e-3)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="extra hydra override for every training run")
    p.add_argument("--out", default=str(ROOT / "outputs" / "mini_repro"), help="run folders (logs, checkpoints)")
    p.add_argument("--doc", default=str(ROOT / "docs" / "mini_repro.md"))
    p.add_argument("--fig-dir", default=None, help="default: <doc folder>/mini_repro")
    p.add_argument("--quick", action="store_true", help="CI smoke: seed 0, opd + eopd, 4 steps, 16 problems, k 4")
    args = p.parse_args(argv)
    if args.quick:
        args.seeds, args.variants, args.steps, args.problems, args.k = [0], ["opd", "eopd"], 4, 16, 4
    if args.steps < 1 or args.k < 1 or args.problems < 1:
        p.error("--steps, --k and --problems must be >= 1")
    return run(args, argv)


if __name__ == "__main__":
    sys.exit(main())
