#!/usr/bin/env bash
# The test command of the README: sets up the environment, then runs the whole suite on CPU.
set -euo pipefail
cd "$(dirname "$0")/.."
PY="$(bash scripts/setup_env.sh | tail -n 1)"
export HF_HUB_OFFLINE=1 WANDB_MODE=disabled TOKENIZERS_PARALLELISM=false
# two workers (pytest-xdist; EOPD_TEST_WORKERS=0 runs in this process): the trainer launches stay one unit on one
# worker (tests/conftest.py, pytest_xdist_make_scheduler), the rest is spread over both
exec "$PY" -m pytest tests -n "${EOPD_TEST_WORKERS:-2}" "$@"
