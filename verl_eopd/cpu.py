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
    """Make verl's FSDP engines resolvable on device "cpu" (they are registered for cuda/npu only)."""
    import verl.workers.engine.fsdp.transformer_impl  # noqa: F401  (registers the engines)
    from verl.workers.engine.base import EngineRegistry

    for backends in EngineRegistry._engines.values():
        for backend in ("fsdp", "fsdp2"):
            reg = backends.get(backend)
            if reg is not None and "cpu" not in reg and "cuda" in reg:
                reg["cpu"] = reg["cuda"]


def _patch_offload_policy() -> None:
    """FSDP2's CPUOffloadPolicy(pin_memory=True) (verl's choice for forward-only engines such as the
    reference) pins memory, which needs an accelerator: make the policy never pin. Patched on torch's
    module so that verl's `from torch... import CPUOffloadPolicy` picks it up when imported later."""
    import torch.distributed.fsdp as fsdp

    policy = getattr(fsdp, "CPUOffloadPolicy", None)
    if policy is None or getattr(policy, "_eopd_cpu", False):
        return

    class CPUOffloadPolicyNoPin(policy):
        _eopd_cpu = True

        def __init__(self, pin_memory: bool = False, **kwargs):
            super().__init__(pin_memory=False, **kwargs)

    fsdp.CPUOffloadPolicy = CPUOffloadPolicyNoPin
    import sys

    impl = sys.modules.get("verl.workers.engine.fsdp.transformer_impl")
    if impl is not None and getattr(impl, "CPUOffloadPolicy", None) is policy:
        impl.CPUOffloadPolicy = CPUOffloadPolicyNoPin


def _patch_teacher_engine_check() -> None:
    """verl 0.9.1 accepts top-k teachers only on vllm/sglang (`_validate_topk_logprobs`); on CPU the teacher
    pool runs the `hf` backend (verl_eopd.hf_rollout), which returns verl's top-k layout with no engine cap."""
    from verl.workers.config.distillation import DistillationTeacherModelConfig as cls

    check = cls._validate_topk_logprobs
    if getattr(check, "_eopd_cpu", False):
        return

    def _validate_topk_logprobs(self, use_topk, topk):
        if use_topk and topk is not None and self.inference.name == "hf":
            return
        return check(self, use_topk=use_topk, topk=topk)

    _validate_topk_logprobs._eopd_cpu = True
    cls._validate_topk_logprobs = _validate_topk_logprobs


def install_light() -> None:
    """What every process needs to run verl on CPU, cheap enough for the `import verl` entry point:
    the platform class (found through VERL_PLATFORM=cpu), engine lookup under "cuda", and the gloo and
    offload patches. Does not import verl's engine modules."""
    _platform_class()
    os.environ.setdefault("VERL_ENGINE_DEVICE", "cuda")  # verl's FSDP engines are registered for cuda/npu
    _patch_gloo_backend_string()
    _patch_offload_policy()
    _patch_teacher_engine_check()


def install() -> None:
    """Select the CPU platform for verl in this process. Idempotent; call before verl's engine imports."""
    if _STATE["installed"]:
        return
    import verl  # noqa: F401
    from verl.plugin.platform import set_platform

    os.environ["VERL_PLATFORM"] = "cpu"  # inherited by Ray workers started from here
    # ...and imported by verl/__init__ in every worker, before any entry point, failing loudly
    modules = [m for m in os.environ.get("VERL_USE_EXTERNAL_MODULES", "").split(",") if m]
    if __name__ not in modules:
        os.environ["VERL_USE_EXTERNAL_MODULES"] = ",".join(modules + [__name__])
    install_light()
    set_platform(_platform_class()())
    _register_cpu_engines()
    _STATE["installed"] = True


def gpu_available() -> bool:
    import torch

    return torch.cuda.is_available() and torch.cuda.device_count() > 0


