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
export TOKENIZERS_PARALLELISM=false
# wandb without a key would stop the run at a login prompt: offline-safe unless you set WANDB_API_KEY or WANDB_MODE
if [ -z "${WANDB_API_KEY:-}" ] && [ -z "${WANDB_MODE:-}" ]; then
  export WANDB_MODE=disabled
  case " $* " in *wandb*) echo "run.sh: WANDB_MODE=disabled (no WANDB_API_KEY): wandb logs nothing. Set WANDB_API_KEY, or WANDB_MODE=offline to keep a local copy" >&2 ;; esac
fi
if [ "$#" -eq 0 ]; then set -- algorithm=eopd; fi
exec "$PY" -m verl_eopd.main "$@"
