"""The environment variables that carry EOPD set-up from the driver to Ray's processes (a leaf module)."""

import os

PLUGIN_MODULE = "verl_eopd.plugin"  # the verl.plugins entry point; also listed in VERL_USE_EXTERNAL_MODULES
TASK_RUNNER_ENV = "EOPD_TASK_RUNNER"  # "1" in the TaskRunner actor only: register the EOPD v1 trainer there
TOKEN_COLUMN_ENV = "EOPD_TEACHER_TOKEN_COLUMN"  # "1": server route ships the exact sampled-token log-prob


def cpu_platform_requested() -> bool:
    """VERL_PLATFORM=cpu: set by verl_eopd.main for CPU runs, read by every process of the run."""
    return os.environ.get("VERL_PLATFORM", "").lower() == "cpu"


def external_modules_with_plugin() -> str:
    """This process's VERL_USE_EXTERNAL_MODULES with the plugin appended once (verl imports these first and
    raises on their errors, where entry-point errors are only logged at DEBUG)."""
    modules = [m for m in os.environ.get("VERL_USE_EXTERNAL_MODULES", "").split(",") if m]
    return ",".join(dict.fromkeys([*modules, PLUGIN_MODULE]))
