#!/usr/bin/env bash
# Create (once) the project virtualenv and install verl-eopd with its test extra.
#   CPU machine: torch==2.13.0 (CPU build) first, an unpinned torch would pull a multi-GB CUDA build; then
#                verl==0.9.1 and this package with the `test` extra.
#   GPU machine (nvidia-smi lists a GPU): this package with the `test` and `vllm` extras; verl 0.9.1's `vllm`
#                extra pins torch==2.11.0, vllm==0.24.0, transformers==5.9.0 (CUDA 13.0 wheels; docs/gpu.md).
#                EOPD_EXTRAS=test,sglang picks SGLang (sglang==0.5.12) instead.
# Re-runs are cheap: nothing is reinstalled unless pyproject.toml or the extras changed.
# EOPD_SETUP_DRY_RUN=1 prints the plan (machine kind and pip commands) and installs nothing.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV="${EOPD_VENV:-.venv}"
PY="$VENV/bin/python"
if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
  KIND=gpu; EXTRAS="${EOPD_EXTRAS:-test,vllm}"; TORCH=""  # the extra pins verl's torch
else
  KIND=cpu; EXTRAS="${EOPD_EXTRAS:-test}"; TORCH="torch==2.13.0"
fi
if [ "${EOPD_SETUP_DRY_RUN:-0}" = 1 ]; then
  echo "machine: $KIND"
  [ -n "$TORCH" ] && echo "+ pip install $TORCH"
  echo "+ pip install -e .[$EXTRAS]"
  exit 0
fi
[ -x "$PY" ] || python3 -m venv "$VENV"
stamp="$VENV/.verl-eopd-installed"
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ] || [ "$(cat "$stamp")" != "$KIND [$EXTRAS]" ]; then
  "$PY" -m pip install -q --upgrade pip 2>/dev/null
  if [ "$KIND" = cpu ]; then
    "$PY" -c "import torch" 2>/dev/null || "$PY" -m pip install -q "$TORCH"
    TORCH_VERSION="$("$PY" -c 'import torch; print(torch.__version__.split("+")[0])')"
    # keep the torch just installed: verl's dependencies list torch unpinned
    PYTHONWARNINGS=ignore "$PY" -m pip install -q -c <(echo "torch==$TORCH_VERSION") -e ".[$EXTRAS]"
  else
    PYTHONWARNINGS=ignore "$PY" -m pip install -q -e ".[$EXTRAS]"
  fi
  echo "$KIND [$EXTRAS]" > "$stamp"
fi
echo "$PY"
