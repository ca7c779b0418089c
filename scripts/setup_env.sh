#!/usr/bin/env bash
# Create (once) the project virtualenv and install verl-eopd with its test extra.
# CPU machines get torch==2.13.0 first: an unpinned torch would pull a multi-GB CUDA build.
# Re-runs are cheap: nothing is reinstalled unless pyproject.toml changed.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV="${EOPD_VENV:-.venv}"
[ -x "$VENV/bin/python" ] || python3 -m venv "$VENV"
PY="$VENV/bin/python"
stamp="$VENV/.verl-eopd-installed"
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ]; then
  "$PY" -m pip install -q --upgrade pip
  if ! "$PY" -c "import torch" 2>/dev/null; then
    if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
      "$PY" -m pip install -q torch          # GPU machine: the default (CUDA) build
    else
      "$PY" -m pip install -q torch==2.13.0  # CPU build
    fi
  fi
  TORCH_VERSION="$("$PY" -c 'import torch; print(torch.__version__.split("+")[0])')"
  # keep the torch just installed: verl's dependencies list torch unpinned
  "$PY" -m pip install -q -c <(echo "torch==$TORCH_VERSION") -e ".[test]"
  touch "$stamp"
fi
echo "$PY"
