"""verl-eopd's `verl.plugins` entry point: the one module whose import changes anything outside itself.

verl imports it in every process that imports verl (driver, TaskRunner, Ray workers, servers); the
driver also names it in VERL_USE_EXTERNAL_MODULES so that a failure is raised, not swallowed at DEBUG as
verl does for entry points. Importing it runs `setup()`:

1. refuses a verl other than the tested release (a loud error, never a half-working loss);
2. on CPU runs (VERL_PLATFORM=cpu) installs the CPU platform pieces (cpu/platform.py);
3. registers `loss_mode: eopd` in verl's distillation-loss registry and the `hf` rollout backend;
4. in the TaskRunner (EOPD_TASK_RUNNER=1, set for that actor alone by verl_eopd.main) registers the EOPD
   v1 trainer;
5. with EOPD_TEACHER_TOKEN_COLUMN=1 (teacher_route=server) arms the server-route token-column patch, and
   with EOPD_SERVER_EOS the server-route end-token remap (integration/server_eos.py);
6. makes `python -m verl.trainer.main` name this package's command (integration/verl_main_alias.py) unless
   verl ships that module itself.

`python -m verl_eopd.plugin` checks that EOPD is active here and lists every runtime patch
(integration/patches.py) with its state in that process.
"""

from __future__ import annotations

import logging
import os

from .integration.env import PLUGIN_MODULE, TASK_RUNNER_ENV, cpu_platform_requested

logger = logging.getLogger("verl_eopd")
_STATE = {"done": False}


def setup() -> None:
    """Everything a process needs for EOPD; idempotent. Errors are logged loudly and re-raised."""
    if _STATE["done"]:
        return
    try:
        from .integration import server_route
        from .integration.loss import register_loss
        from .integration.version import check_verl_version

        check_verl_version()
        from .integration import patches, verl_main_alias

        patches.apply("verl-trainer-main-alias", verl_main_alias.install)
        if cpu_platform_requested():
            from .cpu.platform import install_light

            install_light()
        register_loss()
        from .cpu.hf_registry import register as register_hf_rollout

        register_hf_rollout()
        if os.environ.get(TASK_RUNNER_ENV) == "1":
            from .integration.trainer import register_eopd_trainer

            register_eopd_trainer()
            from .integration.console import ENV as CONSOLE_ENV, quiet_config_dump

            if os.environ.get(CONSOLE_ENV) == "compact":  # the trainer's validation pprints (compact console)
                import verl.trainer.ppo.v1.trainer_base as trainer_base

                patches.apply("console-config-dump", lambda: quiet_config_dump(trainer_base))
        server_route.install()  # only with EOPD_TEACHER_TOKEN_COLUMN=1 (teacher_route=server)
        from .integration import server_eos

        server_eos.install()  # only with EOPD_SERVER_EOS (teacher_route=server, different end tokens)
    except Exception as e:  # noqa: BLE001 - re-raised after logging
        logger.error("verl_eopd plugin failed to load: %s", e)
        raise
    _STATE["done"] = True


def check() -> dict:
    """Explicit self-check: raises with the reason if EOPD is not active in this process."""
    import verl
    import verl.trainer.distillation.losses as vlosses
    from verl.workers.rollout.replica import get_rollout_replica_class

    from .integration.loss import LOSS_NAME, eopd_distillation_loss

    setup()
    ok = (vlosses.DISTILLATION_LOSS_REGISTRY.get(LOSS_NAME) is eopd_distillation_loss
          and vlosses.DISTILLATION_SETTINGS_REGISTRY[LOSS_NAME].use_topk)
    if not ok:
        raise RuntimeError("verl_eopd: loss 'eopd' is not registered in verl's distillation-loss registry")
    return {"verl": verl.__version__, "loss_mode": LOSS_NAME, "registered": True,
            "hf_rollout": get_rollout_replica_class("hf").__name__}


def main() -> None:
    """`python -m verl_eopd.plugin`: the installed entry point (verl_eopd.plugin, loaded by `import verl`)
    is checked, not a second copy of this file running as __main__."""
    import importlib

    from .integration import patches

    print(importlib.import_module(PLUGIN_MODULE).check())
    print(patches.describe())


if __name__ == "__main__":
    main()
else:
    setup()
