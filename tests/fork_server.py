"""A fork server for the tests' short fresh Python processes (tests/conftest.py, fixture `fresh_python`).

A fresh `python` that imports verl spends about 4 CPU-seconds, most of it importing verl's third-party stack
(torch and torch._dynamo through tensordict, pandas, pyarrow, sympy): on a slow 2-core host that is most of a
short command-line test. This server imports that stack once (PRELOAD), then forks one child per command. The
child takes the command's environment, working directory, arguments and `sys.path` (the script's folder, the
working directory for -m or '' for -c, then its PYTHONPATH, as `python` builds it), runs it as `python -m
MODULE`, `python -c CODE` or `python SCRIPT` would (runpy, exec), and leaves through the interpreter's normal exit
(atexit handlers, joins of non-daemon threads, flushed streams), with `python`'s exit status for SystemExit and
uncaught exceptions.

What a child does not get fresh is only PRELOAD. None of it is verl, ray, transformers, huggingface_hub, datasets or
verl_eopd, and none reads a variable the tests set. So verl's plugin discovery, our patches and everything that reads
the environment at import run in the child as in a fresh `python` (checked at start-up, and by
tests/test_fork_server.py, which compares children with fresh processes).

Protocol (one request at a time): a JSON line {"argv", "env", "cwd", "stdout", "stderr"} on stdin (argv: what
follows `python`; stdout/stderr: files for the child's streams); the server answers {"pid": N} once the child
runs and {"rc": N} when it ends.
"""

from __future__ import annotations

import json
import os
import sys

PRELOAD = ("numpy", "torch", "torch._dynamo", "tensordict", "pandas", "pyarrow", "pyarrow.parquet", "sympy", "yaml",
           "omegaconf", "hydra")
# modules whose import a test may observe or whose import reads the tests' variables (HF_HOME, RAY_*): never
# preloaded, checked after PRELOAD
FRESH = ("verl", "verl_eopd", "ray", "transformers", "huggingface_hub", "datasets", "accelerate")


def _exit_status(code) -> int:
    """`python`'s exit status for SystemExit(code): None -> 0, an int as is, anything else printed to stderr -> 1."""
    if code is None:
        return 0
    if isinstance(code, int):
        return code
    print(code, file=sys.stderr)
    return 1


def _run(argv: list[str]) -> int:
    """Run ARGV (what follows `python`) in this process as `python` would; returns the exit status."""
    import runpy
    import traceback

    import __main__

    try:
        if argv[0] == "-m":  # what `python -m` calls: the module runs in __main__, argv[0] becomes its file
            sys.argv = ["-m", *argv[2:]]
            runpy._run_module_as_main(argv[1], alter_argv=True)
        elif argv[0] == "-c":
            sys.argv = ["-c", *argv[2:]]
            exec(compile(argv[1], "<string>", "exec"), vars(__main__))
        else:  # a script runs in __main__ with its __file__ (CPython's PyRun_SimpleFile)
            from importlib.machinery import SourceFileLoader

            sys.argv = list(argv)
            with open(argv[0], "rb") as f:
                code = compile(f.read(), argv[0], "exec")
            __main__.__file__, __main__.__cached__ = argv[0], None
            __main__.__loader__ = SourceFileLoader("__main__", argv[0])
            exec(code, vars(__main__))
    except SystemExit as e:
        return _exit_status(e.code)
    except BaseException:  # noqa: BLE001 (an uncaught exception: Python prints it and exits 1)
        traceback.print_exc()
        return 1
    return 0


def _child(request: dict, base_path: list[str]) -> None:
    """In the forked child: the request's streams, folder, environment and path; then its command, whose exit status
    leaves as SystemExit."""
    os.setsid()  # its own process group: a timeout kills the command and whatever it started
    null = os.open(os.devnull, os.O_RDONLY)
    os.dup2(null, 0)
    for fd, path in ((1, request["stdout"]), (2, request["stderr"])):
        os.dup2(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644), fd)
    os.chdir(request["cwd"])
    os.environ.clear()
    os.environ.update(request["env"])
    argv = request["argv"]
    first = os.path.dirname(os.path.abspath(argv[0])) if argv[0] not in ("-m", "-c") else \
        (os.getcwd() if argv[0] == "-m" else "")
    extra = [p for p in request["env"].get("PYTHONPATH", "").split(os.pathsep) if p]
    sys.path[:] = [first, *extra, *base_path]
    import __main__

    # an empty __main__, as `python -c` starts with (the server's names and file gone)
    for name in [k for k in vars(__main__) if k not in ("__name__", "__builtins__")]:
        delattr(__main__, name)
    __main__.__doc__ = __main__.__package__ = __main__.__spec__ = None
    __main__.__annotations__ = {}
    from importlib.machinery import BuiltinImporter

    __main__.__loader__ = BuiltinImporter
    raise SystemExit(_run(argv))  # through serve() and the server's exit: the interpreter's normal shutdown


