"""`python -m verl_eopd.main algorithm=eopd|opd|eopd_grpo [hydra overrides]`: EOPD on verl's v1 trainer.

The config is verl's `ppo_trainer` plus the EOPD presets (verl_eopd/conf/). Before Ray starts:
  * no model given (actor_rollout_ref.model.path and the teacher path both unset): the embedded tiny
    default shipped with the package is used (verl_eopd.cpu.embedded, EOPD_PAIR_DIR for a rebuilt pair; EOPD_EMBEDDED_TASK=multiple picks the second task);
  * no GPU on this machine nor in the Ray cluster it joins (or trainer.device=cpu): CPU settings
    (verl_eopd.cpu.platform.CPU_SETTINGS: the HF rollout backend, gloo, sdpa, logical Ray resources) and the
    CPU platform;
  * a GPU run on the user's models (`_user_model_settings`, integration/config.py): rollout backend vllm, else
    sglang, else refused with the install command; dynamic batch sizes when no micro-batch is set; the run named
    from models and data (trainer.experiment_name=auto); tensorboard beside the presets' loggers when installed;
  * every value a user wrote on the command line wins over all of these;
  * the whole config is checked (config.check_run_config) so a bad key fails before any model loads.
Then verl's own `run_ppo` runs with verl's own TaskRunner, started with EOPD_TASK_RUNNER=1 so that the
plugin's set-up registers the EOPD trainer in that process (integration/trainer.py), and every process
imports the plugin through VERL_USE_EXTERNAL_MODULES (failures raise instead of being swallowed).
"""

from __future__ import annotations

import functools
import logging
import os
import time
from typing import Iterable, NamedTuple, Optional

import hydra
from omegaconf import OmegaConf, open_dict

from .integration.console import ENV as CONSOLE_ENV
from .integration.env import TASK_RUNNER_ENV, TOKEN_COLUMN_ENV, external_modules_with_plugin

logger = logging.getLogger("verl_eopd")


@functools.lru_cache(maxsize=None)
def _config_groups() -> frozenset:
    """The config groups of verl_eopd/conf (`algorithm=eopd` picks a preset: it sets no value of the node)."""
    from pathlib import Path

    conf = Path(__file__).parent / "conf"
    return frozenset(d.name for d in conf.iterdir() if d.is_dir() and not d.name.startswith("_"))


def _user_set(key: str, user_keys: set) -> bool:
    """True when the user set `key` or a node above it (`a.b={c: 1}` sets `a.b.c` too); a config-group choice
    (`algorithm=eopd`) is not a value of the node it shares its name with."""
    parts = key.split(".")
    above = {".".join(parts[:i]) for i in range(1, len(parts))} - _config_groups()
    return key in user_keys or bool(above & user_keys)


def apply_settings(config, settings: dict, user_keys: Iterable[str]) -> list[str]:
    """Set each key of `settings` the user did not override (neither the key nor a node above it); returns the
    keys set."""
    user_keys = set(user_keys)
    applied = []
    with open_dict(config):
        for key, value in settings.items():
            if not _user_set(key, user_keys):
                OmegaConf.update(config, key, value, force_add=True)
                applied.append(key)
    return applied


def _cli_keys() -> list[str]:
    """Config keys the user set on the command line (`a.b=c`, `+a.b=c`, `++a.b=c`)."""
    from hydra.core.hydra_config import HydraConfig

    keys = []
    for item in HydraConfig.get().overrides.task:
        key = item.split("=", 1)[0].lstrip("+~")
        keys.append(key)
    return keys


def _algorithm_name(config) -> str:
    """The chosen `algorithm=` option (outside hydra, e.g. in tests, inferred from the loss config)."""
    from hydra.core.hydra_config import HydraConfig

    if HydraConfig.initialized():
        return HydraConfig.get().runtime.choices.get("algorithm", "eopd")
    loss = config.distillation.distillation_loss
    if loss.use_task_rewards:
        return "eopd_grpo"
    if loss.fkl_coef == 0:
        return "opd"
    return "eopd_server" if loss.get("teacher_route") == "server" else "eopd"


