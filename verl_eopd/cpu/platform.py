"""A CPU platform for verl 0.9.1, so its FSDP engine runs on machines without a GPU (laptops, CI).

verl 0.9.1 has no CPU platform: with no accelerator it silently falls back to "cuda" and fails deep
inside torch. Through verl's doors: `install()` registers (`PlatformRegistry.register`) and selects
(`set_platform`) a platform whose device is `torch.device("cpu")` with the gloo backend and whose device
module is a proxy of `torch.cpu` with no-op cuda-style memory calls; verl's FSDP engines are looked up
under "cuda" (`VERL_ENGINE_DEVICE`); the EOPD worker opens the gloo process group itself with verl's
`initialize_global_process_group_ray(backend="gloo")` (verl's default would be "cpu:gloo,cpu:gloo").
Two runtime patches remain, declared in integration/patches.py: FSDP's CPU offload never pins memory, and
verl accepts the `hf` backend for top-k teachers. Call `install()` after `import verl` and before
importing verl's engine or worker modules (they read the platform at import time); Ray workers get the
same through the environment (VERL_PLATFORM=cpu, read by the plugin's set-up).

The engine then runs with strategy fsdp2, attn_implementation sdpa (flash-attn is CUDA only), gloo.
This is a platform for correctness and small runs, not for speed.
"""

from __future__ import annotations

import contextlib
import os
import types

import torch

from ..integration import patches
from ..integration.env import external_modules_with_plugin
_STATE = {"installed": False}


class _CPUDeviceModule:
    """`torch.cpu`, plus the cuda-style calls verl makes on `get_torch_device()` (no-ops on CPU)."""

    memory = types.SimpleNamespace(_set_allocator_settings=lambda s: None)

    def __getattr__(self, name):
        return getattr(torch.cpu, name)

    def empty_cache(self):
        pass

    def ipc_collect(self):
        pass

    def memory_allocated(self, *a, **k):
        return 0

    def memory_reserved(self, *a, **k):
        return 0

    def max_memory_allocated(self, *a, **k):
        return 0

    def max_memory_reserved(self, *a, **k):
        return 0

    def reset_peak_memory_stats(self, *a, **k):
        pass

    def mem_get_info(self, *a, **k):
        return (0, 0)

    def get_rng_state(self, *a, **k):
        return torch.get_rng_state()

    def set_rng_state(self, state, *a, **k):
        torch.set_rng_state(state)

    def manual_seed(self, seed):
        torch.manual_seed(seed)

    def manual_seed_all(self, seed):
        torch.manual_seed(seed)

    def set_per_process_memory_fraction(self, *a, **k):
        pass

    def get_device_name(self, *a, **k):
        return "CPU"


def _platform_class():
    if "cls" in _STATE:
        return _STATE["cls"]
    from verl.plugin.platform import PlatformBase, PlatformRegistry

    class PlatformCPU(PlatformBase):
        """verl platform for CPU-only machines (gloo, one process per node)."""

        _module = _CPUDeviceModule()

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


def _cpu_offload_no_pin() -> None:
    """FSDP2's CPUOffloadPolicy(pin_memory=True) (verl's choice for forward-only engines such as the
    reference) pins memory, which needs an accelerator: make the policy never pin. Patched on torch's
    module so that verl's `from torch... import CPUOffloadPolicy` picks it up when imported later."""
    import sys

    import torch.distributed.fsdp as fsdp

    policy = getattr(fsdp, "CPUOffloadPolicy", None)
    if policy is None:
        return

    class CPUOffloadPolicyNoPin(policy):
        def __init__(self, pin_memory: bool = False, **kwargs):
            super().__init__(pin_memory=False, **kwargs)

    fsdp.CPUOffloadPolicy = CPUOffloadPolicyNoPin
    impl = sys.modules.get("verl.workers.engine.fsdp.transformer_impl")
    if impl is not None and getattr(impl, "CPUOffloadPolicy", None) is policy:
        impl.CPUOffloadPolicy = CPUOffloadPolicyNoPin


def _teacher_topk_accepts_hf() -> None:
    """verl 0.9.1 accepts top-k teachers only on vllm/sglang (`_validate_topk_logprobs`); on CPU the teacher
    pool runs the `hf` backend (cpu/hf_rollout.py), which returns verl's top-k layout with no engine cap."""
    from verl.workers.config.distillation import DistillationTeacherModelConfig as cls

    check = cls._validate_topk_logprobs

    def _validate_topk_logprobs(self, use_topk, topk):
        if use_topk and topk is not None and self.inference.name == "hf":
            return
        return check(self, use_topk=use_topk, topk=topk)

    cls._validate_topk_logprobs = _validate_topk_logprobs


