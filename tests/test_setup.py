"""The set-up script's plan on CPU and GPU machines (stand-in nvidia-smi, dry run), and the GPU extras
resolving to verl 0.9.1's own pins (read from verl's installed metadata, no network)."""

from __future__ import annotations

import importlib.metadata
import os
import subprocess
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[1]


def _plan(tmp_path, nvidia_smi_rc: int | None, **env) -> str:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    path = os.environ["PATH"]
    if nvidia_smi_rc is not None:
        (bin_dir / "nvidia-smi").write_text(f"#!/bin/sh\necho 'GPU 0: stand-in'\nexit {nvidia_smi_rc}\n")
        (bin_dir / "nvidia-smi").chmod(0o755)
        path = f"{bin_dir}{os.pathsep}{path}"
    out = subprocess.run(["bash", str(ROOT / "scripts" / "setup_env.sh")], capture_output=True, text=True, timeout=60,
                         env={**os.environ, "PATH": path, "EOPD_SETUP_DRY_RUN": "1", "EOPD_VENV": str(tmp_path / "v"),
                              **env})
    assert out.returncode == 0, out.stderr
    assert not (tmp_path / "v").exists()  # a dry run creates nothing
    return out.stdout


def test_a_gpu_machine_gets_verls_vllm_stack_and_a_cpu_machine_the_cpu_torch(tmp_path):
    assert _plan(tmp_path, 0) == "machine: gpu\n+ pip install -e .[test,vllm]\n"
    assert _plan(tmp_path, 0, EOPD_EXTRAS="test,sglang") == "machine: gpu\n+ pip install -e .[test,sglang]\n"
    cpu = "machine: cpu\n+ pip install torch==2.13.0\n+ pip install -e .[test]\n"
    assert _plan(tmp_path, 9) == cpu  # nvidia-smi present but no GPU (driver without a device)
    if subprocess.run(["bash", "-c", "command -v nvidia-smi"], capture_output=True).returncode != 0:
        assert _plan(tmp_path, None) == cpu


def _verl_extra(name: str) -> dict[str, str]:
    pins = {}
    for req in importlib.metadata.requires("verl") or []:
        spec, _, marker = req.partition(";")
        if f'extra == "{name}"' in marker and "==" in spec:
            pkg, version = spec.strip().split("==")
            pins[pkg.strip()] = version.strip()
    return pins


def test_the_gpu_extras_are_verls_and_the_docs_state_their_pins():
    # the installed metadata (tomllib would need Python 3.11; pyproject allows 3.10, as verl 0.9.1 does)
    extras = {}
    for req in importlib.metadata.requires("verl-eopd"):
        if "; extra == " in req:
            spec, extra = req.split("; extra == ")
            extras.setdefault(extra.strip('"'), []).append(spec.strip())
    assert extras["vllm"] == ["verl[vllm]==0.9.1"] and extras["sglang"] == ["verl[sglang]==0.9.1"]
    vllm, sglang = _verl_extra("vllm"), _verl_extra("sglang")
    assert (vllm["torch"], vllm["vllm"], vllm["transformers"]) == ("2.11.0", "0.24.0", "5.9.0")
    assert (sglang["torch"], sglang["sglang"]) == ("2.11.0", "0.5.12")
    doc = (ROOT / "docs" / "gpu.md").read_text()
    for pin in ("torch==2.11.0", "vllm==0.24.0", "transformers==5.9.0", "sglang==0.5.12",
                f"flash-attn=={_verl_extra('flash-attn-cu130torch211')['flash-attn']}"):
        assert pin in doc, pin


