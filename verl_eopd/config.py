"""EOPD loss config: verl's `DistillationLossConfig` plus the EOPD keys, validated when built.

Lives at `distillation.distillation_loss` (hydra `_target_: verl_eopd.config.EOPDLossConfig`). The YAML
mirror with one comment per key is `verl_eopd/config/eopd_loss.yaml`; a test keeps the two in step.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

from verl.workers.config import DistillationLossConfig

from . import plugin
from .losses import ENTROPY_ESTIMATORS, GATES

plugin.register()  # the loss name must be registered before DistillationLossConfig.__post_init__ looks it up

_KEY = "distillation.distillation_loss"


def _fail(key: str, value, why: str, fix: str):
    raise ValueError(f"{_KEY}.{key}={value!r}: {why}. Fix: {fix}")


def _is_number(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


@dataclass
class EOPDLossConfig(DistillationLossConfig):
    """Entropy-aware on-policy distillation loss (DESIGN.md section 2). Paper defaults.

    Inherited keys keep verl's meaning; EOPD fixes some of them:
      loss_mode "eopd"; topk 16 (teacher top-k width K); use_policy_gradient False (EOPD builds its own
      PPO-clipped reverse-KL term; verl's PG wrapper would drop the FKL gradient); loss_max_clamp and
      log_prob_min_clamp None (a clamp of the mixed per-token loss, or of the log-probs inside FKL, would
      change the objective; EOPD's terms are finite without them); use_task_rewards False (pure
      distillation; True adds verl's PPO/GRPO loss on task advantages, and the EOPD term is then scaled by
      distillation_loss_coef).

    EOPD keys:
      entropy_threshold: tau in nats; a token is gated when the teacher entropy exceeds it (hard/soft gates).
      fkl_coef: alpha, the weight of the gated forward KL (0 = plain OPD).
      gate: "hard" (1[H > tau], the paper) | "soft" (sigmoid((H - tau)/gate_temperature)) |
            "quantile" (the gate_quantile fraction of valid tokens with the highest teacher entropy in the
            micro-batch).
      gate_temperature: nats, width of the soft gate.   gate_quantile: fraction in (0, 1] for "quantile".
      entropy_estimator: how teacher entropy is estimated when only top-k log-probs are available (the
            server route): "midpoint" of the top-k bounds, "lower" or "upper". Exact entropy (ref route)
            is used whenever the batch carries it.
      clip_ratio_c: optional dual-clip constant (> 1) on the reverse-KL surrogate for negative advantages;
            None in the paper, 3.0 in verl's vanilla PPO loss.
      teacher_vocab_size: V of the teacher used by the top-k entropy bounds and the outside-top-k
            log-prob fallback; None uses the student's vocabulary size.
      logits_chunk_mb: fp32 MiB of student logits visited at once by the chunked loss.
    """

    loss_mode: str = "eopd"
    topk: Optional[int] = 16
    use_task_rewards: bool = False
    distillation_loss_coef: float = 1.0
    loss_max_clamp: Optional[float] = None
    log_prob_min_clamp: Optional[float] = None
    use_policy_gradient: bool = False
    policy_loss_mode: str = "vanilla"
    clip_ratio: float = 0.2
    clip_ratio_low: float = 0.2
    clip_ratio_high: float = 0.2

    entropy_threshold: float = 0.8
    fkl_coef: float = 1.0
    gate: str = "hard"
    gate_temperature: float = 0.1
    gate_quantile: float = 0.2
    entropy_estimator: str = "midpoint"
    clip_ratio_c: Optional[float] = None
    teacher_vocab_size: Optional[int] = None
    logits_chunk_mb: int = 64

    def __post_init__(self):
        self.validate()
        super().__post_init__()

    def validate(self) -> None:
        """Raise ValueError naming the first bad key and its fix. Runs when the config is built."""
        if self.loss_mode != "eopd":
            _fail("loss_mode", self.loss_mode, "EOPDLossConfig only drives the 'eopd' loss",
                  "set loss_mode=eopd, or drop the _target_ to use verl's DistillationLossConfig")
        if not (isinstance(self.topk, int) and not isinstance(self.topk, bool) and self.topk >= 1):
            _fail("topk", self.topk, "the teacher top-k width must be an integer >= 1", "use topk=16 (the paper)")
        if not (_is_number(self.entropy_threshold) and self.entropy_threshold >= 0):
            _fail("entropy_threshold", self.entropy_threshold, "tau is an entropy in nats and must be finite and >= 0",
                  "use entropy_threshold=0.8 (the paper); use fkl_coef=0 to switch the FKL term off")
        if not (_is_number(self.fkl_coef) and self.fkl_coef >= 0):
            _fail("fkl_coef", self.fkl_coef, "the forward-KL weight must be finite and >= 0", "use fkl_coef=1.0 (the paper)")
        if not (_is_number(self.distillation_loss_coef) and self.distillation_loss_coef >= 0):
            _fail("distillation_loss_coef", self.distillation_loss_coef, "must be finite and >= 0", "use 1.0")
        if self.gate not in GATES:
            _fail("gate", self.gate, f"unknown gate; choose one of {list(GATES)}", "use gate=hard (the paper)")
        if not (_is_number(self.gate_temperature) and self.gate_temperature > 0):
            _fail("gate_temperature", self.gate_temperature, "the soft-gate width must be > 0", "use 0.1 nats")
        if not (_is_number(self.gate_quantile) and 0 < self.gate_quantile <= 1):
            _fail("gate_quantile", self.gate_quantile, "the gated fraction must be in (0, 1]", "use 0.2")
        if self.entropy_estimator not in ENTROPY_ESTIMATORS:
            _fail("entropy_estimator", self.entropy_estimator, f"choose one of {list(ENTROPY_ESTIMATORS)}",
                  "use entropy_estimator=midpoint")
        for key in ("clip_ratio_low", "clip_ratio_high"):
            v = getattr(self, key)
            if not (_is_number(v) and v > 0) or (key == "clip_ratio_low" and v >= 1):
                _fail(key, v, "PPO clip eps must be > 0 (and < 1 for the low side)", "use 0.2 (the paper)")
        if self.clip_ratio_c is not None and not (_is_number(self.clip_ratio_c) and self.clip_ratio_c > 1):
            _fail("clip_ratio_c", self.clip_ratio_c, "the dual-clip constant must be > 1", "use null (the paper) or 3.0")
        if self.use_policy_gradient:
            _fail("use_policy_gradient", True, "EOPD builds its own PPO-clipped reverse-KL term; verl's policy-"
                  "gradient wrapper would detach the forward-KL term", "set use_policy_gradient=false")
        if self.loss_max_clamp is not None:
            _fail("loss_max_clamp", self.loss_max_clamp, "clamping the mixed per-token EOPD loss changes the "
                  "objective (the FKL term is >= 0 and finite without it)", "set loss_max_clamp=null")
        if self.log_prob_min_clamp is not None:
            _fail("log_prob_min_clamp", self.log_prob_min_clamp, "EOPD renormalises the teacher over its top-k "
                  "and never takes log 0, so a log-prob floor would only bias the FKL", "set log_prob_min_clamp=null")
        if self.use_chunked_topk:
            _fail("use_chunked_topk", True, "EOPD's loss is always chunked", "drop it; size chunks with logits_chunk_mb")
        if self.teacher_vocab_size is not None and not (
            isinstance(self.teacher_vocab_size, int) and self.teacher_vocab_size >= self.topk
        ):
            _fail("teacher_vocab_size", self.teacher_vocab_size, "must be an integer >= topk", "use null")
        if not (isinstance(self.logits_chunk_mb, int) and self.logits_chunk_mb >= 1):
            _fail("logits_chunk_mb", self.logits_chunk_mb, "must be an integer >= 1", "use 64")

    @property
    def loss_kwargs(self) -> dict:
        """Keyword arguments of `losses.eopd_token_losses` carried by this config."""
        return dict(
            entropy_threshold=float(self.entropy_threshold), fkl_coef=float(self.fkl_coef),
            clip_ratio_low=float(self.clip_ratio_low), clip_ratio_high=float(self.clip_ratio_high),
            clip_ratio_c=self.clip_ratio_c, gate=self.gate, gate_temperature=float(self.gate_temperature),
            gate_quantile=float(self.gate_quantile),
        )