def install_light() -> None:
    """What every process needs to run verl on CPU, cheap enough for the plugin's set-up at `import verl`:
    the platform class (found through VERL_PLATFORM=cpu), engine lookup under "cuda" and the two CPU
    patches. Does not import verl's engine modules."""
    _platform_class()
    os.environ.setdefault("VERL_ENGINE_DEVICE", "cuda")  # verl's FSDP engines are registered for cuda/npu
    patches.apply("cpu-offload-no-pin", _cpu_offload_no_pin)
    patches.apply("teacher-topk-hf", _teacher_topk_accepts_hf)


def install() -> None:
    """Select the CPU platform for verl in this process and, through the environment, in the Ray workers it
    starts. Idempotent; call before verl's engine imports."""
    if _STATE["installed"]:
        return
    import verl  # noqa: F401
    from verl.plugin.platform import set_platform

    os.environ["VERL_PLATFORM"] = "cpu"  # inherited by Ray workers started from here
    # verl/__init__ imports these in every worker before any entry point, failing loudly on an error
    os.environ["VERL_USE_EXTERNAL_MODULES"] = external_modules_with_plugin()
    install_light()
    set_platform(_platform_class()())
    _STATE["installed"] = True


def gpu_available() -> bool:
    import torch

    return torch.cuda.is_available() and torch.cuda.device_count() > 0


def cluster_gpus(address: str, timeout: float = 120.0) -> float:
    """GPUs of the running Ray cluster at `address`, asked from a subprocess (the driver's own `ray.init` stays
    verl's, with the run's runtime_env)."""
    import subprocess
    import sys

    code = ("import json, ray; ray.init(address=%r, logging_level='ERROR', log_to_driver=False); "
            "print(json.dumps(ray.cluster_resources().get('GPU', 0)))" % address)
    try:
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        out = None
    if out is None or out.returncode != 0:
        why = "no answer in %.0f s" % timeout if out is None else (out.stderr.strip().splitlines() or ["?"])[-1]
        raise RuntimeError(f"RAY_ADDRESS={address}: could not reach the Ray cluster to count its GPUs ({why}). "
                           "Fix: start the cluster first (ray start --head on the head node), or unset RAY_ADDRESS; "
                           "trainer.device=cpu runs on CPU without asking")
    return float(out.stdout.strip().splitlines()[-1])


def run_on_cpu(config) -> bool:
    """CPU settings only when asked (`trainer.device=cpu`) or when no GPU exists anywhere the run can see: this
    machine, or the Ray cluster it joins (`ray_kwargs.ray_init.address` or RAY_ADDRESS). A driver without a
    GPU (a CPU-only head node, a login node, CUDA_VISIBLE_DEVICES="") that joins a GPU cluster runs on GPUs."""
    import os

    from omegaconf import OmegaConf

    if config.trainer.get("device", "cuda") == "cpu":
        return True
    if gpu_available():
        return False
    address = OmegaConf.select(config, "ray_kwargs.ray_init.address") or os.environ.get("RAY_ADDRESS")
    if address and address != "local":
        return cluster_gpus(address) == 0
    return True


