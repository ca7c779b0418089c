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

Next to the training panels, one panel per validation benchmark: verl's validation accuracy
`val-core/<data_source>/acc/mean@N` (N = the validation samples per problem, actor_rollout_ref.rollout.val_kwargs.n;
`reward/mean@N` when the reward gives no `acc`), logged every trainer.test_freq steps and at step 0 with
trainer.val_before_train. `--no-validation` leaves them out; `--metric` replaces every default panel.
"""

from __future__ import annotations

import argparse
import re
import sys
from typing import Iterable

from verl_eopd.math.curves import PANELS, plot, read_run

# verl's validation metrics (trainer_base._validate): val-core/<data_source>/<var>/<metric>, the core var being
# `acc` when the reward returns one, else `reward`; mean@N is the mean over the N samples of each problem
VAL_KEY = re.compile(r"^val-core/(?P<source>.+)/(?P<var>acc|reward)/mean@(?P<n>\d+)$")


def validation_panels(keys: Iterable[str]) -> dict[str, str]:
    """{panel title: key} for each benchmark's validation accuracy in `keys` (`acc` preferred over `reward` for a
    data_source, then the largest N), sorted by data_source."""
    best: dict[str, tuple[bool, int, str]] = {}
    for key in keys:
        m = VAL_KEY.match(key)
        if m:
            rank = (m["var"] == "acc", int(m["n"]), key)
            best[m["source"]] = max(best.get(m["source"], rank), rank)
    panels = {}
    for source, (is_acc, n, key) in sorted(best.items()):
        panels[f"validation {'accuracy' if is_acc else 'reward'}: {source} (mean@{n})"] = key
    return panels


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run", action="append", required=True, metavar="LABEL=PATH",
                   help="a run log; repeat a label for seeds of one setting")
    p.add_argument("--out", required=True, help="output folder for the PNGs")
    p.add_argument("--metric", action="append", default=[], metavar="TITLE=KEY",
                   help="plot these metrics instead of the default EOPD panels")
    p.add_argument("--smooth", type=float, default=0.0, help="EMA weight in [0, 1)")
    p.add_argument("--title", default="")
    p.add_argument("--no-validation", action="store_true", help="leave out the validation accuracy panels")
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
    elif not args.no_validation:
        keys = {k for runs in groups.values() for run in runs for k in run}
        panels = {**PANELS, **validation_panels(keys)}
    for path in plot(groups, args.out, panels, args.smooth, args.title):
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
