"""verl-eopd: Entropy-Aware On-Policy Distillation (arXiv 2603.07079) for verl.

Layers (import direction only downward; see docs/architecture.md):
    verl_eopd.core         pure torch: settings, chunked kernels, top-k estimates, the objective, EOS remap
    verl_eopd.integration  verl glue: config, loss binding, teacher worker, trainer, server route, patches
    verl_eopd.cpu          laptop/CI scaffolding: CPU platform, HF rollout backend, the embedded tiny pair
    verl_eopd.math         the task: datasets, verifiable reward, evaluation, curves, the mini reproduction
    verl_eopd.plugin       the `verl.plugins` entry point (the only module with import side effects)
    verl_eopd.main         `python -m verl_eopd.main algorithm=eopd ...`

This top level re-exports the pure-torch API and imports neither verl nor ray.
"""

from .core import (
    DEFAULT_CHUNK_BYTES,
    ENTROPY_ESTIMATORS,
    GATES,
    EOPDSettings,
    SettingsError,
    entropy_from_topk,
    entropy_gate,
    eopd_loss,
    eopd_loss_from_hidden,
    eopd_stats,
    eopd_token_losses,
    fkl_topk,
    map_teacher_eos_in_topk,
    ppo_clipped_rkl,
    remap_first_eos,
    student_logprobs_at,
    student_logprobs_at_from_hidden,
    teacher_stats,
    teacher_stats_from_hidden,
    token_logprob_from_topk,
)
from .integration.version import SUPPORTED_VERL_VERSIONS

__version__ = "0.1.0"

__all__ = [
    "DEFAULT_CHUNK_BYTES",
    "ENTROPY_ESTIMATORS",
    "GATES",
    "EOPDSettings",
    "SUPPORTED_VERL_VERSIONS",
    "SettingsError",
    "entropy_from_topk",
    "entropy_gate",
    "eopd_loss",
    "eopd_loss_from_hidden",
    "eopd_stats",
    "eopd_token_losses",
    "fkl_topk",
    "map_teacher_eos_in_topk",
    "ppo_clipped_rkl",
    "remap_first_eos",
    "student_logprobs_at",
    "student_logprobs_at_from_hidden",
    "teacher_stats",
    "teacher_stats_from_hidden",
    "token_logprob_from_topk",
]
