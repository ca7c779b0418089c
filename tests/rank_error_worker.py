"""One rank of tests/test_rank_errors.py: EOPD micro-batches over gloo where one rank's input is bad.

For each case the rank runs one micro-batch as verl's engine does (the logits processor or the from_hidden lm head,
then the registered loss, backward), then an all-reduce of the loss: the next collective, as FSDP's gradient
reduce-scatter would be. It reports one line per case, `<case> OK` or `<case> ERROR <type>: <message>` (printed after `RESULT `, or put on a
queue by `rank_main`). Like a Ray actor whose method raised, the process then stays (its connections open) until
the driver lets it go (closes its stdin, or sets the release event), and exits with status 1 if its last case
raised.

    python tests/rank_error_worker.py RANK WORLD RENDEZVOUS BAD_RANK CASE [CASE ...]
"""

from __future__ import annotations

import os
import sys
import types
from functools import partial

sys.path.insert(0, os.path.dirname(__file__))

import torch  # noqa: E402

CASES = ("clean", "nan", "token_column", "temperature", "teacher")


def _micro_batch(case: str, bad: bool):
    from rank_worker import make_batch, to_td
    from verl.utils import tensordict_utils as tu

    batch = {k: v[:4] for k, v in make_batch(seed=3).items()}
    td = to_td(batch, task=False, micro=4, dynamic=False)
    offsets = td["input_ids"].offsets()
    tu.assign_non_tensor(td, temperature=1.0)
    if case == "token_column":  # the server payload's column K: the next token (rank BAD: a wrong one at row 7)
        for key in ("teacher_entropy", "teacher_token_logprob"):
            td.pop(key)
        ids, lp = td["teacher_ids"].values(), td["teacher_logprobs"].values()
        nxt = torch.roll(td["input_ids"].values(), -1)
        if bad:
            nxt[7] = nxt[7] + 1
        td["teacher_ids"] = torch.nested.nested_tensor_from_jagged(torch.cat([ids, nxt[:, None]], -1), offsets=offsets)
        td["teacher_logprobs"] = torch.nested.nested_tensor_from_jagged(torch.cat([lp, lp[:, :1] - 0.5], -1),
                                                                        offsets=offsets)
    if case == "temperature":  # per-sample temperatures (rank BAD: two different ones) on the from_hidden path
        n = offsets.numel() - 1
        td["temperature"] = torch.tensor([0.5] * (n - 1) + [0.75 if bad else 0.5])
    return td


def prepare(case: str, bad: bool):
    """The case's micro-batch and student; returns `run()`, the micro-batch's step as verl's engine makes it."""
    from rank_worker import V, loss_fn

    td = _micro_batch(case, bad)
    fn = loss_fn({"entropy_threshold": 5.0})
    offsets = td["input_ids"].offsets()
    nnz = td["input_ids"].values().shape[0]
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(1, nnz, 16, generator=g, requires_grad=True)
    weight = (torch.randn(V, 16, generator=g) * 0.3).requires_grad_(True)
    logits = torch.randn(1, nnz, V, generator=g, requires_grad=True)
    if bad and case in ("nan", "teacher"):
        logits.data[0, 5, 3] = float("nan")
    return partial(_run, case, td, fn, offsets, hidden, weight, logits)


def _teacher_pass(td, logits) -> None:
    """The teacher worker's pass (EOPDTeacherEngine.prepare_model_outputs, called on a stand-in engine: no SP, no
    padding) on logits [1, nnz, V] at top-k 4, then the next collective."""
    import torch.distributed as dist
    from verl.utils import tensordict_utils as tu

    from verl_eopd.integration.teacher import _teacher_engine_class

    engine = types.SimpleNamespace(eopd_from_hidden=False, _gather_and_unpad_packed=lambda v, pad_size: v)
    tu.assign_non_tensor(td, eopd_topk=4, use_remove_padding=True)
    output_args = {"input_ids_rmpad_rolled": torch.roll(td["input_ids"].values(), -1)[None], "pad_size": 0}
    out = _teacher_engine_class().prepare_model_outputs(engine, types.SimpleNamespace(logits=logits.detach()),
                                                        output_args, td, None)
    dist.all_reduce(out["teacher_entropy"].values().sum())


