#!/usr/bin/env bash
# Every CUDA check of the EOPD kernels in one command, for a machine with one GPU and torch (issue 23, item 6):
#   bash scripts/gpu_checks.sh            # JSON and log to $OUT (the device tool's folder), else /tmp/gpu_checks_out
#   bash scripts/gpu_checks.sh --dry-run  # the plan only; touches no GPU
# Extra arguments go to scripts/gpu_checks.py (--only NAME..., --deadline-s S, --out FILE). The package is read from
# this working tree (PYTHONPATH; no install, no registry needed). Exit status: the script's (1 = a gating check
# failed, 3 = the watchdog stopped a check at the global deadline; the JSON is written in every case).
set -uo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-python3}"
OUTDIR="${OUT:-${TMPDIR:-/tmp}/gpu_checks_out}"
mkdir -p "$OUTDIR"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
"$PY" scripts/gpu_checks.py --out "$OUTDIR/gpu_checks.json" "$@" 2>&1 | tee "$OUTDIR/gpu_checks.log"
exit "${PIPESTATUS[0]}"