# Run-level values of the algorithm presets that are for real models (conf/algorithm/eopd.yaml); the embedded tiny
# default keeps verl's, as it always had (it counts trainer.total_training_steps, which ends the run only if
# verl's 30 epochs hold that many batches; it saves once, at its last step)
EMBEDDED_KEEPS = {"trainer.total_epochs": 30, "trainer.max_actor_ckpt_to_keep": None}
THINKING_KEY = "data.apply_chat_template_kwargs.enable_thinking"


def _user_model_settings(config, user_keys: list, on_cpu: bool) -> None:
    """A run on the user's models: local paths absolute, micro-batches (dynamic on GPUs) when none is set, the run
    named from models and data (trainer.experiment_name=auto), tensorboard beside the presets' loggers when it is
    installed. Every key the user set wins."""
    import importlib.util

    from .integration.config import absolute_local_paths, micro_batch_defaults

    with open_dict(config):  # the same paths, absolute: the user's values still
        for key, value in absolute_local_paths(config).items():
            OmegaConf.update(config, key, value, force_add=True)
    apply_settings(config, micro_batch_defaults(config, user_keys, gpu=not on_cpu), user_keys)
    if "trainer.logger" not in user_keys and importlib.util.find_spec("tensorboard") is not None:
        loggers = OmegaConf.select(config, "trainer.logger") or []
        loggers = [loggers] if isinstance(loggers, str) else list(loggers)
        if "tensorboard" not in loggers:
            apply_settings(config, {"trainer.logger": loggers + ["tensorboard"]}, user_keys)


class Prepared(NamedTuple):
    loss: object  # the validated EOPDLossConfig
    env: dict  # environment variables the run's processes need
    on_cpu: bool
    embedded: Optional[dict]  # the embedded default's paths when no model was given


def dry_run(config) -> bool:
    """trainer.dry_run=true: check and print the plan (verl_eopd/dry_run.py), start nothing."""
    return bool(OmegaConf.select(config, "trainer.dry_run", default=False))


