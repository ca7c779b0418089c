"""An error on one rank stops the run (issue 23, item 4): 2 gloo ranks (tests/rank_error_worker.py, file
rendezvous) run EOPD micro-batches where only rank 1's input is bad (a NaN logit row, a wrong sampled-token column,
mixed temperatures on the from_hidden path, a NaN row in the teacher worker's logits). The micro-batch's one read
is an all-reduce of the check codes, so both ranks raise at that read: rank 1 its check's own message, rank 0 an
error naming rank 1 and the check. Neither waits in the next collective. Without the all-reduce, rank 0 passes its read and waits in the next collective for
rank 1 (whose process stays, as a Ray actor does), and the hang guard fails the test.
"""

from __future__ import annotations

import os
import queue
import subprocess
import sys
import threading

import pytest

from rank_error_worker import CASES

pytestmark = pytest.mark.integration

HERE = os.path.dirname(os.path.abspath(__file__))
HANG_GUARD_S = 300  # generous: only turns a hang into a failure (imports on a loaded 2-core host take ~30 s)


def _lines(proc, rank: int, out: queue.Queue) -> None:
    for line in proc.stdout:
        if line.startswith("RESULT "):
            out.put((rank, line[len("RESULT "):].rstrip("\n")))
    out.put((rank, None))


def test_a_bad_input_on_one_rank_stops_every_rank(tmp_path):
    rendezvous = tmp_path / "rendezvous"
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR",
                                                             "MASTER_PORT")}
    procs = [subprocess.Popen([sys.executable, os.path.join(HERE, "rank_error_worker.py"), str(rank), "2",
                               str(rendezvous), "1", *CASES], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                              stderr=open(tmp_path / f"rank{rank}.err", "w"), text=True, env=env, cwd=tmp_path)
             for rank in range(2)]
    results: queue.Queue = queue.Queue()
    for rank, proc in enumerate(procs):
        threading.Thread(target=_lines, args=(proc, rank, results), daemon=True).start()
    got: dict = {0: [], 1: []}
    try:
        while len(got[0]) < len(CASES) or len(got[1]) < len(CASES):
            try:
                rank, line = results.get(timeout=HANG_GUARD_S)
            except queue.Empty:
                pytest.fail(f"hang guard: after {HANG_GUARD_S} s the ranks reported {got}: a rank waits in a "
                            f"collective\n" + "".join((tmp_path / f"rank{r}.err").read_text()[-2000:] for r in (0, 1)))
            if line is None:
                if len(got[rank]) < len(CASES):
                    pytest.fail(f"rank {rank} ended early: {got}\n{(tmp_path / f'rank{rank}.err').read_text()[-3000:]}")
                continue
            got[rank].append(line)
        for proc in procs:
            proc.stdin.close()  # the driver lets the ranks go
        codes = [proc.wait(timeout=HANG_GUARD_S) for proc in procs]
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    by_case = {case: (got[0][i], got[1][i]) for i, case in enumerate(CASES)}
    # good input: the read raises nowhere; per micro-batch one read, one all-reduce in it, no other host sync
    # (syncs counts the aten ops that read device values; the read's own copy is invisible on CPU)
    assert by_case["clean"] == ("clean OK syncs=0 reads=1 all_reduces=1",) * 2, by_case["clean"]
    own = {"nan": r"ValueError: student_logits holds NaN or \+inf logits at row 5",
           "token_column": r"ValueError: teacher_ids\[\.\.\., 8\] \(the sampled-token column\) holds token \d+ at "
                           r"packed row 7",
           "temperature": r"ValueError: distillation.distillation_loss.from_hidden=true needs one temperature per "
                          r"micro-batch, got \[0.5, 0.75\]",
           "teacher": r"ValueError: teacher_logits holds NaN or \+inf logits at row 5"}
    check = {"nan": "NaN or +inf logits in student_logits",
             "token_column": "teacher_ids[..., 8] (the sampled-token column) equal to the next tokens",
             "temperature": "one temperature per micro-batch (from_hidden)",
             "teacher": "NaN or +inf logits in teacher_logits"}
    import re

    for case in ("nan", "token_column", "temperature", "teacher"):
        r0, r1 = by_case[case]
        assert re.match(f"{case} ERROR {own[case]}", r1), r1  # rank 1: its check's own message
        assert r0 == (f"{case} ERROR RankStopped: rank 1 failed its check: {check[case]}; this rank stops too (its "
                      "own inputs passed), so that no rank waits in the next collective. Rank 1's error message says "
                      "what to fix"), r0
    assert codes == [1, 1]  # both ranks end with an error status (their last case raised)
