"""1 FSDP rank vs 2, through verl's real FSDP2 engine over gloo on CPU (tests/rank_worker.py is one rank).

The same global batch of 8 sequences: on 1 rank in 4 micro-batches of 2, on 2 ranks 4 sequences each in 2
micro-batches (gradient accumulation either way), and with `use_dynamic_bsz` (token-budget micro-batches whose
cut differs between the two layouts). The EOPD token-mean divides by the global count of valid tokens over
ranks and micro-batches (verl's batch_num_tokens x dp_size), so the loss, the full gradient, the clipped
gradient norm and the updated parameters agree within bounds derived from fp32 and the number of reductions
(tests/tolerances.py) for eopd (hard gate), opd, eopd_grpo (task PPO loss + 0.2 x EOPD), the quantile gate and
the soft gate (per token, so equal under token-budget micro-batches too). The quantile gate's threshold is taken per micro-batch: equal here
because both layouts cut the same sequences into the same micro-batches of 2 (docs/verl_integration.md).
The teacher worker on 2 ranks returns the same top-k, log-probs, entropy and token log-prob as on 1.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

pytestmark = pytest.mark.integration

HERE = os.path.dirname(__file__)
CASES = ("eopd", "opd", "quantile", "soft_dynamic_bsz", "eopd_grpo", "eopd_dynamic_bsz", "eopd_micro4")
LR, CLIP = 1e-2, 0.5  # tests/rank_worker.py make_engine


def _run(world: int, tiny_models, tmp_path) -> dict:
    out = tmp_path / f"world{world}.pt"
    rendezvous = tmp_path / f"world{world}.rendezvous"  # gloo's file rendezvous: no port to race for
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join([HERE, os.environ.get("PYTHONPATH", "")])}
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT"):
        env.pop(key, None)
    procs = [subprocess.Popen([sys.executable, os.path.join(HERE, "rank_worker.py"), str(out), str(world), str(rank),
                               str(rendezvous), tiny_models["student"], tiny_models["teacher"]], env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for rank in range(world)]
    logs = [p.communicate(timeout=900)[0] for p in procs]
    for rank, (p, log) in enumerate(zip(procs, logs)):
        assert p.returncode == 0, f"rank {rank} of {world}:\n{log[-4000:]}"
    return torch.load(out, weights_only=False)


@pytest.fixture(scope="module")
def runs(tiny_models, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("ranks")
    return {world: _run(world, tiny_models, tmp) for world in (1, 2)}


@pytest.mark.parametrize("case", CASES)
def test_two_ranks_update_as_one(runs, case):
    from rank_worker import B, H, R, V
    from tolerances import adamw_first_step_bound, assert_grads_close, gamma

    one, two = runs[1][case], runs[2][case]
    tokens = B * R  # at most: the response tokens of the global batch
    # the loss: a mean over <= B R tokens of per-token terms each a log-softmax over V (module tolerances)
    assert abs(one["loss"] - two["loss"]) <= 2 * gamma(tokens + V + H) * tokens * max(abs(one["loss"]), 1e-3)
    assert abs(one["grad_norm"] - two["grad_norm"]) <= 2 * gamma(tokens + V + H) * tokens * one["grad_norm"]
    assert one["grad_norm"] > CLIP  # verl's clip acted: the clip uses the global norm
    assert_grads_close(one["grads"], two["grads"], tokens=tokens, vocab=V, hidden=H)
    # one AdamW step from the same parameters: the difference the two runs' own gradients imply (AdamW's first
    # step, lr g / (|g| + eps), is not Lipschitz near g = 0), plus the update's rounding
    clip = [min(1.0, CLIP / (r["grad_norm"] + 1e-6)) for r in (one, two)]
    for name in one["params"]:
        bound = adamw_first_step_bound(one["grads"][name], two["grads"][name], one["params"][name], lr=LR,
                                       clip_a=clip[0], clip_b=clip[1])
        diff = (one["params"][name].double() - two["params"][name].double()).abs()
        assert bool((diff <= bound).all()), f"param {name}: max excess {float((diff - bound).max()):.3g}"


def test_the_quantile_gate_is_per_micro_batch(runs):
    """The quantile gate's threshold is the (1 - q) quantile of the teacher entropy over the valid tokens of one
    micro-batch (core/objective.py; docs/verl_integration.md). With fixed micro-batches of 2 sequences both
    layouts hold the same micro-batches and agree (above); with token-budget micro-batches the cuts differ
    between 1 and 2 ranks, and so does the update."""
    one, two = runs[1]["quantile_dynamic_bsz"], runs[2]["quantile_dynamic_bsz"]
    assert abs(one["loss"] - two["loss"]) > 1e-4 * abs(one["loss"])


def test_the_runs_are_different_cases(runs):
    """Guards the comparison above against a harness that ignores its case: the cases differ from each other,
    and gradient accumulation and dynamic batching really ran several micro-batches."""
    one = runs[1]
    assert one["eopd"]["loss"] != pytest.approx(one["opd"]["loss"], rel=1e-3)
    assert one["eopd"]["loss"] != pytest.approx(one["quantile"]["loss"], rel=1e-3)
    assert one["eopd"]["loss"] != pytest.approx(one["eopd_grpo"]["loss"], rel=1e-3)
    assert one["eopd_dynamic_bsz"]["loss"] != pytest.approx(one["soft_dynamic_bsz"]["loss"], rel=1e-3)
    assert one["eopd"]["micro_batches"] == 4 and runs[2]["eopd"]["micro_batches"] == 4
    assert one["eopd_micro4"]["micro_batches"] == 2 and runs[2]["eopd_micro4"]["micro_batches"] == 2
    assert one["eopd_dynamic_bsz"]["micro_batches"] >= 3
    # the same objective whatever the micro-batching: micro-batches of 2 or 4 sequences, or token-budget ones
    assert one["eopd"]["loss"] == pytest.approx(one["eopd_micro4"]["loss"], rel=1e-5)
    assert one["eopd"]["loss"] == pytest.approx(one["eopd_dynamic_bsz"]["loss"], rel=1e-5)


def test_teacher_on_two_ranks_returns_what_one_returns(runs):
    one, two = runs[1]["teacher"], runs[2]["teacher"]
    for key in one:
        assert len(one[key]) == len(two[key]) == 8
        for a, b in zip(one[key], two[key]):
            if key == "teacher_ids":
                assert torch.equal(a.sort(-1).values, b.sort(-1).values)
            else:
                torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5, msg=lambda m, k=key: f"{k}: {m}")
