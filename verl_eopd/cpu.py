"""A CPU platform for verl 0.9.1, so its FSDP engine runs on machines without a GPU (laptops, CI).

verl 0.9.1 has no CPU platform: with no accelerator it silently falls back to "cuda" and fails deep
inside torch. `install()` registers and selects a platform whose device is `torch.device("cpu")` with
the gloo backend, registers verl's FSDP engines for device "cpu", and fixes the one backend string
verl builds that gloo rejects ("cpu:gloo,cpu:gloo"). Call it after `import verl` and before importing
verl's engine or worker modules (they read the platform at import time).

The engine then runs with strategy fsdp2, attn_implementation sdpa (flash-attn is CUDA only), one
process per machine, gloo. This is a platform for correctness and small runs, not for speed.
"""

from __future__ import annotations

import contextlib
import os
import types

import torch

_STATE = {"installed": False}


def _device_module() -> types.ModuleType:
    """torch.cpu with the cuda-style calls verl makes on `get_torch_device()` (no-ops on CPU)."""
    m = torch.cpu
    extra = dict(
        empty_cache=lambda: None, ipc_collect=lambda: None,
        memory_allocated=lambda *a, **k: 0, memory_reserved=lambda *a, **k: 0,
        max_memory_allocated=lambda *a, **k: 0, max_memory_reserved=lambda *a, **k: 0,
        reset_peak_memory_stats=lambda *a, **k: None, mem_get_info=lambda *a, **k: (0, 0),
        get_rng_state=lambda *a, **k: torch.get_rng_state(), set_rng_state=lambda s, *a, **k: torch.set_rng_state(s),
        manual_seed=lambda s: torch.manual_seed(s), manual_seed_all=lambda s: torch.manual_seed(s),
        set_per_process_memory_fraction=lambda *a, **k: None, get_device_name=lambda *a, **k: "CPU",
        memory=types.SimpleNamespace(_set_allocator_settings=lambda s: None),
    )
    for k, v in extra.items():
        if not hasattr(m, k):
            setattr(m, k, v)
    return m


def _platform_class():
    if "cls" in _STATE:
        return _STATE["cls"]
    from verl.plugin.platform import PlatformBase, PlatformRegistry

    class PlatformCPU(PlatformBase):
        """verl platform for CPU-only machines (gloo, one process per node)."""

        _module = _device_module()

        @property
        def device_name(self) -> str:
            return "cpu"

        @property
        def vendor_name(self) -> str:
            return "cpu"

        @property
        def device_module(self):
            return self._module

        def is_available(self) -> bool:
            return True

        def is_platform_available(self, use_smi_check=False) -> bool:
            return True

        def current_device(self):  # used as FSDP device_id and in tensor.to(get_device_id())
            return torch.device("cpu")

        def device_count(self) -> int:
            return 1

        def set_device(self, device_index) -> None:
            pass

        def synchronize(self, device_index=None) -> None:
            pass

        def manual_seed(self, seed: int) -> None:
            torch.manual_seed(seed)

        def manual_seed_all(self, seed: int) -> None:
            torch.manual_seed(seed)

        def set_allocator_settings(self, settings: str) -> None:
            pass

        def empty_cache(self) -> None:
            pass

        def get_device_capability(self, device_index: int = 0):
            return None, None

        def communication_backend_name(self) -> str:
            return "gloo"

        def visible_devices_envvar(self) -> str:
            return "CUDA_VISIBLE_DEVICES"

        @contextlib.contextmanager
        def nvtx_range(self, msg: str):
            yield

        def profiler_start(self) -> None:
            pass

        def profiler_stop(self) -> None:
            pass

        def ray_resource_name(self) -> str:
            return "CPU"

        def ray_noset_envvars(self) -> list[str]:
            return []

        def ray_resource_options(self, num_gpus: float) -> dict:
            return {"num_cpus": num_gpus}

        def is_ipc_supported(self) -> bool:
            return False

        def cudart(self):
            return None

    PlatformRegistry.register(platform="cpu")(PlatformCPU)  # lets VERL_PLATFORM=cpu resolve in other processes
    _STATE["cls"] = PlatformCPU
    return PlatformCPU


def _patch_gloo_backend_string() -> None:
    """verl builds backend f"cpu:gloo,{device}:{backend}", i.e. "cpu:gloo,cpu:gloo" on CPU: use "gloo"."""
    import torch.distributed as dist

    if getattr(dist.init_process_group, "_eopd_cpu", False):
        return
    original = dist.init_process_group

    def init_process_group(*args, **kwargs):
        backend = kwargs.get("backend")
        if isinstance(backend, str) and backend.replace(" ", "") == "cpu:gloo,cpu:gloo":
            kwargs["backend"] = "gloo"
        return original(*args, **kwargs)

    init_process_group._eopd_cpu = True
    dist.init_process_group = init_process_group


def _register_cpu_engines() -> None:
    """Make verl's FSDP engines resolvable on device "cpu" (they are registered for cuda/npu only), and
    stop FSDP2's CPU offload policy (used by forward-only engines such as the reference) from pinning
    memory, which needs an accelerator."""
    import verl.workers.engine.fsdp.transformer_impl as impl
    from verl.workers.engine.base import EngineRegistry

    policy = impl.CPUOffloadPolicy
    if policy is not None and not getattr(policy, "_eopd_cpu", False):

        def cpu_offload_policy(*args, pin_memory: bool = False, **kwargs):
            return policy(*args, pin_memory=False, **kwargs)

        cpu_offload_policy._eopd_cpu = True
        impl.CPUOffloadPolicy = cpu_offload_policy

    for backends in EngineRegistry._engines.values():
        for backend in ("fsdp", "fsdp2"):
            reg = backends.get(backend)
            if reg is not None and "cpu" not in reg and "cuda" in reg:
                reg["cpu"] = reg["cuda"]


def install() -> None:
    """Select the CPU platform for verl in this process. Idempotent; call before verl's engine imports."""
    if _STATE["installed"]:
        return
    import verl  # noqa: F401
    from verl.plugin.platform import set_platform

    set_platform(_platform_class()())
    os.environ.setdefault("VERL_PLATFORM", "cpu")
    _patch_gloo_backend_string()
    _register_cpu_engines()
    _STATE["installed"] = True
