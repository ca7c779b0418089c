"""GPU runs without flash-attn: verl defaults to `flash_attention_2`, which nothing installs on a plain GPU
machine (the actor and the teacher in the reference worker would fail to load). When flash-attn is not
importable, attention falls back to PyTorch's sdpa, on padded micro-batches (sdpa over a packed,
padding-removed micro-batch builds one mask over all its tokens). The teacher in the reference worker
inherits the actor's model settings. Every key the user set wins; `verl-eopd[flash-attn]`-style installs
(verl's `flash-attn-cu130torch211` extra) keep verl's defaults.
"""

from __future__ import annotations

import importlib.util

NO_FLASH_ATTN_SETTINGS = {
    "actor_rollout_ref.model.override_config.attn_implementation": "sdpa",
    "actor_rollout_ref.model.use_remove_padding": False,
}


def flash_attn_available() -> bool:
    return importlib.util.find_spec("flash_attn") is not None
