"""Training curves from verl's logs: read a run (file logger JSONL or tensorboard), average seeds, plot.

A run is verl's file logger output (`trainer.logger='[console,file]'`, a JSONL of {"step", "data"} per
step) or a tensorboard log folder / event file. Runs given the same label are seeds of one setting: the
plot shows their mean and a +- std band. `scripts/plot_metrics.py` is the command line.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Optional

# panel title -> metric key (verl's names for reward; ours under actor/eopd/)
PANELS = {
    "student token entropy (nats)": "actor/eopd/student_entropy_mean",
    "teacher entropy (nats)": "actor/eopd/teacher_entropy_mean",
    "gated fraction of tokens": "actor/eopd/gate_frac",
    "forward KL on the run's gated tokens": "actor/eopd/fkl_gated_mean",
    "forward KL on tokens with teacher entropy > tau": "actor/eopd/fkl_high_entropy_mean",
    "reverse KL (log pi_old - log pi_T)": "actor/eopd/rkl_mean",
    "reward / accuracy": "critic/score/mean",
}


def save_figure(fig, path) -> str:
    """Lay out, write (110 dpi) and close a matplotlib figure; returns its path."""
    import matplotlib.pyplot as plt

    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return str(path)


def read_run(path: str) -> dict[str, dict[int, float]]:
    """{metric: {step: value}} from a verl file-logger JSONL or a tensorboard folder/event file."""
    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(f"{path}: no such run log")
    if p.is_file() and p.suffix in (".jsonl", ".json"):
        series: dict[str, dict[int, float]] = {}
        for line in p.read_text().splitlines():
            if not line.strip():
                continue
            rec = json.loads(line)
            step, data = int(rec["step"]), rec.get("data", {})
            for key, value in data.items():
                if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
                    series.setdefault(key, {})[step] = float(value)
        return series
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(p), size_guidance={"scalars": 0})
    acc.Reload()
    return {tag: {int(e.step): float(e.value) for e in acc.Scalars(tag)} for tag in acc.Tags().get("scalars", [])}


def seed_band(runs: list[dict[int, float]]) -> tuple[list[int], list[float], list[float]]:
    """Steps logged by every seed, the mean across seeds and the (population) std at each."""
    steps = sorted(set.intersection(*(set(r) for r in runs)))
    mean, std = [], []
    for s in steps:
        vals = [r[s] for r in runs]
        m = sum(vals) / len(vals)
        mean.append(m)
        std.append(math.sqrt(sum((v - m) ** 2 for v in vals) / len(vals)))
    return steps, mean, std


def smooth(values: list[float], weight: float) -> list[float]:
    """Exponential moving average (tensorboard's smoothing); weight 0 = none."""
    out, last = [], None
    for v in values:
        last = v if last is None else weight * last + (1 - weight) * v
        out.append(last)
    return out


def plot(groups: dict[str, list[dict[str, dict[int, float]]]], out_dir: str, panels: Optional[dict] = None,
         smoothing: float = 0.0, title: str = "") -> list[str]:
    """groups: label -> list of runs (seeds). Returns the PNG paths written."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = panels or PANELS
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    present = {t: k for t, k in panels.items() if any(k in run for runs in groups.values() for run in runs)}
    if not present:
        raise ValueError(f"none of the metrics {list(panels.values())} is in these runs")
    cols = min(3, len(present))
    rows = math.ceil(len(present) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.6 * cols, 3.4 * rows), squeeze=False)
    written = []
    for ax_i, (panel, key) in enumerate(present.items()):
        ax = axes[ax_i // cols][ax_i % cols]
        single, sax = plt.subplots(figsize=(5.5, 3.8))
        for label, runs in groups.items():
            runs_with = [r[key] for r in runs if key in r]
            if not runs_with:
                continue
            steps, mean, std = seed_band(runs_with)
            mean_s = smooth(mean, smoothing)
            for a in (ax, sax):
                line, = a.plot(steps, mean_s, label=f"{label} (n={len(runs_with)})")
                if len(runs_with) > 1:
                    lo = [m - s for m, s in zip(mean_s, std)]
                    hi = [m + s for m, s in zip(mean_s, std)]
                    a.fill_between(steps, lo, hi, color=line.get_color(), alpha=0.2, linewidth=0)
        for a in (ax, sax):
            a.set_title(panel, fontsize=10)
            a.set_xlabel("step")
            a.grid(alpha=0.3)
            a.legend(fontsize=8)
        name = key.replace("/", "_") + ".png"
        written.append(save_figure(single, out / name))
    for j in range(len(present), rows * cols):
        axes[j // cols][j % cols].axis("off")
    if title:
        fig.suptitle(title)
    written.append(save_figure(fig, out / "metrics.png"))
    return written