def _run(case, td, fn, offsets, hidden, weight, logits) -> None:
    from verl_eopd.integration.loss import eopd_distillation_loss

    if case == "teacher":
        return _teacher_pass(td, logits)
    if case == "temperature":
        from verl_eopd.integration.hidden import actor_engine_class

        engine = types.SimpleNamespace(_loss_function=fn)
        engine._rows_into = partial(actor_engine_class()._rows_into, engine)
        outputs = {k: v.unsqueeze(0) for k, v in actor_engine_class()._rows(engine, td, {}, hidden, weight).items()}
    else:
        outputs = fn(data=td, student_logits=logits)  # verl's processor call
    model_output = {k: torch.nested.nested_tensor_from_jagged(v.squeeze(0), offsets=offsets) for k, v in outputs.items()}
    per_token, _ = eopd_distillation_loss(fn.keywords["config"], fn.keywords["distillation_config"], model_output, td)
    loss = per_token.sum()
    loss.backward()
    import torch.distributed as dist

    dist.all_reduce(loss.detach())  # the next collective (FSDP's gradient reduce-scatter in a real step)


def step(case: str, bad: bool) -> str:
    prepare(case, bad)()
    return ""


def counted_step(case: str, bad: bool) -> str:
    """`step`, counting in the micro-batch's forward and backward the host syncs (test_kernels_gpu_sizing's
    CountOps), the reads (HostChecks.read) and the all-reduces made before the step's own final one."""
    import torch.distributed as dist
    from test_kernels_gpu_sizing import CountOps

    from verl_eopd.core import kernels

    reads, reduces = [], []
    real_read, real_reduce = kernels.HostChecks.read, dist.all_reduce

    def read(self, *a, **kw):
        reads.append(1)
        return real_read(self, *a, **kw)

    def all_reduce(*a, **kw):
        reduces.append(1)
        return real_reduce(*a, **kw)

    run = prepare(case, bad)
    kernels.HostChecks.read, dist.all_reduce = read, all_reduce
    try:
        with CountOps() as c:
            run()
    finally:
        kernels.HostChecks.read, dist.all_reduce = real_read, real_reduce
    return f" syncs={len(c.syncs)} reads={len(reads)} all_reduces={len(reduces) - 1}"


def main(rank: int, world: int, rendezvous: str, bad_rank: int, cases: list[str], report=None, wait=None) -> None:
    """The cases in order; REPORT(line) takes each `<case> OK|ERROR ...` line (default: printed after "RESULT "),
    WAIT() returns when the driver lets the rank go (default: stdin closed)."""
    import torch.distributed as dist

    report = report or (lambda line: print(f"RESULT {line}", flush=True))
    wait = wait or sys.stdin.read

    dist.init_process_group("gloo", init_method=f"file://{rendezvous}", rank=rank, world_size=world)
    status = 0
    for case in cases:
        try:
            counts = counted_step(case, bad=rank == bad_rank) if case == "clean" else step(case, bad=rank == bad_rank)
            status = 0
            line = "OK" + counts
        except Exception as exc:  # reported to the driver, as Ray reports an actor method's error
            status = 1
            line = f"ERROR {type(exc).__name__}: {exc}".replace("\n", " ")
        report(f"{case} {line}")
    wait()  # stay, as a Ray actor stays after its method raised, until the driver lets go
    os._exit(status)  # no destroy_process_group: a stuck peer would block it


def rank_main(rank: int, world: int, rendezvous: str, bad_rank: int, cases: list[str], results, release,
              err_path: str) -> None:
    """One rank forked by tests/test_rank_errors.py (conftest.forkserver_context): its stderr to ERR_PATH, each
    line put on RESULTS as (rank, line), the RELEASE event in place of stdin; the exit status as from the command
    line. No rank variables from the server's environment: the group meets through the file rendezvous."""
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        os.environ.pop(key, None)
    os.dup2(os.open(err_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644), 2)
    main(rank, world, rendezvous, bad_rank, cases, report=lambda line: results.put((rank, line)), wait=release.wait)


if __name__ == "__main__":
    a = sys.argv[1:]
    main(int(a[0]), int(a[1]), a[2], int(a[3]), a[4:])
