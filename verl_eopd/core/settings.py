"""The EOPD objective's settings: one frozen dataclass, validated once, taken by every layer.

The pure-torch objective (`objective.eopd_loss`), the verl logits processor and registered loss, verl's
config (`integration.config.EOPDLossConfig.settings`) and the tests all read the hyper-parameters from an
`EOPDSettings`; its field defaults are the paper's (arXiv 2603.07079). Invalid values raise
`SettingsError` naming the field and the fix; the verl config re-raises it under
`distillation.distillation_loss.<field>`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields, replace
from typing import Literal, Optional, get_args

Gate = Literal["hard", "soft", "quantile"]
EntropyEstimator = Literal["midpoint", "lower", "upper"]
GATES: tuple[str, ...] = get_args(Gate)
ENTROPY_ESTIMATORS: tuple[str, ...] = get_args(EntropyEstimator)

DEFAULT_LOGITS_CHUNK_MB = 64  # fp32 MiB of logits visited at once (~110 rows at V = 151,936)


class SettingsError(ValueError):
    """A bad EOPD setting: `key=value: why. Fix: fix`; `.key` is the field name."""

    def __init__(self, key: str, value, why: str, fix: str):
        self.key = key
        super().__init__(f"{key}={value!r}: {why}. Fix: {fix}")


def _is_number(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def _is_int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


@dataclass(frozen=True)
class EOPDSettings:
    """Hyper-parameters of L = (1/N) sum_t m_t [RKL_t + fkl_coef g_t FKL_t] (paper defaults).

    entropy_threshold: tau in nats; the hard/soft gates open where the teacher entropy exceeds it.
    fkl_coef: alpha, the weight of the gated forward KL (0 = plain OPD).
    clip_ratio_low / clip_ratio_high: PPO clip eps of the reverse-KL ratio.
    clip_ratio_c: optional dual-clip constant (> 1) for negative advantages (None in the paper).
    gate: "hard" 1[H > tau] (the paper) | "soft" sigmoid((H - tau) / gate_temperature) | "quantile" (the
        gate_quantile fraction of valid tokens with the highest teacher entropy in the micro-batch).
    gate_temperature: nats, width of the soft gate.   gate_quantile: fraction in (0, 1].
    entropy_estimator: teacher entropy from top-k only (server route): "midpoint" of the bounds, "lower"
        or "upper"; exact entropy wins whenever it is given.
    teacher_vocab_size: V of the teacher for the top-k estimates; None = the student's V.
    logits_chunk_mb: fp32 MiB of logits visited at once by the chunked kernels.
    """

    entropy_threshold: float = 0.8
    fkl_coef: float = 1.0
    clip_ratio_low: float = 0.2
    clip_ratio_high: float = 0.2
    clip_ratio_c: Optional[float] = None
    gate: Gate = "hard"
    gate_temperature: float = 0.1
    gate_quantile: float = 0.2
    entropy_estimator: EntropyEstimator = "midpoint"
    teacher_vocab_size: Optional[int] = None
    logits_chunk_mb: int = DEFAULT_LOGITS_CHUNK_MB

    def __post_init__(self) -> None:
        if not (_is_number(self.entropy_threshold) and self.entropy_threshold >= 0):
            raise SettingsError("entropy_threshold", self.entropy_threshold,
                                "tau is an entropy in nats and must be finite and >= 0",
                                "use entropy_threshold=0.8 (the paper); use fkl_coef=0 to switch the FKL term off")
        if not (_is_number(self.fkl_coef) and self.fkl_coef >= 0):
            raise SettingsError("fkl_coef", self.fkl_coef, "the forward-KL weight must be finite and >= 0",
                                "use fkl_coef=1.0 (the paper)")
        for key in ("clip_ratio_low", "clip_ratio_high"):
            v = getattr(self, key)
            if not (_is_number(v) and v > 0) or (key == "clip_ratio_low" and v >= 1):
                raise SettingsError(key, v, "PPO clip eps must be > 0 (and < 1 for the low side)", "use 0.2 (the paper)")
        if self.clip_ratio_c is not None and not (_is_number(self.clip_ratio_c) and self.clip_ratio_c > 1):
            raise SettingsError("clip_ratio_c", self.clip_ratio_c, "the dual-clip constant must be > 1",
                                "use null (the paper) or 3.0")
        if self.gate not in GATES:
            raise SettingsError("gate", self.gate, f"unknown gate; choose one of {list(GATES)}", "use gate=hard (the paper)")
        if not (_is_number(self.gate_temperature) and self.gate_temperature > 0):
            raise SettingsError("gate_temperature", self.gate_temperature, "the soft-gate width must be > 0", "use 0.1 nats")
        if not (_is_number(self.gate_quantile) and 0 < self.gate_quantile <= 1):
            raise SettingsError("gate_quantile", self.gate_quantile, "the gated fraction must be in (0, 1]", "use 0.2")
        if self.entropy_estimator not in ENTROPY_ESTIMATORS:
            raise SettingsError("entropy_estimator", self.entropy_estimator,
                                f"choose one of {list(ENTROPY_ESTIMATORS)}", "use entropy_estimator=midpoint")
        if self.teacher_vocab_size is not None and not (_is_int(self.teacher_vocab_size) and self.teacher_vocab_size >= 1):
            raise SettingsError("teacher_vocab_size", self.teacher_vocab_size, "must be an integer >= 1", "use null")
        if not (_is_int(self.logits_chunk_mb) and self.logits_chunk_mb >= 1):
            raise SettingsError("logits_chunk_mb", self.logits_chunk_mb, "must be an integer >= 1",
                                f"use {DEFAULT_LOGITS_CHUNK_MB}")

    @property
    def chunk_bytes(self) -> int:
        return int(self.logits_chunk_mb) * 2**20

    @classmethod
    def field_names(cls) -> tuple[str, ...]:
        return tuple(f.name for f in fields(cls))

    @classmethod
    def of(cls, source) -> "EOPDSettings":
        """The settings carried by any object with these attributes (e.g. verl's EOPD loss config)."""
        return cls(**{name: getattr(source, name) for name in cls.field_names()})


def resolve_settings(settings: Optional[EOPDSettings], overrides: dict) -> EOPDSettings:
    """`settings` (default: the paper's) with keyword `overrides` (EOPDSettings fields) applied and validated."""
    base = settings if settings is not None else EOPDSettings()
    unknown = set(overrides) - set(EOPDSettings.field_names())
    if unknown:
        raise TypeError(f"unknown EOPD setting(s) {sorted(unknown)}; the fields are {list(EOPDSettings.field_names())}")
    return replace(base, **overrides) if overrides else base
