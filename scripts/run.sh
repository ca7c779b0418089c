#!/usr/bin/env bash
# The main command of the README: sets up the environment, then runs EOPD through verl's trainer in the
# current directory (checkpoints, logs and relative paths are yours). With no model given it trains the
# embedded tiny default (on CPU when no GPU is present).
#   bash scripts/run.sh                                  # = algorithm=eopd on the tiny default
#   bash scripts/run.sh algorithm=opd trainer.total_training_steps=5
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
PY="$(bash "$ROOT/scripts/setup_env.sh" | tail -n 1)"
case "$PY" in /*) ;; *) PY="$ROOT/$PY" ;; esac
export WANDB_MODE="${WANDB_MODE:-disabled}" TOKENIZERS_PARALLELISM=false
if [ "$#" -eq 0 ]; then set -- algorithm=eopd; fi
exec "$PY" -m verl_eopd.main "$@"
