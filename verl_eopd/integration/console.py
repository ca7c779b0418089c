"""The compact console of EOPD runs: one short line per step instead of verl's every-metric line.

verl's `console` backend prints every metric of a step on one line (about 3,000 characters for EOPD). With
`trainer.console: compact` (the EOPD default) the trainer's console backend is this one:

    [eopd] step 0/60 validation: eopd_tiny_add 19.7% | 0:41 elapsed
    [eopd] step 12/60 rkl 0.412 fkl 0.210 gate 0.183 H 0.405 score 0.31 10.5s | 2:49 elapsed, ETA 8:32
    [eopd] step 20/60 rkl 0.380 ... 10.2s validation: eopd_tiny_add 46.9% | 4:40 elapsed, ETA 7:58

(rkl: reverse KL on the sampled tokens; fkl: forward KL on the gated tokens; gate: share of tokens gated;
H: the student's entropy; score: the task reward, i.e. training accuracy; then seconds for the step; after the
bar, the time since the trainer's `fit` began and the estimated time left. The ETA is the pace since the first
training step this process ran (that step's own duration included, so validations and checkpoint saves that
fall between steps count) times the steps left to the total, which is verl's: trainer.total_training_steps
when set, else the batches per epoch x trainer.total_epochs. A resumed run measures its own pace.)

Every metric still goes to the other backends (`file`, tensorboard, wandb ...); `trainer.console: full`
restores verl's line.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Callable, Mapping, Optional

from omegaconf import OmegaConf

MODES = ("compact", "full")
ENV = "EOPD_CONSOLE"  # the run's trainer.console, for every process (set by verl_eopd.main)
# (label, metric key, format)
COLUMNS = (
    ("rkl", "actor/eopd/rkl_mean", "{:.3f}"),
    ("fkl", "actor/eopd/fkl_gated_mean", "{:.3f}"),
    ("gate", "actor/eopd/gate_frac", "{:.3f}"),
    ("H", "actor/eopd/student_entropy_mean", "{:.3f}"),
    ("score", "critic/score/mean", "{:.2f}"),
)
VAL_PREFIX, VAL_SUFFIX = "val-core/", "/acc/mean@1"


def _number(value) -> float:
    return float(value.item() if hasattr(value, "item") else value)


def clock_text(seconds: float) -> str:
    """`m:ss` under an hour, `h:mm:ss` from then on (seconds rounded down; negative counts as 0)."""
    s = max(0, int(seconds))
    h, rest = divmod(s, 3600)
    m, sec = divmod(rest, 60)
    return f"{h}:{m:02d}:{sec:02d}" if h else f"{m}:{sec:02d}"


def compact_line(data: Mapping, step: int, total: int, elapsed: Optional[float] = None,
                 eta: Optional[float] = None) -> str:
    """The console line of one logged record (a training step, a validation, or both), ending with the elapsed
    time and the ETA in seconds when given."""
    parts = [f"[eopd] step {step}/{total}"]
    for label, key, fmt in COLUMNS:
        if key in data:
            parts.append(f"{label} {fmt.format(_number(data[key]))}")
    if "timing_s/step" in data:
        parts.append(f"{_number(data['timing_s/step']):.1f}s")
    val = [(k[len(VAL_PREFIX):-len(VAL_SUFFIX)], _number(v)) for k, v in sorted(data.items())
           if k.startswith(VAL_PREFIX) and k.endswith(VAL_SUFFIX)]
    if val:
        parts.append("validation: " + ", ".join(f"{name} {100 * v:.1f}%" for name, v in val))
    if elapsed is not None:
        parts.append(f"| {clock_text(elapsed)} elapsed" + (f", ETA {clock_text(eta)}" if eta is not None else ""))
    return " ".join(parts)


class CompactConsole:
    """A verl Tracking backend (`log(data, step)`) printing `compact_line` with elapsed time and ETA.

    `clock`: seconds from any origin (time.monotonic; tests pass a fake). Elapsed counts from this object's
    creation (verl creates its Tracking at the start of `fit`). The pace is anchored at the start of the first
    training step logged (its log time minus its `timing_s/step`); each later training record gives
    ETA = (now - anchor time) / (step - anchor step) x (total - step). No ETA on a validation-only record or
    without a total."""

    def __init__(self, total_steps: int, clock: Callable[[], float] = time.monotonic):
        self.total_steps = total_steps
        self.clock = clock
        self.started = clock()
        self.anchor: Optional[tuple[int, float]] = None  # (steps done, clock) at the first step's start

    def eta(self, data: Mapping, step: int, now: float) -> Optional[float]:
        """Seconds left by the pace since the anchor (None for a validation-only record or an unknown total)."""
        if "timing_s/step" not in data or not self.total_steps:
            return None
        if self.anchor is None:
            self.anchor = (step - 1, now - _number(data["timing_s/step"]))
        done, since = step - self.anchor[0], now - self.anchor[1]
        return since / done * max(0, self.total_steps - step) if done > 0 else None

    def log(self, data, step) -> None:
        now = self.clock()
        eta = self.eta(data, int(step), now)
        print(compact_line(data, step, self.total_steps, now - self.started, eta), flush=True)

    def finish(self, *args, **kwargs) -> None:  # verl's Tracking.finish calls it on some backends
        return None


def console_mode(config) -> str:
    """`trainer.console` (compact by default); a clear error for anything else."""
    mode = str(config.trainer.get("console", "compact"))
    if mode not in MODES:
        raise ValueError(f"trainer.console={mode!r}: choose trainer.console=compact (one short line per step) or "
                         "trainer.console=full (verl's line with every metric)")
    return mode


def compact_tracking(tracking, config, total_steps: int):
    """Replace the `console` backend of verl's Tracking object by CompactConsole (compact mode only)."""
    backends = getattr(tracking, "logger", None)
    if console_mode(config) == "compact" and isinstance(backends, dict) and "console" in backends:
        backends["console"] = CompactConsole(total_steps)
        tracking.console_logger = backends["console"]
    return tracking


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


