#!/usr/bin/env bash
# Runs a command on a model of a slow CPU host (docs/cpu.md, "On a host as slow as issue 24's"): its processes
# share CORES of CPU time (a CFS quota on a cgroup of their own), and torch, MKL and oneDNN use AVX2 kernels only
# (no bf16 matrix units). On a 2-core AMD EPYC host with AVX-512, 0.6 cores makes the code of cc6eccc step in
# about 21 s, as issue 24's host did (22 s). Needs root and a cgroup v1 `cpu` controller or cgroup v2.
#   sudo bash scripts/slow_host.sh -- bash scripts/run.sh algorithm=eopd "trainer.logger=[console,file]"
#   sudo bash scripts/slow_host.sh --cores 0.6 -- bash scripts/test.sh -m "not e2e"
#   bash scripts/slow_host.sh --dry-run -- bash scripts/test.sh    # prints what it would do, needs nothing
set -euo pipefail
CORES=0.6
DRY=0
while [ "$#" -gt 0 ]; do
  case "$1" in
    --cores) CORES="$2"; shift 2 ;;
    --dry-run) DRY=1; shift ;;
    --) shift; break ;;
    *) echo "slow_host.sh: unknown option $1 (usage: slow_host.sh [--cores N] [--dry-run] -- command ...)" >&2; exit 2 ;;
  esac
done
if [ "$#" -eq 0 ]; then
  echo "slow_host.sh: no command given (usage: slow_host.sh [--cores N] [--dry-run] -- command ...)" >&2
  exit 2
fi
PERIOD=100000
QUOTA=$(awk -v c="$CORES" 'BEGIN { q = int(c * 100000 + 0.5); if (c + 0 <= 0 || q < 1000) exit 1; print q }') || {
  echo "slow_host.sh: --cores $CORES is not a positive number of cores (at least 0.01)" >&2; exit 2; }
if [ -d /sys/fs/cgroup/cpu ] && [ -f /sys/fs/cgroup/cpu/cpu.cfs_quota_us ]; then
  GROUP=/sys/fs/cgroup/cpu/eopd_slow_host_$$
  SETUP="mkdir $GROUP && echo $PERIOD > $GROUP/cpu.cfs_period_us && echo $QUOTA > $GROUP/cpu.cfs_quota_us"
  JOIN="$GROUP/tasks"
elif [ -f /sys/fs/cgroup/cgroup.controllers ]; then
  GROUP=/sys/fs/cgroup/eopd_slow_host_$$
  SETUP="mkdir $GROUP && echo '$QUOTA $PERIOD' > $GROUP/cpu.max"
  JOIN="$GROUP/cgroup.procs"
else
  echo "slow_host.sh: no cgroup cpu controller found under /sys/fs/cgroup (cgroup v1 cpu or v2 needed)" >&2
  exit 1
fi
export ATEN_CPU_CAPABILITY=avx2 MKL_ENABLE_INSTRUCTIONS=AVX2 ONEDNN_MAX_CPU_ISA=AVX2
echo "slow_host.sh: $CORES cores (quota $QUOTA us per $PERIOD us) in $GROUP, AVX2 kernels: $*" >&2
if [ "$DRY" -eq 1 ]; then
  echo "$SETUP; echo <pid> > $JOIN; exec $*"
  exit 0
fi
eval "$SETUP"
cleanup() { rmdir "$GROUP" 2>/dev/null || true; }
trap cleanup EXIT
# the command runs in a child that joins the group first; Ray's and pytest's processes inherit it
bash -c 'echo $$ > "$0"; exec "$@"' "$JOIN" "$@"