def prepare(config, user_keys: Optional[Iterable[str]] = None, algorithm: Optional[str] = None,
            notes: Optional[list] = None) -> Prepared:
    """Everything before the run that only reads and edits `config` (no process state is touched):
    the embedded default and the CPU settings for keys the user did not set, every check (errors name the
    key and the fix), and the environment the run's processes need, also written into Ray's runtime_env.

    Relative checkpoint and metric paths are made absolute (Ray workers need not share this directory).
    A dry run (trainer.dry_run=true) plans the user's models for GPU nodes whatever this machine has (unless
    trainer.device=cpu): what only the GPU nodes must have (vllm, flash-attn) is appended to `notes`.
    """
    from .cpu import platform as cpu
    from .integration.config import check_run_config

    user_keys = list(user_keys or [])
    algorithm = algorithm or _algorithm_name(config)
    student = OmegaConf.select(config, "actor_rollout_ref.model.path")
    teacher = OmegaConf.select(config, "distillation.teacher_models.teacher_model.model_path")
    info = None
    if not student and not teacher:
        from .cpu.embedded import embedded_pair, embedded_settings, selected_task

        info = embedded_pair(task=selected_task())
        # the embedded default runs on one rank unless the user asks for more (batch sizes follow the ranks)
        per_node, nodes = (int(config.trainer[key]) if f"trainer.{key}" in user_keys else 1
                           for key in ("n_gpus_per_node", "nnodes"))
        apply_settings(config, embedded_settings(info, algorithm, ranks=per_node * nodes, per_node=per_node),
                       user_keys)
        # micro-batches that cut the composed batch sizes over the ranks (the user's, or the defaults' 512 responses)
        from .integration.config import fitted_micro_batches

        apply_settings(config, fitted_micro_batches(config), user_keys)
        apply_settings(config, EMBEDDED_KEEPS, user_keys)
        if THINKING_KEY not in user_keys:  # its chat template has no thinking switch
            with open_dict(config):
                config.data.apply_chat_template_kwargs.pop("enable_thinking", None)
        print(f"[verl_eopd] no model given: embedded tiny default ({info['root']}), algorithm={algorithm}", flush=True)
    planned = dry_run(config)
    notes = [] if notes is None else notes
    if planned:  # no cluster is asked: the command's shape is the plan
        device_cpu = config.trainer.get("device", "cuda") == "cpu"
        on_cpu = device_cpu or (info is not None and not cpu.gpu_available())
    else:
        on_cpu = cpu.run_on_cpu(config)
    if on_cpu:
        apply_settings(config, cpu.CPU_SETTINGS, user_keys)
        if config.distillation.get("enabled", False):
            apply_settings(config, cpu.CPU_SERVER_SETTINGS, user_keys)
        # Ray's logical GPUs follow the ranks (CPU workers ask for none that exist); verl's reward actors only when
        # something calls them
        apply_settings(config, {"ray_kwargs.ray_init.num_gpus": cpu.logical_gpus(config),
                                "reward.num_workers": cpu.reward_loop_workers(config)}, user_keys)
        cpu.check_ray_resources(config)
    else:
        from .integration.config import check_gpu_backends, gpu_rollout_settings
        from .integration.gpu import NO_FLASH_ATTN_SETTINGS, flash_attn_available

        install = "pip install 'verl[flash-attn-cu130torch211]==0.9.1'"
        if not flash_attn_available() and planned:
            notes.append(f"flash-attn is not importable here: the GPU nodes need it for verl's attention ({install});"
                         " a launch without it runs sdpa on padded micro-batches")
        elif not flash_attn_available() and apply_settings(config, NO_FLASH_ATTN_SETTINGS, user_keys):
            print(f"[verl_eopd] flash-attn is not installed: attention sdpa on padded micro-batches "
                  f"({install} for verl's default)", flush=True)
        # the rollout backend: vllm, else sglang, else refused with the install command (never CPU settings)
        apply_settings(config, gpu_rollout_settings(config, planned=planned), user_keys)
        if info is not None and OmegaConf.select(config, "actor_rollout_ref.rollout.name") == "hf":
            # the embedded default without vLLM: its hf rollout generates on the worker's CPU in the rollout dtype,
            # so the trainer recomputes the old log-probs on the GPU (no bypass mode)
            apply_settings(config, {"algorithm.rollout_correction.bypass_mode": False}, user_keys)
        note = check_gpu_backends(config, planned=planned)
        if note and planned:
            notes.append(note)
        elif note:
            print(f"[verl_eopd] {note}", flush=True)
        from .dry_run import node_gpus, place_pools, pools

        per_node = node_gpus(config, assume=False)[0]
        if not planned and per_node:  # each pool's per-node group must fit one node of this machine's kind
            spec = pools(config)
            place_pools(spec, sum(count for _, _, count in spec.values()), per_node)
    if info is None:
        _user_model_settings(config, user_keys, on_cpu)
    if str(OmegaConf.select(config, "trainer.experiment_name")) == "auto":
        from .integration.config import run_name

        with open_dict(config):
            config.trainer.experiment_name = run_name(config, algorithm)
    loss = check_run_config(config)
    from .dry_run import check_parallelism

    check_parallelism(config)  # verl asserts these in its workers, after Ray has started
    from verl.trainer.ppo.utils import need_critic, need_reference_policy
    from verl.utils.config import validate_config

    validate_config(  # verl's own checks of batch sizes and roles
        config=config,
        use_reference_policy=loss.teacher_route == "ref" or need_reference_policy(config),
        use_critic=need_critic(config),
    )
    env = {
        # every process imports the plugin through verl's VERL_USE_EXTERNAL_MODULES (errors raise, not DEBUG)
        "VERL_USE_EXTERNAL_MODULES": external_modules_with_plugin(),
        # the server route's exact sampled-token column (integration/server_route.py)
        TOKEN_COLUMN_ENV: "1" if loss.teacher_route == "server" and loss.server_token_logprob == "exact" else "0",
    }
    from .integration.server_eos import ENV as SERVER_EOS_ENV, server_eos_pair

    pair = server_eos_pair(config, loss)
    if pair is not None:  # the server route sends the teacher its own end token (integration/server_eos.py)
        env[SERVER_EOS_ENV] = f"{pair[0]},{pair[1]}"
    from .integration.console import console_mode

    env[CONSOLE_ENV] = console_mode(config)
    if env[CONSOLE_ENV] == "compact":  # verl warns in every process that engines it does not use are missing
        quiet = "ignore::UserWarning:verl.workers.engine"
        env["PYTHONWARNINGS"] = ",".join(w for w in (os.environ.get("PYTHONWARNINGS"), quiet) if w)
        # TransferQueue's INFO statistics, verl's INFO lines off; the progress bar every 5 min (the user's win)
        quiet_defaults = {"TQ_LOGGING_LEVEL": "WARNING", "VERL_LOGGING_LEVEL": "WARNING", "TQDM_MININTERVAL": "300"}
        env.update({name: os.environ.get(name, value) for name, value in quiet_defaults.items()})
    # TransferQueue asks torch for 8 threads per put/get and warns on every call (thousands of console lines)
    # when the machine has fewer physical cores; its own variable, capped at the cores, keeps it quiet
    import psutil

    cores = psutil.cpu_count(logical=False) or 1
    env["TQ_NUM_THREADS"] = os.environ.get("TQ_NUM_THREADS") or str(max(1, min(8, cores)))
    if on_cpu:
        env.update(VERL_PLATFORM="cpu", TOKENIZERS_PARALLELISM=os.environ.get("TOKENIZERS_PARALLELISM", "false"))
    from .report import metrics_path

    metrics = metrics_path(config)  # yours (VERL_FILE_LOGGER_PATH, made absolute) or ours; Ray's processes get it
    if metrics:
        env["VERL_FILE_LOGGER_PATH"] = metrics
    from .integration.config import check_resume

    with open_dict(config):
        config.trainer.default_local_dir = os.path.abspath(str(config.trainer.default_local_dir))
        check_resume(config)  # after the checkpoint folder is absolute
        for name, value in env.items():  # Ray processes of any cluster get them through runtime_env
            OmegaConf.update(config, f"ray_kwargs.ray_init.runtime_env.env_vars.{name}", value, force_add=True)
    return Prepared(loss, env, on_cpu, info)


