"""`python -m verl_eopd.main algorithm=eopd|opd|eopd_grpo [hydra overrides]`: EOPD on verl's v1 trainer.

The config is verl's `ppo_trainer` plus the EOPD presets (verl_eopd/conf/). Before Ray starts:
  * no model given (actor_rollout_ref.model.path and the teacher path both unset): the embedded tiny
    default is built once and used (verl_eopd.embedded);
  * no GPU (or trainer.device=cpu): CPU settings (verl_eopd.cpu.CPU_SETTINGS: the HF rollout backend,
    gloo, sdpa, logical Ray resources) and the CPU platform;
  * every value a user wrote on the command line wins over both;
  * the whole config is checked (config.check_run_config) so a bad key fails before any model loads.
Then verl's own `run_ppo` runs with a TaskRunner from verl_eopd.trainer.
"""

from __future__ import annotations

import logging
import os
from typing import Iterable, Optional

import hydra
from omegaconf import OmegaConf, open_dict

logger = logging.getLogger("verl_eopd")


def apply_settings(config, settings: dict, user_keys: Iterable[str]) -> list[str]:
    """Set each key of `settings` the user did not override; returns the keys set."""
    user_keys = set(user_keys)
    applied = []
    with open_dict(config):
        for key, value in settings.items():
            if key not in user_keys:
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
    return "eopd_grpo" if loss.use_task_rewards else ("opd" if loss.fkl_coef == 0 else "eopd")


def run(config, user_keys: Optional[Iterable[str]] = None, algorithm: Optional[str] = None) -> None:
    from . import cpu
    from .config import check_run_config

    user_keys = list(user_keys or [])
    student = OmegaConf.select(config, "actor_rollout_ref.model.path")
    teacher = OmegaConf.select(config, "distillation.teacher_models.teacher_model.model_path")
    if not student and not teacher:
        from .embedded import embedded_settings, ensure_embedded_default

        info = ensure_embedded_default()
        algorithm = algorithm or _algorithm_name(config)
        apply_settings(config, embedded_settings(info, algorithm), user_keys)
        print(f"[verl_eopd] no model given: embedded tiny default ({info['root']}), algorithm={algorithm}", flush=True)
    on_cpu = config.trainer.get("device", "cuda") == "cpu" or not cpu.gpu_available()
    if on_cpu:
        apply_settings(config, cpu.CPU_SETTINGS, user_keys)
        if config.distillation.get("enabled", False):
            apply_settings(config, cpu.CPU_SERVER_SETTINGS, user_keys)
        cpu.check_ray_resources(config)
    loss = check_run_config(config)
    _server_token_column(config, loss)
    if on_cpu:
        cpu.install()  # before verl's engine/worker modules are imported (here and, via env, in Ray workers)
        os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

    from verl.trainer.main_ppo import run_ppo
    from verl.trainer.ppo.utils import need_critic, need_reference_policy
    from verl.utils.config import validate_config
    from verl.utils.device import auto_set_device

    auto_set_device(config)
    validate_config(
        config=config,
        use_reference_policy=loss.teacher_route == "ref" or need_reference_policy(config),
        use_critic=need_critic(config),
    )
    from .trainer import EOPDTaskRunner

    run_ppo(config, task_runner_class=EOPDTaskRunner)


def _server_token_column(config, loss) -> None:
    """teacher_route=server with server_token_logprob=exact: turn on verl_eopd.server_logprobs in every process
    (this one, Ray workers of a local cluster through the environment, any cluster through runtime_env)."""
    from .server_logprobs import ENV

    value = "1" if loss.teacher_route == "server" and loss.server_token_logprob == "exact" else "0"
    os.environ[ENV] = value
    with open_dict(config):
        OmegaConf.update(config, f"ray_kwargs.ray_init.runtime_env.env_vars.{ENV}", value, force_add=True)


@hydra.main(config_path="conf", config_name="eopd_trainer", version_base=None)
def main(config) -> None:
    run(config, user_keys=_cli_keys(), algorithm=_algorithm_name(config))


if __name__ == "__main__":
    main()
