"""The short human summary printed when `python -m verl_eopd.main` finishes, read from verl's own file log.

    student held-out accuracy before -> after (verl's `val-core/*` validation metrics), the teacher's on the
    same problems (embedded default), gate fraction, student entropy and reverse KL (first -> last step),
    where the checkpoint and the metrics are, and the command that plots them; the last checkpoint verl saved
    (its step read from verl's `latest_checkpointed_iteration.txt`) with the exact `python -m verl.model_merger`
    command that exports it to a Hugging Face folder, and that folder. Works with any `trainer.logger` set.
"""

from __future__ import annotations

import os
import shlex
from pathlib import Path
from typing import Optional

from omegaconf import OmegaConf

from .integration.console import metrics_path  # noqa: F401  (where the summary reads)
from .math.curves import read_run
from .math.eval import has_weights


def tensorboard_dir(config) -> str:
    """Where verl's tensorboard logger writes: TENSORBOARD_DIR as given (runtime_env's env_vars first, as Ray's
    processes see it, then this process's), else tensorboard_log/<project>/<experiment> (verl's tracking.py),
    made absolute from the launch directory (the TaskRunner's working directory)."""
    given = OmegaConf.select(config, "ray_kwargs.ray_init.runtime_env.env_vars.TENSORBOARD_DIR") or \
        os.environ.get("TENSORBOARD_DIR")
    project, name = OmegaConf.select(config, "trainer.project_name"), OmegaConf.select(config, "trainer.experiment_name")
    return os.path.abspath(str(given) if given else f"tensorboard_log/{project}/{name}")


TRACKER = "latest_checkpointed_iteration.txt"  # verl's ray_trainer writes the last saved step here


def last_checkpoint(config) -> tuple[Optional[int], Path, str]:
    """(step, global_step_N folder, note) of the last checkpoint verl finished saving, read from verl's tracker
    file in trainer.default_local_dir (written after the actor's shards); step None with the reason otherwise."""
    root = Path(os.path.abspath(os.path.expanduser(str(OmegaConf.select(config, "trainer.default_local_dir")))))
    tracker = root / TRACKER
    if not tracker.is_file():
        async_save = OmegaConf.select(config, "actor_rollout_ref.actor.checkpoint.async_save")
        why = ("actor.checkpoint.async_save=true: verl writes no tracker" if async_save
               else "none saved; trainer.save_freq sets how often, and the last step always saves")
        return None, root, f"(no {tracker}: {why})"
    text = tracker.read_text().strip()
    if not text.isdigit():
        return None, root, f"({tracker} holds {text!r}, not a step number)"
    step = int(text)
    folder = root / f"global_step_{step}"
    if not (folder / "actor").is_dir():
        return step, folder, f"({tracker} names step {step}, but {folder / 'actor'} is missing: moved or deleted?)"
    return step, folder, ""


def merged_dir(config, step: int) -> Path:
    """Where the printed merge command puts step `step`'s Hugging Face folder: beside the checkpoints, outside
    the global_step_* folders that verl rotates away (trainer.max_actor_ckpt_to_keep)."""
    root = Path(os.path.abspath(os.path.expanduser(str(OmegaConf.select(config, "trainer.default_local_dir")))))
    return root / "hf" / f"global_step_{step}"


def merge_command(actor_dir: Path, target: Path) -> str:
    """verl 0.9.1's FSDP checkpoint -> Hugging Face folder command (verl/model_merger), ready to paste."""
    return (f"python -m verl.model_merger merge --backend fsdp --local_dir {shlex.quote(str(actor_dir))} "
            f"--target_dir {shlex.quote(str(target))}")


def export_lines(config) -> list[str]:
    """The summary's checkpoint / export / HF-folder lines (no metrics needed)."""
    step, folder, note = last_checkpoint(config)
    if step is None:
        return [f"  checkpoint: {note}"]
    lines = [f"  checkpoint: {folder} (step {step}, from {TRACKER}) {note}".rstrip()]
    if note:
        return lines
    saved_hf = folder / "actor" / "huggingface"
    if has_weights(saved_hf):  # actor.checkpoint.save_contents includes hf_model
        lines.append(f"  HF folder:  {saved_hf} (saved with the checkpoint: save_contents has hf_model)")
    else:
        target = merged_dir(config, step)
        lines.append(f"  export:     {merge_command(folder / 'actor', target)}")
        lines.append(f"  HF folder:  {target} (after the export; for transformers, vLLM and "
                     f"scripts/evaluate.py --model; docs/after_training.md)")
    return lines


def other_logger_lines(config, path: Optional[str]) -> list[str]:
    """Where the metrics went when there is no metrics file to summarize (any trainer.logger set)."""
    sel = lambda key: OmegaConf.select(config, key)  # noqa: E731
    loggers = sel("trainer.logger") or []
    loggers = [loggers] if isinstance(loggers, str) else list(loggers)
    project, name = sel("trainer.project_name"), sel("trainer.experiment_name")
    lines = []
    if path is not None:
        lines.append(f"  metrics:    file logger set, but {path} does not exist (the run wrote no step?)")
    if "tensorboard" in loggers:
        logdir = tensorboard_dir(config)
        lines.append(f"  metrics:    TensorBoard: tensorboard --logdir {shlex.quote(logdir)} (verl writes it relative "
                     "to the TaskRunner's working directory unless TENSORBOARD_DIR is set)")
    for other in ("wandb", "mlflow", "swanlab"):
        if other in loggers:
            lines.append(f"  metrics:    {other}: project {project}, run {name}")
    lines.append("  no summary of accuracy/gate/entropy: it is read from verl's file logger; add "
                 "trainer.logger='[console,file]' (plus your loggers) next time")
    return lines


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
        lines.extend(export_lines(config))
        lines.extend(other_logger_lines(config, path))
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
    lines.extend(export_lines(config))
    lines.append(f"  metrics:    {path}")
    label = OmegaConf.select(config, "trainer.experiment_name") or "run"
    lines.append(f"  plot:       python scripts/plot_metrics.py --run {label}={path} --out plots/")
    return "\n".join(lines)