def run(config, user_keys: Optional[Iterable[str]] = None, algorithm: Optional[str] = None) -> None:
    """`prepare`, then set this process up (environment, CPU platform), run verl's `run_ppo`, and print the
    summary of the run (verl_eopd/report.py)."""
    start = time.time()
    if dry_run(config):  # every check, then the plan; nothing started, this process untouched
        from .dry_run import format_plan, plan

        notes: list = []
        prepared = prepare(config, user_keys, algorithm, notes=notes)
        print(format_plan(plan(config, prepared, notes), algorithm or _algorithm_name(config)), flush=True)
        return
    _, env, on_cpu, embedded = prepare(config, user_keys, algorithm)
    from .report import header

    print(header(config, algorithm or _algorithm_name(config), on_cpu), flush=True)
    os.environ.update(env)
    if env.get("VERL_FILE_LOGGER_PATH"):  # verl's file logger opens the file but makes no folder
        os.makedirs(os.path.dirname(env["VERL_FILE_LOGGER_PATH"]), exist_ok=True)
    if on_cpu:
        from .cpu import platform as cpu

        cpu.install()  # before verl's engine/worker modules are imported (here and, via env, in Ray workers)

    from verl.trainer.main_ppo import TaskRunnerV1, run_ppo
    from verl.utils.device import auto_set_device

    auto_set_device(config)  # resolves verl's device platform: after the CPU platform is installed
    if env.get(CONSOLE_ENV) == "compact":
        # verl's TaskRunner class is pickled by value with the module's globals as they are here, so the
        # config-dump patch is applied in this process, before run_ppo exports the class
        from .integration.console import quiet_config_dump
        from .integration.patches import apply

        apply("console-config-dump", quiet_config_dump)
    # verl's own TaskRunner; EOPD_TASK_RUNNER=1 in that actor alone makes the plugin register the EOPD trainer
    run_ppo(config, task_runner_class=TaskRunnerV1.options(runtime_env={"env_vars": {TASK_RUNNER_ENV: "1"}}))
    from .report import embedded_teacher_accuracy, summarize

    teacher = embedded_teacher_accuracy(embedded) if embedded else None
    print(summarize(config, time.time() - start, teacher), flush=True)


@hydra.main(config_path="conf", config_name="eopd_trainer", version_base=None)
def main(config) -> None:
    run(config, user_keys=_cli_keys(), algorithm=_algorithm_name(config))


if __name__ == "__main__":
    main()
