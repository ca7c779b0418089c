"""`python -m verl_eopd.main algorithm=eopd|opd|eopd_grpo [hydra overrides]`: EOPD on verl's v1 trainer.

The config is verl's `ppo_trainer` plus the EOPD presets (verl_eopd/config/). Everything is checked
before Ray starts or any model loads (`config.check_run_config`); then verl's own `run_ppo` runs with a
TaskRunner from verl_eopd.trainer, so the EOPD trainer is registered in the TaskRunner process.
"""

from __future__ import annotations

import hydra


def run(config) -> None:
    from verl.trainer.main_ppo import run_ppo
    from verl.trainer.ppo.utils import need_critic, need_reference_policy
    from verl.utils.config import validate_config
    from verl.utils.device import auto_set_device

    from .config import check_run_config

    loss = check_run_config(config)
    auto_set_device(config)
    validate_config(
        config=config,
        use_reference_policy=loss.teacher_route == "ref" or need_reference_policy(config),
        use_critic=need_critic(config),
    )
    from .trainer import EOPDTaskRunner

    run_ppo(config, task_runner_class=EOPDTaskRunner)


@hydra.main(config_path="conf", config_name="eopd_trainer", version_base=None)
def main(config) -> None:
    run(config)


if __name__ == "__main__":
    main()
