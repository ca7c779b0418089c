"""tests/fork_server.py: a command forked from the server answers as the same command in a fresh `python`."""

import json
import os
import subprocess
import sys

import pytest

pytestmark = pytest.mark.integration

# what a command can see of its interpreter: path, folder, arguments, environment, __main__, fresh modules
PROBE = """
import json, os, sys, __main__
print(json.dumps({"path": sys.path, "cwd": os.getcwd(), "argv": sys.argv, "x": os.environ.get("EOPD_PROBE"),
                  "main": sorted(k for k in vars(__main__) if k not in ("json", "os", "sys", "__main__")),
                  "fresh": [m for m in ("verl", "verl_eopd", "ray", "transformers", "datasets") if m in sys.modules],
                  "name": __name__}))
"""


def _both(fresh_python, args, **kwargs):
    """The command forked from the server and run in a fresh `python`, each as a CompletedProcess."""
    real = subprocess.run([sys.executable, *args], capture_output=True, text=True, timeout=120, **kwargs)
    return fresh_python(args, **kwargs), real


def test_a_child_sees_the_interpreter_a_fresh_python_gives(fresh_python, tmp_path):
    lib = tmp_path / "lib"
    lib.mkdir()
    (lib / "probe_mod.py").write_text(PROBE)
    (tmp_path / "script.py").write_text(PROBE)
    env = {**os.environ, "EOPD_PROBE": "seen", "PYTHONPATH": str(lib)}
    for args in (["-c", PROBE, "a", "b"], ["-m", "probe_mod", "--flag"], [str(tmp_path / "script.py"), "1"]):
        forked, real = _both(fresh_python, args, env=env, cwd=tmp_path)
        assert (forked.returncode, real.returncode) == (0, 0), forked.stderr + real.stderr
        mine, theirs = json.loads(forked.stdout), json.loads(real.stdout)
        assert mine == theirs, args[0]
        assert mine["x"] == "seen" and mine["fresh"] == [] and mine["name"] == "__main__"
        assert mine["cwd"] == str(tmp_path) and str(lib) in mine["path"]


def test_exit_statuses_streams_and_shutdown_are_pythons(fresh_python, tmp_path):
    cases = [
        "import sys; print('out'); print('err', file=sys.stderr); sys.exit(3)",
        "import sys; sys.exit('a message')",
        "raise ValueError('boom')",
        # the interpreter's exit: atexit handlers run, a non-daemon thread is joined, buffered output is flushed
        "import atexit, threading, time, sys\n"
        "atexit.register(lambda: print('atexit ran'))\n"
        "threading.Thread(target=lambda: (time.sleep(0.2), print('thread joined'))).start()\n"
        "sys.stdout.write('no newline')",
    ]
    for code in cases:
        forked, real = _both(fresh_python, ["-c", code], cwd=tmp_path)
        assert forked.returncode == real.returncode, code
        assert forked.stdout == real.stdout, code
        if "ValueError" in code:  # the traceback's last line (its frames name other files)
            assert forked.stderr.strip().splitlines()[-1] == real.stderr.strip().splitlines()[-1] == "ValueError: boom"
        else:
            assert forked.stderr == real.stderr, code
    assert [c.returncode for c in (fresh_python(["-c", cases[0]]), fresh_python(["-c", cases[1]]))] == [3, 1]


def test_children_share_nothing_and_a_timeout_kills_only_its_command(fresh_python, tmp_path):
    first = fresh_python(["-c", "import os, json; os.environ['EOPD_LEAK'] = '1'; json.LEAK = 1; open('f', 'w')"],
                         cwd=tmp_path)
    assert first.returncode == 0 and (tmp_path / "f").exists()
    second = fresh_python(["-c", "import os, json; print(os.environ.get('EOPD_LEAK'), hasattr(json, 'LEAK'))"])
    assert second.stdout.strip() == "None False"
    with pytest.raises(subprocess.TimeoutExpired):
        fresh_python(["-c", "import subprocess, sys, time; subprocess.Popen([sys.executable, '-c', "
                            "'import time; time.sleep(60)']); time.sleep(60)"], timeout=2)
    again = fresh_python(["-c", "print('still serving')"])
    assert again.returncode == 0 and again.stdout == "still serving\n"