def serve() -> int:
    """Preload, then fork a child per request line until stdin closes (a child leaves with its command's SystemExit)."""
    import importlib

    for name in PRELOAD:
        importlib.import_module(name)
    leaked = [m for m in FRESH if m in sys.modules]
    if leaked:
        raise SystemExit(f"fork server: preloading imported {leaked}, which every child must import fresh")
    import gc

    # the preloaded objects in the permanent generation: a child's collections, its exit's included, skip them
    # (about 0.6 of the 0.8 CPU-seconds a child's exit otherwise spends; Python's advice for forking servers)
    gc.freeze()
    start_path = [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
    base_path = [p for p in sys.path[1:] if p not in start_path]  # sys.path[0]: this file's folder
    answers = os.fdopen(os.dup(1), "w")  # the protocol channel; fd 1 becomes the child's stdout
    for line in sys.stdin:
        request = json.loads(line)
        sys.stdout.flush()
        sys.stderr.flush()
        pid = os.fork()
        if pid == 0:
            answers.close()
            sys.stdin = open(os.devnull)
            _child(request, base_path)
        answers.write(json.dumps({"pid": pid}) + "\n")
        answers.flush()
        _, status = os.waitpid(pid, 0)
        answers.write(json.dumps({"rc": os.waitstatus_to_exitcode(status)}) + "\n")
        answers.flush()
    return 0


class ForkServer:
    """The tests' side: `run(args, env=, cwd=, timeout=)` answers as `subprocess.run([sys.executable, *args],
    capture_output=True, text=True, env=, cwd=, timeout=)` would (a CompletedProcess; TimeoutExpired after killing
    the command's process group)."""

    def __init__(self) -> None:
        import subprocess
        import tempfile

        self._log = tempfile.NamedTemporaryFile(prefix="fork-server-", suffix=".log", delete=False)
        self._proc = subprocess.Popen([sys.executable, os.path.abspath(__file__)], stdin=subprocess.PIPE,
                                      stdout=subprocess.PIPE, stderr=self._log)
        self._buffer = b""

    def _answer(self, timeout: float | None) -> dict | None:
        """The server's next line, or None after TIMEOUT seconds."""
        import select
        import time

        deadline = None if timeout is None else time.monotonic() + timeout
        while b"\n" not in self._buffer:
            left = None if deadline is None else max(0.0, deadline - time.monotonic())
            if not select.select([self._proc.stdout], [], [], left)[0]:
                return None
            chunk = os.read(self._proc.stdout.fileno(), 65536)
            if not chunk:
                with open(self._log.name) as f:
                    raise RuntimeError(f"the fork server ended:\n{f.read()[-3000:]}")
            self._buffer += chunk
        line, self._buffer = self._buffer.split(b"\n", 1)
        return json.loads(line)

    def run(self, args, *, env: dict | None = None, cwd=None, timeout: float = 300):
        import signal
        import subprocess
        import tempfile
        from pathlib import Path

        command = [sys.executable, *map(str, args)]
        with tempfile.TemporaryDirectory(prefix="fork-") as tmp:
            out, err = Path(tmp, "stdout"), Path(tmp, "stderr")
            request = {"argv": command[1:], "env": dict(os.environ if env is None else env),
                       "cwd": os.path.abspath(cwd or os.getcwd()), "stdout": str(out), "stderr": str(err)}
            self._proc.stdin.write((json.dumps(request) + "\n").encode())
            self._proc.stdin.flush()
            pid = self._answer(60)["pid"]
            end = self._answer(timeout)
            if end is None:
                try:
                    os.killpg(pid, signal.SIGKILL)
                except ProcessLookupError:  # not yet its own group
                    os.kill(pid, signal.SIGKILL)
                self._answer(None)
                raise subprocess.TimeoutExpired(command, timeout)
            read = lambda path: path.read_text(errors="replace") if path.exists() else ""  # noqa: E731
            return subprocess.CompletedProcess(command, end["rc"], read(out), read(err))

    def close(self) -> None:
        self._proc.stdin.close()
        self._proc.wait(timeout=60)
        os.unlink(self._log.name)


if __name__ == "__main__":
    # the server's code runs from its module, not from __main__, which each child empties
    import fork_server

    sys.exit(fork_server.serve())
