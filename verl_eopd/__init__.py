"""verl-eopd: Entropy-Aware On-Policy Distillation (arXiv 2603.07079) for verl.

The maths (`verl_eopd.losses`) is pure torch and imports nothing from verl. The verl integration
(`verl_eopd.plugin`, `verl_eopd.config`) is loaded by verl's `verl.plugins` entry point.
"""

from .losses import (
    ENTROPY_ESTIMATORS,
    GATES,
    eopd_loss,
    eopd_token_losses,
    entropy_from_topk,
    entropy_gate,
    fkl_topk,
    ppo_clipped_rkl,
    student_logprobs_at,
    teacher_stats,
    token_logprob_from_topk,
)

__version__ = "0.1.0"
SUPPORTED_VERL_VERSIONS = ("0.9.1",)

__all__ = [
    "ENTROPY_ESTIMATORS",
    "GATES",
    "SUPPORTED_VERL_VERSIONS",
    "eopd_loss",
    "eopd_token_losses",
    "entropy_from_topk",
    "entropy_gate",
    "fkl_topk",
    "ppo_clipped_rkl",
    "student_logprobs_at",
    "teacher_stats",
    "token_logprob_from_topk",
]
