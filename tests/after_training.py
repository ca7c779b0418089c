"""The steps after a run (issue 26), each pasted as printed: the end-of-run summary's merge command, then
`scripts/evaluate.py --pass-k 1,8` on the folder the summary names, then the transformers snippet of
docs/after_training.md (its `model_dir = ...` line set to that folder). Used by tests/test_after_training.py
on an in-process verl checkpoint, and meant for the e2e run's summary (tests/test_e2e_cpu.py)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def shell_env() -> dict:
    """The shell a user pastes into: this interpreter's `python` (the venv's) first on PATH."""
    return {**os.environ, "PATH": os.pathsep.join([os.path.dirname(sys.executable), os.environ.get("PATH", "")])}


def paste(line: str, cwd: Path, timeout: int = 600, python=None) -> subprocess.CompletedProcess:
    """Run one pasted command line in a shell; fail with its output when it fails. With PYTHON (the tests'
    `fresh_python`), a `python ...` line without shell syntax (no expansions, redirections, pipes or lists) is split
    into words as the shell splits it (shlex, POSIX) and run through PYTHON: the shell would find the same
    `python` first on PATH (shell_env)."""
    import shlex

    words = shlex.split(line) if python is not None and not set(line) & set("$`|&;<>(){}*?[]~!#\n") else []
    if words[:1] == ["python"]:
        proc = python(words[1:], env=shell_env(), cwd=cwd, timeout=timeout)
    else:
        proc = subprocess.run(line, shell=True, cwd=cwd, env=shell_env(), capture_output=True, text=True,
                              timeout=timeout)
    assert proc.returncode == 0, f"{line}\n{proc.stdout[-3000:]}\n{proc.stderr[-4000:]}"
    return proc


def field(text: str, start: str) -> str:
    """The rest of the first line of `text` whose stripped form starts with `start` (e.g. "export:")."""
    return next(line.strip()[len(start):].strip() for line in text.splitlines() if line.strip().startswith(start))


def snippet(name: str) -> str:
    """The doc's ```python block that starts with `from <name>`."""
    blocks = re.findall(r"```python\n(.*?)```", (ROOT / "docs" / "after_training.md").read_text(), flags=re.S)
    return next(b for b in blocks if b.startswith(f"from {name}"))


def export_evaluate_use(summary: str, cwd: Path, val_parquet: str, problems: int = 6, engines: int = 2,
                        python=None) -> dict:
    """Paste the summary's export line, evaluate the folder it names (HF backend, `engines` data-parallel CPU
    engines, the first `problems` problems, 12 new tokens), run the doc's transformers snippet on it (each through
    `paste`, with PYTHON when given)."""
    target = Path(field(summary, "HF folder:").split(" (")[0])
    merge = paste(field(summary, "export:"), cwd, python=python)
    out = cwd / "eval"
    evaluate = paste(f"python {ROOT / 'scripts' / 'evaluate.py'} --model {target} --benchmarks add={val_parquet} "
                     f"--output-dir {out} --pass-k 1,8 --max-problems {problems} --max-tokens 12 --backend hf "
                     f"--data-parallel-size {engines}", cwd, python=python)
    code = re.sub(r'^model_dir = ".*"', f"model_dir = {str(target)!r}", snippet("transformers"), count=1, flags=re.M)
    assert code.count(str(target)) == 1
    (cwd / "use.py").write_text(code)
    use = paste(f"python {cwd / 'use.py'}", cwd, python=python)
    return {"target": target, "merge": merge, "evaluate": evaluate, "eval_dir": out, "use": use}


# stand-in engines for verl_eopd.math.eval.DataParallelGenerator (this module is light to import in its
# spawned workers)


def fake_engine(tag: str):
    """A stand-in engine (runs in the spawned worker): one response per sample naming the prompt, its seed
    (seed + offset within the request, the vLLM generator's per-prompt seeds) and the devices it saw."""
    def generate(prompts, s, seed):
        devices = os.environ.get("CUDA_VISIBLE_DEVICES")
        return [[f"{tag}|{p[0]['content']}|seed={seed + i}|dev={devices}|{j}" for j in range(s.k)]
                for i, p in enumerate(prompts)]
    return generate


def broken_engine():
    raise RuntimeError("CUDA out of memory (stand-in)")
