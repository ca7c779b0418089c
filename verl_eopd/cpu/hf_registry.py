"""Registration of the `hf` rollout backend (cpu/hf_rollout.py) in verl's two rollout registries.

verl resolves a rollout backend by name in two in-process registries:

    RolloutReplicaRegistry["hf"]        -> HFReplica        looked up in the TaskRunner (student, teacher,
                                                             reward model); launches one server per replica
    _ROLLOUT_REGISTRY[("hf", "async")]  -> HFServerAdapter  looked up in every actor worker and every
                                                             CheckpointEngineWorker; pushes weights

so `register()` must run in every process that does a lookup (the plugin's set-up does). This module
imports neither hf_rollout nor Ray: both entries are resolved lazily (a loader, a dotted path), so the
set-up that runs at `import verl` never imports the backend it registers.
"""

from __future__ import annotations

from ..integration import patches

BACKEND_NAME = "hf"
ADAPTER_FQN = "verl_eopd.cpu.hf_rollout.HFServerAdapter"


def _load_replica():
    from .hf_rollout import HFReplica

    return HFReplica


def register() -> None:
    """Make rollout name "hf" resolvable in this process (both verl registries). Idempotent."""
    from verl.workers.rollout import base
    from verl.workers.rollout.replica import RolloutReplicaRegistry

    current = RolloutReplicaRegistry._registry.get(BACKEND_NAME)
    if current is not None and current is not _load_replica:
        raise RuntimeError(f"another package already registered rollout '{BACKEND_NAME}': {current!r}")
    adapter = base._ROLLOUT_REGISTRY.get((BACKEND_NAME, "async"))
    if adapter is not None and adapter != ADAPTER_FQN:
        raise RuntimeError(f"another package already registered rollout adapter '{BACKEND_NAME}': {adapter}")
    RolloutReplicaRegistry.register(BACKEND_NAME, _load_replica)

    def write_adapter():
        base._ROLLOUT_REGISTRY[(BACKEND_NAME, "async")] = ADAPTER_FQN

    patches.apply("rollout-registry-hf", write_adapter)
