import os
import subprocess
import sys
import tempfile

import pytest

sys.path.insert(0, os.path.dirname(__file__))  # tests/dense_reference.py, tests/tiny.py
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "disabled")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# one embedded tiny pair per test session (built on first use, ~1 min), shared by the end-to-end tests and
# the scripts they run as subprocesses; set EOPD_CACHE to reuse a built one
if "EOPD_CACHE" not in os.environ:
    os.environ["EOPD_CACHE"] = tempfile.mkdtemp(prefix="verl_eopd_cache_")

STUDENT_VOCAB = 320  # rows of the student's embedding
TEACHER_VOCAB = 352  # the teacher's table is padded, like Qwen's 151,936 vs 152,064


def run_main(overrides, cwd, timeout: int = 1500, **env) -> subprocess.CompletedProcess:
    """`python -m verl_eopd.main OVERRIDES` in a subprocess (the command line, with its own process state);
    fails the test with the end of its output when it fails."""
    proc = subprocess.run([sys.executable, "-m", "verl_eopd.main", *overrides], cwd=cwd, capture_output=True,
                          text=True, timeout=timeout, env={**os.environ, **env})
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    return proc


_CPU_ENV = ("VERL_PLATFORM", "VERL_USE_EXTERNAL_MODULES", "VERL_ENGINE_DEVICE")


@pytest.fixture(scope="session")
def verl_cpu():
    """verl on CPU in this process (the integration tests that drive verl's engine and workers directly): the
    CPU platform and a one-process gloo group. The environment it sets is restored at the end of the session;
    the end-to-end tests run the command line in subprocesses and never depend on this."""
    from verl_eopd.cpu import platform as cpu

    saved = {k: os.environ.get(k) for k in _CPU_ENV}
    cpu.install()
    import torch.distributed as dist

    # verl's Worker reads its rank from the environment (Ray sets these for real workers)
    for key, value in {"RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1",
                       "MASTER_PORT": "29533"}.items():
        os.environ.setdefault(key, value)
    if not dist.is_initialized():
        fd, path = tempfile.mkstemp()
        os.close(fd)
        os.unlink(path)
        dist.init_process_group("gloo", init_method=f"file://{path}", rank=0, world_size=1)
    yield True
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory):
    """A tiny student and a bigger, differently initialised teacher sharing one locally trained tokenizer."""
    from tiny import build_tiny_qwen3, build_tokenizer

    root = tmp_path_factory.mktemp("tiny")
    tok = build_tokenizer(str(root / "tokenizer"))
    student = build_tiny_qwen3(str(root / "student"), vocab_size=STUDENT_VOCAB, seed=0, tokenizer=tok)
    teacher = build_tiny_qwen3(str(root / "teacher"), vocab_size=TEACHER_VOCAB, hidden=48, layers=3, seed=1,
                               tokenizer=tok)
    from verl_eopd.cpu.embedded import ADD, Problem, write_rl_parquet

    write_rl_parquet([Problem(ADD, 1, 2), Problem(ADD, 3, 4)], root / "train.parquet", "train")
    write_rl_parquet([Problem(ADD, 5, 6)], root / "val.parquet", "val")
    return {"student": student, "teacher": teacher, "tokenizer": tok, "train": str(root / "train.parquet"),
            "val": str(root / "val.parquet")}


LAYERS = ("unit", "integration", "e2e")


def pytest_collection_modifyitems(config, items):
    """Every test carries exactly one layer marker (pyproject.toml registers them)."""
    bad = [f"{item.nodeid}: {[m for m in LAYERS if item.get_closest_marker(m)]}" for item in items
           if sum(1 for m in LAYERS if item.get_closest_marker(m)) != 1]
    if bad:
        raise pytest.UsageError("tests need exactly one of the markers " + ", ".join(LAYERS) + ":\n" + "\n".join(bad))