# verl config values for a one-process, one-node CPU run (each applied unless the user set that key)
CPU_SETTINGS = {
    "trainer.device": "cpu",
    "trainer.n_gpus_per_node": 1,
    "trainer.nnodes": 1,
    "actor_rollout_ref.rollout.name": "hf",  # cpu/hf_rollout.py: vLLM/SGLang wheels are CUDA-only
    "actor_rollout_ref.rollout.dtype": "float32",
    "actor_rollout_ref.rollout.tensor_model_parallel_size": 1,
    # two agent-loop workers: their per-response Python work overlaps the generation server's (2 cores,
    # 512 responses: 8.8 -> 6.0 s of `gen` per step, 15.7 -> 12.5 s per step)
    "actor_rollout_ref.rollout.agent.num_workers": 2,
    # verl's agent-loop manager with less per-response cross-process work (cpu/agent_loop.py)
    "actor_rollout_ref.rollout.agent.agent_loop_manager_class": "verl_eopd.cpu.agent_loop.CPUAgentLoopManager",
    "actor_rollout_ref.model.override_config.attn_implementation": "sdpa",  # flash-attn is CUDA-only
    # padded micro-batches: sdpa on a packed (padding-removed) micro-batch builds an [nnz, nnz] mask over all
    # its tokens (quadratic in the micro-batch); padded, attention is [B, L, L]
    "actor_rollout_ref.model.use_remove_padding": False,
    "actor_rollout_ref.actor.strategy": "fsdp2",
    "actor_rollout_ref.actor.use_torch_compile": False,  # compiling costs ~20 s on CPU for no gain here
    "actor_rollout_ref.actor.fsdp_config.use_torch_compile": False,
    "actor_rollout_ref.actor.fsdp_config.strategy": "fsdp2",
    "actor_rollout_ref.ref.fsdp_config.use_torch_compile": False,
    "actor_rollout_ref.ref.fsdp_config.strategy": "fsdp2",
    # fp32 compute in the actor and the teacher/ref engine (verl's FSDP default is bf16 param_dtype under autocast):
    # CPUs without bf16 matrix units (no AVX512_BF16/AMX, e.g. the 2-core CI hosts) run bf16 matmuls 4-5x slower
    # than fp32 (the student's forward+backward on a 256 x 48 micro-batch: ~1.1 s bf16, ~0.23 s fp32); the default
    # run's update 8.0 -> 3.0 s, teacher pass 1.7 -> 0.7 s per step (docs/cpu.md). The actor then computes in the
    # dtype of the fp32 `hf` rollout whose log-probs serve as old log-probs (bypass mode)
    "actor_rollout_ref.actor.fsdp_config.mixed_precision.param_dtype": "fp32",
    "actor_rollout_ref.ref.fsdp_config.mixed_precision.param_dtype": "fp32",
    "distillation.distillation_loss.teacher_param_dtype": "fp32",  # the teacher's stored weights unrounded too
    # 4 MiB chunks fit this class of CPU's cache: fastest in the chunk sweep of docs/benchmarks.md
    "distillation.distillation_loss.logits_chunk_mb": 4,
    "data.dataloader_num_workers": 0,
    # Ray: logical resources (ray_init.num_gpus follows the ranks: `logical_gpus`)
    "ray_kwargs.ray_init.num_cpus": 16,
    # no Ray dashboard: its processes cost about 5 CPU-seconds of every launch's start-up (docs/cpu.md), and a
    # laptop run has no one watching it (`++ray_kwargs.ray_init.include_dashboard=true` brings it back)
    "ray_kwargs.ray_init.include_dashboard": False,
    # TransferQueue puts each storage unit in a 1-CPU placement group; 8 (verl's default) plus the
    # trainer's actors must fit in ray_init.num_cpus or Ray waits forever
    "transfer_queue.backend.SimpleStorage.num_data_storage_units": 1,
}


# the teacher-server route (distillation.enabled) on CPU: one hf teacher server on its own logical GPU
CPU_SERVER_SETTINGS = {
    "distillation.n_gpus_per_node": 1,
    "distillation.nnodes": 1,
    "distillation.teacher_models.teacher_model.inference.tensor_model_parallel_size": 1,
}


AGENT_LOOP_MANAGER = CPU_SETTINGS["actor_rollout_ref.rollout.agent.agent_loop_manager_class"]


def reward_loop_workers(config) -> int:
    """How many of verl's RewardLoopWorker actors a CPU run starts (`reward.num_workers`): none when no reward model
    is on, the reward manager scores in the calling process (not verl's `remote` one, whose pool is sized by this
    key) and our agent-loop manager runs the rollouts: its workers score each response in their own process
    (cpu/agent_loop.py), so verl's actors would only cost a process start (about 4.5 CPU-seconds of every
    launch, docs/cpu.md). One otherwise: a reward model's `compute_rm_score` splits the batch over them, and verl's
    own agent-loop workers pick one for every response."""
    from omegaconf import OmegaConf

    reward_model = OmegaConf.select(config, "reward.reward_model.enable", default=False)
    remote = OmegaConf.select(config, "reward.reward_manager.name", default="naive") == "remote"
    ours = OmegaConf.select(config, "actor_rollout_ref.rollout.agent.agent_loop_manager_class") == AGENT_LOOP_MANAGER
    return 0 if ours and not reward_model and not remote else 1


def logical_gpus(config) -> int:
    """The logical GPUs verl's resource pools ask Ray for: trainer.n_gpus_per_node x trainer.nnodes, plus
    distillation.n_gpus_per_node x distillation.nnodes when verl's teacher pool is on (distillation.enabled)."""
    from omegaconf import OmegaConf

    need = int(config.trainer.n_gpus_per_node) * int(config.trainer.nnodes)
    if OmegaConf.select(config, "distillation.enabled"):
        need += int(config.distillation.n_gpus_per_node) * int(config.distillation.nnodes)
    return need


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
            f"Fix: ray_kwargs.ray_init.num_cpus={need} (logical CPUs, they need not exist), or fewer storage units"
        )
    gpus_needed = logical_gpus(config)
    num_gpus = OmegaConf.select(config, "ray_kwargs.ray_init.num_gpus")
    if num_gpus is not None and int(num_gpus) < gpus_needed:
        raise ValueError(
            f"ray_kwargs.ray_init.num_gpus={num_gpus} is below the {gpus_needed} logical GPUs verl's resource pools "
            "need (trainer.n_gpus_per_node x trainer.nnodes, plus distillation.n_gpus_per_node x distillation.nnodes "
            f"when distillation.enabled): they would never be placed. Fix: ++ray_kwargs.ray_init.num_gpus={gpus_needed} "
            "(or drop it: on CPU it follows the ranks)"
        )

