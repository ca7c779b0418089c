"""The pure-torch core of EOPD: settings, chunked kernels, top-k estimates, the objective, the EOS remap.

Never imports verl or ray (a test asserts it), so it runs anywhere torch does.
"""

from .eos import map_teacher_eos_in_topk, remap_first_eos
from .kernels import (
    DEFAULT_CHUNK_BYTES,
    student_logprobs_at,
    student_logprobs_at_from_hidden,
    teacher_stats,
    teacher_stats_from_hidden,
)
from .objective import entropy_gate, eopd_loss, eopd_loss_from_hidden, eopd_stats, eopd_token_losses, ppo_clipped_rkl
from .settings import (
    DEFAULT_LOGITS_CHUNK_MB,
    ENTROPY_ESTIMATORS,
    GATES,
    EntropyEstimator,
    EOPDSettings,
    Gate,
    SettingsError,
    resolve_settings,
)
from .topk import entropy_from_topk, estimated_entropy, fkl_topk, token_logprob_from_topk, valid_topk

__all__ = [
    "DEFAULT_CHUNK_BYTES",
    "DEFAULT_LOGITS_CHUNK_MB",
    "ENTROPY_ESTIMATORS",
    "GATES",
    "EOPDSettings",
    "EntropyEstimator",
    "Gate",
    "SettingsError",
    "entropy_from_topk",
    "entropy_gate",
    "eopd_loss",
    "eopd_loss_from_hidden",
    "eopd_stats",
    "eopd_token_losses",
    "estimated_entropy",
    "fkl_topk",
    "map_teacher_eos_in_topk",
    "ppo_clipped_rkl",
    "remap_first_eos",
    "resolve_settings",
    "student_logprobs_at",
    "student_logprobs_at_from_hidden",
    "teacher_stats",
    "teacher_stats_from_hidden",
    "token_logprob_from_topk",
    "valid_topk",
]
