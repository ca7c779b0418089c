"""The short human summary printed when `python -m verl_eopd.main` finishes, read from verl's own file log.

    student held-out accuracy before -> after (verl's `val-core/*` validation metrics), the teacher's on the
    same problems (embedded default), gate fraction, student entropy and reverse KL (first -> last step),
    where the checkpoint and the metrics are, and the command that plots them.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Optional

from omegaconf import OmegaConf

from .math.curves import read_run


def metrics_path(config) -> Optional[str]:
    """Where verl's file logger writes this run's metrics (None when `file` is not among trainer.logger)."""
    loggers = OmegaConf.select(config, "trainer.logger") or []
    loggers = [loggers] if isinstance(loggers, str) else list(loggers)
    if "file" not in loggers:
        return None
    if os.environ.get("VERL_FILE_LOGGER_PATH"):
        return os.path.abspath(os.environ["VERL_FILE_LOGGER_PATH"])
    root = os.path.expanduser(os.environ.get("VERL_FILE_LOGGER_ROOT", "."))
    return os.path.abspath(os.path.join(root, config.trainer.project_name, f"{config.trainer.experiment_name}.jsonl"))


def header(config, algorithm: str, on_cpu: bool) -> str:
    """The few lines printed before the run starts: what trains on what, where, and where its outputs go."""
    sel = lambda key: OmegaConf.select(config, key)  # noqa: E731
    n = (sel("trainer.n_gpus_per_node") or 1) * (sel("trainer.nnodes") or 1)
    device = f"CPU ({n} rank{'s' if n > 1 else ''})" if on_cpu else f"{n} GPU{'s' if n > 1 else ''}"
    metrics = metrics_path(config) or "(no file logger: add trainer.logger='[console,file]')"
    return "\n".join([
        f"[verl_eopd] algorithm={algorithm} on {device}, rollout {sel('actor_rollout_ref.rollout.name')}",
        f"  student {sel('actor_rollout_ref.model.path')}",
        f"  teacher {sel('distillation.teacher_models.teacher_model.model_path')}",
        f"  data    {sel('data.train_files')} (validation {sel('data.val_files')})",
        f"  steps   {sel('trainer.total_training_steps') or 'one per batch for trainer.total_epochs'}; "
        f"checkpoints {sel('trainer.default_local_dir')}",
        f"  metrics {metrics}",
        f"  console {sel('trainer.console') or 'compact'} (trainer.console=full for verl's every-metric line)",
    ])


def embedded_teacher_accuracy(info: dict) -> float:
    """Greedy accuracy of the embedded teacher on the embedded held-out split (verl's validation set)."""
    from .math.loop import held_out_accuracy

    return held_out_accuracy(info["teacher"], info)


def _first_last(series: dict[int, float]) -> tuple[float, float]:
    steps = sorted(series)
    return series[steps[0]], series[steps[-1]]


def summarize(config, seconds: float, teacher_accuracy: Optional[float] = None) -> str:
    """The end-of-run summary (a few lines); says what is missing rather than failing."""
    lines = [f"[verl_eopd] run finished in {seconds / 60:.1f} min"]
    path = metrics_path(config)
    if path is None or not Path(path).exists():
        lines.append("  (no metrics file: add trainer.logger='[console,file]' for a summary and plots)")
        return "\n".join(lines)
    series = read_run(path)
    val = {k: v for k, v in series.items() if k.startswith("val-core/") and v}
    if val:
        lines.append("  held-out accuracy (verl's validation, " + ("greedy" if not OmegaConf.select(
            config, "actor_rollout_ref.rollout.val_kwargs.do_sample") else "sampled") + "):")
        for key, s in sorted(val.items()):
            steps = sorted(s)
            before, after = s[steps[0]], s[steps[-1]]
            curve = ", ".join(f"{st}: {100 * s[st]:.1f}%" for st in steps)
            lines.append(f"    student {100 * before:.1f}% -> {100 * after:.1f}% ({100 * (after - before):+.1f} points)"
                         f"  [{key}; step {curve}]")
        if teacher_accuracy is not None:
            lines.append(f"    teacher {100 * teacher_accuracy:.1f}% on the same problems (greedy)")
    else:
        lines.append("  no held-out accuracy: set trainer.val_before_train=true and trainer.test_freq to validate")
    parts = []
    for name, key, unit in (("gate fraction", "actor/eopd/gate_frac", ""),
                            ("student entropy", "actor/eopd/student_entropy_mean", " nats"),
                            ("reverse KL", "actor/eopd/rkl_mean", " nats")):
        if series.get(key):
            a, b = _first_last(series[key])
            parts.append(f"{name} {a:.3f} -> {b:.3f}{unit}")
    if parts:
        lines.append("  first -> last step: " + "; ".join(parts))
    ckpt_root = Path(str(config.trainer.default_local_dir))
    ckpts = sorted(ckpt_root.glob("global_step_*"), key=lambda p: int(p.name.rsplit("_", 1)[-1])) if ckpt_root.is_dir() else []
    lines.append(f"  checkpoint: {ckpts[-1] if ckpts else '(none saved; trainer.save_freq)'}")
    lines.append(f"  metrics:    {path}")
    label = OmegaConf.select(config, "trainer.experiment_name") or "run"
    lines.append(f"  plot:       python scripts/plot_metrics.py --run {label}={path} --out plots/")
    return "\n".join(lines)
