"""Names of the environment variables that carry EOPD set-up from the driver to Ray's processes (a leaf)."""

PLUGIN_MODULE = "verl_eopd.plugin"  # the verl.plugins entry point; also listed in VERL_USE_EXTERNAL_MODULES
TASK_RUNNER_ENV = "EOPD_TASK_RUNNER"  # "1" in the TaskRunner actor only: register the EOPD v1 trainer there
TOKEN_COLUMN_ENV = "EOPD_TEACHER_TOKEN_COLUMN"  # "1": server route ships the exact sampled-token log-prob