# verl config values for a one-process, one-node CPU run (each applied unless the user set that key)
CPU_SETTINGS = {
    "trainer.device": "cpu",
    "trainer.n_gpus_per_node": 1,
    "trainer.nnodes": 1,
    "actor_rollout_ref.rollout.name": "hf",  # verl_eopd.hf_rollout: vLLM/SGLang wheels are CUDA-only
    "actor_rollout_ref.rollout.dtype": "float32",
    "actor_rollout_ref.rollout.tensor_model_parallel_size": 1,
    "actor_rollout_ref.rollout.agent.num_workers": 1,
    "actor_rollout_ref.model.override_config.attn_implementation": "sdpa",  # flash-attn is CUDA-only
    "actor_rollout_ref.actor.strategy": "fsdp2",
    "actor_rollout_ref.actor.use_torch_compile": False,  # compiling costs ~20 s on CPU for no gain here
    "actor_rollout_ref.actor.fsdp_config.use_torch_compile": False,
    "actor_rollout_ref.actor.fsdp_config.strategy": "fsdp2",
    "actor_rollout_ref.ref.fsdp_config.use_torch_compile": False,
    "actor_rollout_ref.ref.fsdp_config.strategy": "fsdp2",
    # 4 MiB chunks fit this class of CPU's cache: fastest in the chunk sweep of docs/benchmarks.md
    "distillation.distillation_loss.logits_chunk_mb": 4,
    "reward.num_workers": 1,
    "data.dataloader_num_workers": 0,
    # Ray: logical resources (one logical GPU per pool; verl's pools always ask for one)
    "ray_kwargs.ray_init.num_cpus": 16,
    "ray_kwargs.ray_init.num_gpus": 1,
    # TransferQueue puts each storage unit in a 1-CPU placement group; 8 (verl's default) plus the
    # trainer's actors must fit in ray_init.num_cpus or Ray waits forever
    "transfer_queue.backend.SimpleStorage.num_data_storage_units": 1,
}


# the teacher-server route (distillation.enabled) on CPU: one hf teacher server on its own logical GPU
CPU_SERVER_SETTINGS = {
    "distillation.n_gpus_per_node": 1,
    "distillation.nnodes": 1,
    "distillation.teacher_models.teacher_model.inference.tensor_model_parallel_size": 1,
    "ray_kwargs.ray_init.num_gpus": 2,
}


def check_ray_resources(config) -> None:
    """Refuse configs whose Ray placement can never be satisfied (Ray would wait silently)."""
    from omegaconf import OmegaConf

    num_cpus = OmegaConf.select(config, "ray_kwargs.ray_init.num_cpus")
    units = OmegaConf.select(config, "transfer_queue.backend.SimpleStorage.num_data_storage_units") or 0
    # storage units (1 CPU each) + TaskRunner + controller + worker group + reward loop + agent loop
    need = int(units) + 4
    if num_cpus is not None and int(num_cpus) < need:
        raise ValueError(
            f"ray_kwargs.ray_init.num_cpus={num_cpus} cannot host transfer_queue.backend.SimpleStorage."
            f"num_data_storage_units={units} (1 CPU each) plus the trainer's actors (~4): Ray would wait forever. "
            f"Fix: ray_kwargs.ray_init.num_cpus>={need} (logical CPUs, they need not exist) or fewer storage units"
        )
    gpus_needed = int(config.trainer.n_gpus_per_node) * int(config.trainer.nnodes)
    if OmegaConf.select(config, "distillation.enabled"):  # verl's teacher pool takes its own (logical) GPUs
        gpus_needed += int(config.distillation.n_gpus_per_node) * int(config.distillation.nnodes)
    num_gpus = OmegaConf.select(config, "ray_kwargs.ray_init.num_gpus")
    if num_gpus is not None and int(num_gpus) < gpus_needed:
        raise ValueError(
            f"ray_kwargs.ray_init.num_gpus={num_gpus} is below the {gpus_needed} logical GPUs verl's resource pools "
            "need (trainer.n_gpus_per_node x trainer.nnodes, plus distillation.n_gpus_per_node x distillation.nnodes "
            f"when distillation.enabled): they would never be placed. Fix: ray_kwargs.ray_init.num_gpus={gpus_needed}"
        )


if os.environ.get("VERL_PLATFORM", "").lower() == "cpu":  # imported via VERL_USE_EXTERNAL_MODULES in workers
    install_light()
