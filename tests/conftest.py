import os
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


@pytest.fixture(scope="session")
def verl_cpu():
    """verl on CPU in this process: the CPU platform and a one-process gloo group."""
    from verl_eopd import cpu

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
    return True


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory):
    """A tiny student and a bigger, differently initialised teacher sharing one locally trained tokenizer."""
    from tiny import build_tiny_qwen3, build_tokenizer

    root = tmp_path_factory.mktemp("tiny")
    tok = build_tokenizer(str(root / "tokenizer"))
    student = build_tiny_qwen3(str(root / "student"), vocab_size=STUDENT_VOCAB, seed=0, tokenizer=tok)
    teacher = build_tiny_qwen3(str(root / "teacher"), vocab_size=TEACHER_VOCAB, hidden=48, layers=3, seed=1,
                               tokenizer=tok)
    return {"student": student, "teacher": teacher, "tokenizer": tok}
