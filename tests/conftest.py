import contextlib
import functools
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

sys.path.insert(0, os.path.dirname(__file__))  # tests/dense_reference.py, tests/tiny.py
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "disabled")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

STUDENT_VOCAB = 320  # rows of the student's embedding
TEACHER_VOCAB = 352  # the teacher's table is padded, like Qwen's 151,936 vs 152,064


# one agent-loop worker instead of the CPU default's two: one process fewer to start (about 6 CPU-seconds of a
# launch), for the e2e runs whose point does not lie in the rollout's layout; the default run's test keeps two
ONE_AGENT_WORKER = "actor_rollout_ref.rollout.agent.num_workers=1"


def run_main(overrides, cwd, timeout: int = 1500, **env) -> subprocess.CompletedProcess:
    """`python -m verl_eopd.main OVERRIDES` in a subprocess (the command line, with its own process state);
    fails the test with the end of its output when it fails."""
    proc = subprocess.run([sys.executable, "-m", "verl_eopd.main", *overrides], cwd=cwd, capture_output=True,
                          text=True, timeout=timeout, env={**os.environ, **env})
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    return proc


@functools.lru_cache(maxsize=None)
def _composed(choices: tuple) -> "DictConfig":  # noqa: F821
    from hydra import compose, initialize_config_dir

    import verl_eopd

    with initialize_config_dir(config_dir=str(Path(verl_eopd.__file__).parent / "conf"), version_base=None):
        return compose(config_name="eopd_trainer", overrides=list(choices))


def compose_trainer(*overrides: str):
    """hydra's `compose("eopd_trainer", overrides)` of verl_eopd's config, its config-group choices
    (`algorithm=eopd`) composed by hydra once per set and kept; the value overrides are then applied to a copy by
    hydra's own override step (ConfigLoaderImpl._apply_overrides_to_config), which is how hydra's compose applies
    them after the defaults: about 0.01 CPU-seconds a call instead of 0.26 (test_config_plugin compares the two)."""
    import copy

    from hydra._internal.config_loader_impl import ConfigLoaderImpl
    from hydra.core.override_parser.overrides_parser import OverridesParser

    parsed = OverridesParser.create().parse_overrides(list(overrides))
    groups = _config_groups()
    choices = tuple(o.input_line for o in parsed if o.key_or_group in groups)
    cfg = copy.deepcopy(_composed(choices))
    ConfigLoaderImpl._apply_overrides_to_config([o for o in parsed if o.key_or_group not in groups], cfg)
    return cfg


@functools.lru_cache(maxsize=None)
def _config_groups() -> frozenset:
    """Every config group of the primary config's search path (verl_eopd/conf and verl's trainer/config, the
    folders below each), as hydra names them (`algorithm`, `actor`, `npu_profile/...`)."""
    import verl.trainer.config

    import verl_eopd

    groups = set()
    for root in (Path(verl_eopd.__file__).parent / "conf", Path(verl.trainer.config.__file__).parent):
        groups |= {d.relative_to(root).as_posix() for d in root.rglob("*") if d.is_dir() and d.name != "__pycache__"}
    return frozenset(groups)


RANK_PRELOAD = ("torch", "verl", "verl_eopd.integration.loss")


def forkserver_context(preload=RANK_PRELOAD):
    """multiprocessing's fork-server context, PRELOAD imported once in the server (the first process started through
    it in this test process starts the server; later PRELOADs are ignored)."""
    import multiprocessing

    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload(list(preload))
    return context


def start_ranks(fn, args: tuple, nprocs: int, timeout: float = 900,
                preload=RANK_PRELOAD) -> None:
    """torch.multiprocessing.start_processes(fn, args, nprocs) through multiprocessing's fork server, waiting for
    the ranks: PRELOAD is imported once in that server (the first call of this test process starts it), and each
    rank is forked from it (a spawned rank imports torch and verl itself, about 4 CPU-seconds). A rank's exception
    is raised here with its traceback; ranks still running after TIMEOUT seconds are killed and fail the test. A
    rank gets the server's environment, not this process's at the call: FN takes what it needs as arguments (the
    ranks here meet through a file rendezvous)."""
    import time

    import torch.multiprocessing as mp

    forkserver_context(preload)
    ranks = mp.start_processes(fn, args=args, nprocs=nprocs, join=False, start_method="forkserver")
    deadline = time.monotonic() + timeout
    while not ranks.join(timeout=1):
        if time.monotonic() > deadline:
            for process in ranks.processes:
                process.kill()
            pytest.fail(f"{nprocs} ranks of {fn.__name__} still running after {timeout} s: killed")


@pytest.fixture(scope="session")
def fresh_python():
    """`fresh_python(args, env=None, cwd=None, timeout=300)`: `python ARGS` in a fresh process, answered as
    subprocess.run(..., capture_output=True, text=True) would, forked from a server that has imported verl's
    third-party stack once (tests/fork_server.py: a command importing verl costs about 1.5 CPU-seconds instead of 4;
    verl, verl_eopd, ray and transformers are imported fresh in every child). For commands whose point is not what
    a bare interpreter imports (tests/test_architecture.py's import checks run real fresh processes)."""
    from fork_server import ForkServer

    server = ForkServer()
    yield server.run
    server.close()