def earlier_launches_log(config) -> Optional[tuple[str, bytes]]:
    """(path, complete lines) of the file log of a run that resumes now, as its earlier launches left it; None
    without a `file` logger or an earlier log. verl's FileLogger opens the file with mode "wb" when `fit` begins,
    which would empty it: the trainer reads it after loading the checkpoint, before `fit`, and
    `keep_earlier_launches` writes it back. A launch killed mid-line leaves a partial last line: dropped."""
    path = metrics_path(config)
    if path is None or not os.path.isfile(path):
        return None
    data = Path(path).read_bytes()
    data = data[:data.rfind(b"\n") + 1]
    return (path, data) if data else None


def keep_earlier_launches(tracking, kept: Optional[tuple[str, bytes]]) -> None:
    """Write the earlier launches' lines (`earlier_launches_log`) back at the head of the file verl's Tracking
    just reopened; this launch's lines follow. A step that the resumed run repeats (the steps after the last
    checkpoint) is then logged twice, and the readers (`math.curves.read_run`) keep each step's last line."""
    backends = getattr(tracking, "logger", None)
    file_logger = backends.get("file") if isinstance(backends, dict) else None
    if kept is None or file_logger is None:
        return
    path, data = kept
    if os.path.abspath(file_logger.filepath) != path:
        print(f"[verl_eopd] the file logger writes {file_logger.filepath}, not {path}: earlier launches' metrics "
              f"are left in {path}", flush=True)
        return
    file_logger.fp.write(data)
    lines = data.count(b"\n")
    print(f"[verl_eopd] metrics: the {lines} lines of earlier launches kept in {path}; this launch's "
          f"follow", flush=True)


_QUIET_PREFIXES = ("Initial validation metrics", "Final validation metrics")  # the compact lines show them


def quiet_config_dump(module=None) -> None:
    """With the compact console, verl's multi-line pprints become one line or nothing: the whole resolved config
    that `TaskRunnerV1.run` prints (about 1,000 lines) becomes one line saying how to see it, and the
    validation-metric dicts the trainer prints are dropped (the compact console prints the accuracies). Other
    pprint calls are verl's. `module`: verl.trainer.main_ppo (patched in the driver: Ray pickles the TaskRunner
    class by value with the module's globals as they are there) or verl.trainer.ppo.v1.trainer_base (patched in
    the TaskRunner, where the trainer runs)."""
    if module is None:
        import verl.trainer.main_ppo as module

    original = module.pprint

    def pprint(obj, *args, **kwargs):
        if isinstance(obj, dict) and "actor_rollout_ref" in obj and "trainer" in obj:
            print("[verl_eopd] composed config not printed (trainer.console=compact): add --cfg job to the command "
                  "to see it, or trainer.console=full", flush=True)
            return None
        if isinstance(obj, str) and obj.startswith(_QUIET_PREFIXES):
            return None
        return original(obj, *args, **kwargs)

    pprint.__wrapped__ = original
    module.pprint = pprint
