"""The preregistered experiment of docs/preregistration.md (issue 25): OPD, EOPD and the random-gate control on
the multiples pair (26 seeds), the sums retest (18 seeds), then the tau sweep and quantile arm as the budget
rule allows; the tests, plots and report.

    python scripts/prereg.py                       # the run; writes docs/prereg_run/ (refuses a dirty tree)
    python scripts/prereg.py --workers 2           # two single-thread worker processes
    python scripts/prereg.py --analyse             # redo summary.json, results.md and the plots from the run files
    python scripts/prereg.py --quick --out /tmp/p  # smoke run (tiny shapes; never analysed)
    python scripts/prereg.py --out docs/prereg_full --compare docs/prereg_run docs/prereg_addendum
                        # runs and reports nothing: every run in --out against the same run elsewhere, float for
                        # float (reproduction.json)
    python scripts/prereg.py --addendum --workers 2 --cpu-isa avx2
                        # section 11: tier 3 beside docs/prereg_run (n3 = 0 there) into docs/prereg_addendum/,
                        # after re-running two base runs (equal float for float, or it stops)

Resumable: each run is its own file, kept when it names this commit and config; a rerun does the rest.
What runs and what is measured: verl_eopd/math/prereg.py and prereg_run.py.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from verl_eopd.math.prereg_run import ROOT, Design, compare_runs, report, run_addendum, run_all


REFS = {True: "equal", False: "DIFFERENT", None: "not compared (none in DIR...)"}


def compare(out: Path, others: list[str]) -> int:
    rep = compare_runs(out, [Path(d) for d in others])
    print(f"[prereg] reproduction: {rep['equal']} of {rep['compared']} runs equal float for float to "
          f"{', '.join(others)}; references {REFS[rep['references_equal']]}; "
          f"{len(rep['not_in_others'])} run(s) not there, {len(rep['not_in_out'])} of theirs not here")
    if rep["different"] or rep["references_equal"] is False:
        print(f"[prereg] different: {rep['different'][:10]}", file=sys.stderr)
        return 1
    return 0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=None, help="default docs/prereg_run (docs/prereg_addendum with --addendum)")
    p.add_argument("--addendum", action="store_true",
                   help="preregistration section 11: tier 3 at the cap, paired with the run in --base")
    p.add_argument("--base", default=str(ROOT / "docs" / "prereg_run"), help="the base run of --addendum")
    p.add_argument("--workers", type=int, default=1, help="worker processes (each gets cpus / workers threads)")
    p.add_argument("--threads", type=int, default=None, help="torch threads per worker (default: cpus / workers)")
    p.add_argument("--cpu-isa", choices=["avx2"], default=None,
                   help="force torch/MKL/oneDNN's AVX2 kernels in the workers (to reproduce a run made on an AVX2 host)")
    p.add_argument("--quick", action="store_true", help="smoke run: 2 steps of 32, 8 samples on 30 + 10 problems")
    p.add_argument("--analyse", action="store_true", help="only redo the report from the run files in --out")
    p.add_argument("--compare", nargs="+", metavar="DIR", default=None,
                   help="run and report nothing: compare every run file in --out with the same run in DIR... "
                        "(float for float); writes reproduction.json, exit 1 when any differs")
    args = p.parse_args(sys.argv[1:] if argv is None else argv)
    out = Path(args.out or ROOT / "docs" / ("prereg_addendum" if args.addendum else "prereg_run"))
    if args.workers < 1 or (args.threads is not None and args.threads < 1):
        p.error(f"--workers and --threads must be >= 1, got {args.workers} and {args.threads}")
    if args.quick and out.resolve().is_relative_to(ROOT / "docs"):
        p.error("--quick writes smoke results: pass --out outside docs/")
    if args.compare:
        return compare(out, args.compare)
    design = Design.quick() if args.quick else Design()
    if args.addendum and not args.analyse:
        run_addendum(out, Path(args.base), design, args.workers, args.threads, cpu_isa=args.cpu_isa)
    elif not args.analyse:
        run_all(out, design, args.workers, args.threads, cpu_isa=args.cpu_isa)
    summary = report(out)
    for row in summary["primary"] + summary["secondary"]:
        lo, hi = row["ci95"]
        print(f"[prereg] {row['name']}: {row['mean_diff']:+.4g} [{lo:+.4g}, {hi:+.4g}], p (Holm) "
              f"{row['p_holm']:.3g}: {row['verdict']}")
    print(f"[prereg] report: {out / 'results.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