@contextlib.contextmanager
def local_ray(num_cpus: int):
    """A clean local Ray cluster for a module's tests (one left over by another module is shut down first: named
    actors). Ray's memory monitor is off meanwhile: other jobs share this machine's memory, and the monitor would
    kill our small actors for their usage."""
    import ray

    if ray.is_initialized():
        ray.shutdown()
    previous = os.environ.get("RAY_memory_monitor_refresh_ms")
    os.environ["RAY_memory_monitor_refresh_ms"] = "0"
    ray.init(num_cpus=num_cpus, include_dashboard=False, log_to_driver=False)
    try:
        yield ray
    finally:
        ray.shutdown()
        if previous is None:
            os.environ.pop("RAY_memory_monitor_refresh_ms")
        else:
            os.environ["RAY_memory_monitor_refresh_ms"] = previous




def pytest_configure(config):
    """Variables of the user's shell that select verl's platform or a process group are dropped; verl_cpu sets
    them for its modules and puts them back. (A hook, not import-time code: helper scripts that import this
    module in subprocesses keep their environment.)"""
    for name in ("VERL_PLATFORM", "VERL_USE_EXTERNAL_MODULES", "VERL_ENGINE_DEVICE", "RANK", "WORLD_SIZE",
                 "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        os.environ.pop(name, None)
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    if os.environ.get("PYTEST_XDIST_WORKER") and workers > 1:
        # each xdist worker's own torch ops get cores / workers threads: with more threads than cores in all,
        # torch's many tiny ops wait at every parallel region for a descheduled thread (several times slower);
        # the subprocesses that tests launch (the trainer through Ray, scripts) keep their own thread counts
        import torch

        torch.set_num_threads(max(1, (os.cpu_count() or 1) // workers))


# variables that would point a test at the user's files, cluster or console instead of its own
_OUTSIDE_ENV = ("EOPD_PAIR_DIR", "EOPD_EMBEDDED_TASK", "RAY_ADDRESS", "VERL_FILE_LOGGER_PATH", "VERL_FILE_LOGGER_ROOT",
                "EOPD_TEACHER_TOKEN_COLUMN", "EOPD_CONSOLE", "EOPD_TASK_RUNNER")


@pytest.fixture(autouse=True)
def hermetic(tmp_path, monkeypatch):
    """Every test runs in its own working directory with its own caches: nothing reads the checkout's
    ./checkpoints or ./verl-eopd logs, ~/.cache, or another test's leftovers, and the variables above come
    from the test alone (monkeypatch restores them afterwards)."""
    monkeypatch.chdir(tmp_path)
    # in-process checks see no GPU on any host (verl_eopd.main picks the CPU settings when none is visible);
    # tests of the GPU branch patch it back themselves
    from verl_eopd.cpu import platform as cpu

    monkeypatch.setattr(cpu, "gpu_available", lambda: False)
    for name in _OUTSIDE_ENV:
        monkeypatch.delenv(name, raising=False)
    cache = tmp_path / ".cache"
    for name, sub in (("XDG_CACHE_HOME", ""), ("HF_HOME", "huggingface"), ("TRITON_CACHE_DIR", "triton")):
        monkeypatch.setenv(name, str(cache / sub))
    yield


@pytest.fixture
def no_model_loads(monkeypatch):
    """Any attempt to start Ray or load weights fails the test: every check must come before that."""
    import ray
    import transformers
    import verl.trainer.main_ppo as main_ppo

    def boom(*a, **k):
        raise AssertionError("a model or Ray was started before the config was validated")

    monkeypatch.setattr(ray, "init", boom)
    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", boom)
    monkeypatch.setattr(main_ppo, "run_ppo", boom)


_CPU_ENV = ("VERL_PLATFORM", "VERL_USE_EXTERNAL_MODULES", "VERL_ENGINE_DEVICE", "RANK", "WORLD_SIZE", "LOCAL_RANK",
            "MASTER_ADDR", "MASTER_PORT")


def _attribute(path: str):
    """(owner, name) of a dotted attribute path whose module is imported; None when it is not (yet)."""
    module, _, name = path.rpartition(".")
    owner_path, _, cls = module.rpartition(".")
    if module in sys.modules:
        return sys.modules[module], name
    if owner_path in sys.modules and hasattr(sys.modules[owner_path], cls):
        return getattr(sys.modules[owner_path], cls), name
    return None


# what verl_cpu changes through the CPU platform's install (verl_eopd/cpu/platform.py): torch's offload
# policy and verl's reference to it, verl's top-k teacher check, verl's resolved platform
_CPU_PATCHED = ("torch.distributed.fsdp.CPUOffloadPolicy",
                "verl.workers.engine.fsdp.transformer_impl.CPUOffloadPolicy",
                "verl.workers.config.distillation.DistillationTeacherModelConfig._validate_topk_logprobs",
                "verl.plugin.platform.platform_manager._current_platform")


@pytest.fixture(scope="module")
def verl_cpu():
    """verl on CPU in this process for one test module (the integration tests that drive verl's engine and
    workers directly): the CPU platform and a one-process gloo group. At the module's end it puts back what it
    changed: the environment, the patched attributes, the platform and the process group; tests in other
    modules, in any order, see none of it. The end-to-end tests run the command line in subprocesses."""
    import importlib

    import torch.distributed as dist

    from verl_eopd.cpu import platform as cpu
    from verl_eopd.integration import patches

    for name in ("torch.distributed.fsdp", "verl.workers.engine.fsdp.transformer_impl",
                 "verl.workers.config.distillation", "verl.plugin.platform.platform_manager"):
        importlib.import_module(name)  # imported first, so that every patched attribute can be saved
    saved_env = {k: os.environ.get(k) for k in _CPU_ENV}
    saved_attr = {path: (owner, name, getattr(owner, name)) for path in _CPU_PATCHED
                  for owner, name in [_attribute(path)]}
    saved_patches = (dict(patches._DONE), dict(patches._APPLIED), cpu._STATE["installed"])
    cpu.install()
    # verl's Worker reads its rank from the environment (Ray sets these for real workers)
    for key, value in {"RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1",
                       "MASTER_PORT": "29533"}.items():
        os.environ.setdefault(key, value)
    ours = not dist.is_initialized()
    if ours:  # a file rendezvous: no port to race for
        fd, path = tempfile.mkstemp()
        os.close(fd)
        os.unlink(path)
        dist.init_process_group("gloo", init_method=f"file://{path}", rank=0, world_size=1)
    yield True
    if ours and dist.is_initialized():
        dist.destroy_process_group()
    for k, v in saved_env.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v
    for owner, name, value in saved_attr.values():
        setattr(owner, name, value)
    done, applied, installed = saved_patches
    patches._DONE.clear()
    patches._DONE.update(done)
    patches._APPLIED.clear()
    patches._APPLIED.update(applied)
    cpu._STATE["installed"] = installed


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


# Files whose e2e tests launch verl's trainer through Ray: under pytest-xdist (`scripts/test.sh` runs `-n 2`) all of
# their tests are one work unit on one worker, one launch at a time (two launches at once on 2 cores only contend);
# the other worker takes the rest. E2E_NO_RAY: e2e tests that run the plain loop, free to run beside them. A new e2e
# test file must be put in one of the two (checked at collection).
E2E_SERIAL = ("test_e2e_cpu.py", "test_faults.py", "test_embedded_tasks.py")
E2E_NO_RAY = ("test_plots_mini_repro.py", "test_prereg.py")


def pytest_collection_modifyitems(config, items):
    """Every test carries exactly one layer marker (pyproject.toml registers them); every e2e test's file is in
    E2E_SERIAL or E2E_NO_RAY."""
    bad = [f"{item.nodeid}: {[m for m in LAYERS if item.get_closest_marker(m)]}" for item in items
           if sum(1 for m in LAYERS if item.get_closest_marker(m)) != 1]
    if bad:
        raise pytest.UsageError("tests need exactly one of the markers " + ", ".join(LAYERS) + ":\n" + "\n".join(bad))
    loose = [item.nodeid for item in items if item.get_closest_marker("e2e")
             and Path(str(item.fspath)).name not in E2E_SERIAL + E2E_NO_RAY]
    if loose:
        raise pytest.UsageError("e2e tests in a file of neither tests/conftest.py E2E_SERIAL (launches the trainer "
                                "through Ray) nor E2E_NO_RAY:\n" + "\n".join(loose))


def _shares_module_setup(path: Path) -> bool:
    """A test file whose tests share a module-scoped set-up (a `scope="module"` fixture of its own, or verl_cpu's
    process group and CPU platform): split over both xdist workers, each would build it once."""
    try:
        text = path.read_text()
    except OSError:
        return False
    return 'scope="module"' in text or "verl_cpu" in text


def pytest_xdist_make_scheduler(config, log):
    """xdist's load-scope scheduling with one scope for the E2E_SERIAL files, one per file for the files whose
    tests share a module-scoped set-up (built once, not once per worker), and one per test elsewhere (xdist's
    `loadgroup` cannot be used: it renames items through `_nodeid`, which pytest 9 no longer reads). Scopes go
    out largest first (`--loadscope-reorder`, xdist's default), so the trainer launches start at once on one
    worker."""
    from functools import lru_cache

    from xdist.scheduler import LoadScopeScheduling

    shares = lru_cache(maxsize=None)(lambda file: _shares_module_setup(config.rootpath / file))

    class TrainerLaunchesTogether(LoadScopeScheduling):
        def _split_scope(self, nodeid: str) -> str:
            file = nodeid.split("::", 1)[0]
            if file.rsplit("/", 1)[-1] in E2E_SERIAL:
                return "e2e-serial"
            return file if shares(file) else nodeid

    return TrainerLaunchesTogether(config, log)
