"""Plot EOPD training metrics from any verl run: several runs overlaid, seeds as mean +- std bands.

    python scripts/plot_metrics.py --run EOPD=logs/eopd_s0.jsonl --run EOPD=logs/eopd_s1.jsonl \
        --run OPD=logs/opd_s0.jsonl --out plots/
    python scripts/plot_metrics.py --run EOPD=tensorboard_log/verl-eopd/eopd --out plots/

A run is verl's file logger output (`trainer.logger='[console,file]'`, a JSONL of {"step", "data"} per
step; path from VERL_FILE_LOGGER_PATH or ./<project>/<experiment>.jsonl) or a tensorboard log folder /
event file (`trainer.logger='[console,tensorboard]'`). Runs given the same label are seeds of one
setting: the plot shows their mean and a +- std band. Writes one PNG per metric and `metrics.png` with
all panels. Metrics a run did not log are skipped for that run (an OPD run logs the gated FKL too: the
forward KL is measured on every run, only its weight is 0).
"""

from __future__ import annotations

import argparse
import sys

from verl_eopd.math.curves import plot, read_run


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run", action="append", required=True, metavar="LABEL=PATH",
                   help="a run log; repeat a label for seeds of one setting")
    p.add_argument("--out", required=True, help="output folder for the PNGs")
    p.add_argument("--metric", action="append", default=[], metavar="TITLE=KEY",
                   help="plot these metrics instead of the default EOPD panels")
    p.add_argument("--smooth", type=float, default=0.0, help="EMA weight in [0, 1)")
    p.add_argument("--title", default="")
    args = p.parse_args(argv)
    if not 0 <= args.smooth < 1:
        p.error(f"--smooth={args.smooth}: must be in [0, 1)")
    groups: dict[str, list] = {}
    for item in args.run:
        label, sep, path = item.partition("=")
        if not sep:
            p.error(f"--run {item!r}: expected LABEL=PATH")
        groups.setdefault(label, []).append(read_run(path))
    panels = None
    if args.metric:
        panels = {}
        for item in args.metric:
            t, sep, k = item.partition("=")
            if not sep:
                p.error(f"--metric {item!r}: expected TITLE=KEY")
            panels[t] = k
    for path in plot(groups, args.out, panels, args.smooth, args.title):
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
