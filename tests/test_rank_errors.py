"""An error on one rank stops the run (issue 23, item 4): 2 gloo ranks (tests/rank_error_worker.py, file
rendezvous) run EOPD micro-batches where only rank 1's input is bad (a NaN logit row, a wrong sampled-token column,
mixed temperatures on the from_hidden path, a NaN row in the teacher worker's logits). The micro-batch's one read
is an all-reduce of the check codes, so both ranks raise at that read: rank 1 its check's own message, rank 0 an
error naming rank 1 and the check. Neither waits in the next collective. Without the all-reduce, rank 0 passes its read and waits in the next collective for
rank 1 (whose process stays, as a Ray actor does), and the hang guard fails the test.
"""

from __future__ import annotations

import queue

import pytest

from rank_error_worker import CASES

pytestmark = pytest.mark.integration

HANG_GUARD_S = 300  # generous: only turns a hang into a failure


def test_a_bad_input_on_one_rank_stops_every_rank(tmp_path):
    import time

    from conftest import forkserver_context
    from rank_error_worker import rank_main

    context = forkserver_context()  # the ranks forked with torch and verl imported once (conftest.start_ranks)
    results, release = context.Queue(), context.Event()
    procs = [context.Process(target=rank_main, args=(rank, 2, str(tmp_path / "rendezvous"), 1, list(CASES), results,
                                                     release, str(tmp_path / f"rank{rank}.err")))
             for rank in range(2)]
    for proc in procs:
        proc.start()
    err = lambda rank: (tmp_path / f"rank{rank}.err").read_text()[-3000:]  # noqa: E731
    got: dict = {0: [], 1: []}
    try:
        deadline = time.monotonic() + HANG_GUARD_S
        while len(got[0]) < len(CASES) or len(got[1]) < len(CASES):
            try:
                rank, line = results.get(timeout=1)
            except queue.Empty:
                for rank, proc in enumerate(procs):
                    if proc.exitcode is not None and len(got[rank]) < len(CASES):
                        pytest.fail(f"rank {rank} ended early: {got}\n{err(rank)}")
                if time.monotonic() > deadline:
                    pytest.fail(f"hang guard: after {HANG_GUARD_S} s the ranks reported {got}: a rank waits in a "
                                f"collective\n" + err(0)[-2000:] + err(1)[-2000:])
                continue
            got[rank].append(line)
        release.set()  # the driver lets the ranks go
        for proc in procs:
            proc.join(timeout=HANG_GUARD_S)
        codes = [proc.exitcode for proc in procs]
    finally:
        for proc in procs:
            if proc.is_alive():
                proc.kill()
                proc.join()
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