@pytest.mark.parametrize("env, mode, says", [
    ({}, "disabled", True),  # no key: a wandb login prompt would stop the run; said on stderr when wandb is asked
    ({"WANDB_API_KEY": "k"}, "", False),  # a key: wandb logs as you asked
    ({"WANDB_MODE": "offline"}, "offline", False),  # your mode is kept
])
def test_run_sh_leaves_wandb_to_a_key_or_your_mode_and_says_when_it_turns_it_off(tmp_path, env, mode, says):
    """scripts/run.sh with a stand-in environment (EOPD_VENV: a `python` that prints WANDB_MODE and its arguments, the
    set-up's stamp current, so nothing installs)."""
    venv = tmp_path / "venv"
    (venv / "bin").mkdir(parents=True)
    (venv / "bin" / "python").write_text('#!/bin/sh\necho "WANDB_MODE=${WANDB_MODE:-} $*"\n')
    (venv / "bin" / "python").chmod(0o755)
    kind = "gpu" if subprocess.run(["bash", "-c", "nvidia-smi -L"], capture_output=True).returncode == 0 else "cpu"
    (venv / ".verl-eopd-installed").write_text(f"{kind} [{'test,vllm' if kind == 'gpu' else 'test'}]\n")
    base = {k: v for k, v in os.environ.items() if k not in ("WANDB_MODE", "WANDB_API_KEY")}
    out = subprocess.run(["bash", str(ROOT / "scripts" / "run.sh"), "trainer.logger=[console,wandb]"],
                         capture_output=True, text=True, timeout=60, env={**base, "EOPD_VENV": str(venv), **env})
    assert out.returncode == 0, out.stderr
    assert out.stdout == f"WANDB_MODE={mode} -m verl_eopd.main trainer.logger=[console,wandb]\n"
    assert ("WANDB_MODE=disabled (no WANDB_API_KEY)" in out.stderr) is says, out.stderr


def _slow_host(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(ROOT / "scripts" / "slow_host.sh"), *args], capture_output=True, text=True,
                          timeout=60)


def test_slow_host_sh_refuses_bad_input_and_dry_runs_its_plan():
    """scripts/slow_host.sh (docs/cpu.md's slow-host model): a bad core count or no command is refused naming
    the option; the dry run prints the cgroup quota it would set and the AVX2 settings, and touches nothing."""
    for args, says in ((["--cores", "0", "--", "true"], "--cores 0 is not a positive number"),
                       (["--cores", "x", "--", "true"], "--cores x is not a positive number"),
                       (["--cores", "0.6"], "no command given"), (["--fast", "--", "true"], "unknown option --fast")):
        out = _slow_host(*args)
        assert out.returncode == 2 and says in out.stderr, (args, out.stderr)
    out = _slow_host("--dry-run", "--cores", "0.25", "--", "echo", "hi")
    if "no cgroup cpu controller" in out.stderr:
        pytest.skip("no cgroup cpu controller on this machine")
    assert out.returncode == 0, out.stderr
    assert "0.25 cores (quota 25000 us per 100000 us)" in out.stderr and "AVX2 kernels: echo hi" in out.stderr
    assert ("echo 25000 > " in out.stdout or "echo '25000 100000' > " in out.stdout) and "exec echo hi" in out.stdout


def test_slow_host_sh_runs_the_command_in_its_quota_group_with_avx2_kernels(tmp_path):
    """Where cgroups are writable (root, as on CI's machines): the command runs inside a group whose quota is
    the one asked for, with torch's AVX2 setting in its environment, and the group is removed afterwards."""
    probe = tmp_path / "probe.sh"
    probe.write_text('g=$(awk -F: \'$2 ~ /(^|,)cpu(,|$)/ || $2 == "" {print $3; exit}\' /proc/self/cgroup)\n'
                     'if [ -f "/sys/fs/cgroup/cpu$g/cpu.cfs_quota_us" ]; then cat "/sys/fs/cgroup/cpu$g/cpu.cfs_quota_us"; '
                     'else cut -d" " -f1 "/sys/fs/cgroup$g/cpu.max"; fi\necho "$g"\necho "$ATEN_CPU_CAPABILITY"\n')
    out = _slow_host("--cores", "0.5", "--", "bash", str(probe))
    if out.returncode != 0 and ("Permission denied" in out.stderr or "Read-only" in out.stderr
                                or "no cgroup cpu controller" in out.stderr):
        pytest.skip(f"cgroups not writable here: {out.stderr.strip()[-200:]}")
    assert out.returncode == 0, out.stderr
    quota, group, isa = out.stdout.split()
    assert quota == "50000" and "eopd_slow_host_" in group and isa == "avx2", out.stdout
    assert not any(Path(root, group.lstrip("/")).exists() for root in ("/sys/fs/cgroup/cpu", "/sys/fs/cgroup"))
