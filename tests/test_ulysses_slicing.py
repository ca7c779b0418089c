"""Ulysses sequence parallelism: the EOPD logits processor on each rank's slice, with verl's own slicing helper.

Under SP, verl's engine pads the packed sequence to a multiple of the SP size and gives each rank its slice
of the student logits; the processor slices the teacher payload (top-k columns, the exact token column) and
the labels the same way with `verl.utils.ulysses.slice_input_tensor`. Two gloo processes form a real SP
group (slicing needs no all-to-all, which gloo lacks); the concatenated per-rank outputs must equal the
single-process outputs, value for value, for verl's [nnz, K] payload and for the [nnz, K + 1] one.
"""

import os
import tempfile
import types

import pytest
import torch
import torch.distributed as dist
from conftest import start_ranks

pytestmark = pytest.mark.integration

K, V = 4, 40
LENS = [7, 4, 9]  # three packed sequences, 20 tokens: not a multiple of 3 ranks, padding exercised


def _per_token_bounds(zmax: float, dz: float, data: dict) -> dict:
    """Derived fp32 bounds between two evaluations of the per-token outputs (tests/tolerances.py): student-side
    values from logits within dz of each other (|z| <= zmax): the log-prob within eps = log_softmax_bound (sides=2),
    the entropy within entropy_bound, the top-k FKL within eps plus its K-term sums' rounding on ln K + max |log q|;
    teacher-side values (the same inputs on both sides) are sums of <= K + 2 terms of magnitude <= ln V +
    max |teacher log p|, each a few roundings: 2 gamma_{K+6} that."""
    import math

    from tolerances import entropy_bound, fp32_loss_bound, gamma, log_softmax_bound

    eps = log_softmax_bound(zmax, V, dz, sides=2)
    t_lp = data["teacher_logprobs"].values() if data["teacher_logprobs"].is_nested else data["teacher_logprobs"]
    teacher = 2 * gamma(K + 6) * (math.log(V) + float(t_lp[torch.isfinite(t_lp)].abs().max()))
    return {"eopd_logp": eps, "log_probs": eps, "eopd_student_entropy": entropy_bound(eps, math.log(V), V),
            "entropy": entropy_bound(eps, math.log(V), V),
            "eopd_fkl": fp32_loss_bound(eps, 1.0, math.log(K) + 2 * zmax + math.log(V), tokens=1, k=K),
            **{key: teacher for key in ("eopd_topk_mass", "eopd_teacher_entropy", "eopd_teacher_entropy_lower",
                                        "eopd_teacher_entropy_upper", "eopd_in_topk", "eopd_teacher_token_logprob",
                                        "eopd_token_fallback", "teacher_topk_logprobs", "teacher_entropy",
                                        "teacher_token_logprobs")}}


def make_data(token_column: bool):
    g = torch.Generator().manual_seed(0)
    n = sum(LENS)
    ids = torch.randint(1, V, (n,), generator=g)
    t_logp = torch.log_softmax(torch.randn(n, V, generator=g) * 2, -1)
    vals, top = t_logp.topk(K, -1)
    labels = torch.roll(ids, -1)
    offsets = torch.tensor([0, *torch.tensor(LENS).cumsum(0).tolist()])
    if token_column:
        tok = t_logp.gather(-1, labels[:, None])
        col_ids = labels[:, None].clone()
        last = offsets[1:] - 1
        tok[last], col_ids[last] = 0.0, 0  # dummy rows
        vals, top = torch.cat([vals, tok], -1), torch.cat([top, col_ids], -1)
    nested = lambda x: torch.nested.nested_tensor_from_jagged(x, offsets=offsets)  # noqa: E731
    data = {"input_ids": nested(ids), "teacher_logprobs": nested(vals), "teacher_ids": nested(top.int())}
    logits = torch.randn(1, n, V, generator=g)
    return data, logits


def _configs():
    from verl_eopd.integration.config import EOPDLossConfig

    cfg = types.SimpleNamespace(strategy="fsdp2")
    dcfg = types.SimpleNamespace(distillation_loss=EOPDLossConfig(topk=K, teacher_route="server"))
    return cfg, dcfg


def _logits_case(token_column: bool) -> dict:
    """This rank's processor outputs on its slice of the logits (what verl's engine hands the rank)."""
    from verl.utils.ulysses import slice_input_tensor

    from verl_eopd.integration.loss import eopd_logits_processor

    data, logits = make_data(token_column)
    cfg, dcfg = _configs()
    out = eopd_logits_processor(cfg, dcfg, data, slice_input_tensor(logits, dim=1))
    return {k: v.detach() for k, v in out.items()}


@pytest.mark.parametrize("token_column", [False, True])
def test_sp_slices_reassemble_to_the_single_process_output(token_column, sp_ranks):
    from verl_eopd.integration.loss import eopd_logits_processor

    data, logits = make_data(token_column)
    cfg, dcfg = _configs()
    full = eopd_logits_processor(cfg, dcfg, data, logits.clone())
    parts = [p[f"logits_token_column={token_column}"] for p in sp_ranks]
    n = sum(LENS)
    assert set(parts[0]) == set(full)
    # the same logits, sliced: per-row ops on the same values (dz = 0), bounds _per_token_bounds (9.6e-6 log-probs
    # to 6.4e-5 entropies); observed 0
    from tolerances import assert_within

    bounds = _per_token_bounds(float(logits.abs().max()), 0.0, data)
    for key in full:
        got = torch.cat([p[key] for p in parts], dim=1)[:, :n]
        assert_within(got, full[key], bounds[key], key)
    if token_column:
        assert "eopd_token_fallback" in full and float(full["eopd_token_fallback"].sum()) == 0.0


# ------------------------------------------------------------------ from_hidden (distillation_loss.from_hidden)
H = 6


def make_hidden():
    g = torch.Generator().manual_seed(1)
    hidden = torch.randn(1, sum(LENS), H, generator=g)
    weight = torch.randn(V, H, generator=g) * 0.7
    return hidden, weight


def _small_chunks(kernels, setattr_=setattr):
    """Two rows per lm-head chunk, so that every rank's slice spans several chunks."""
    setattr_(kernels, "HIDDEN_MIN_ROWS", 2)
    setattr_(kernels, "TEACHER_HIDDEN_MIN_ROWS", 2)


def _hidden_outputs(data, hidden, weight, cfg, dcfg, rank=None):
    """What the from_hidden actor engine computes for one rank's rows (integration/hidden.py: the EOPD student
    terms, then log pi(y) of verl's log-prob pass from the engine's rolled labels) and the teacher engine's
    stats, plus the gradients of a loss over every differentiable output on h and W. `rank`: the SP rank whose
    slice `hidden` is (None: the whole sequence in one process)."""
    from verl.utils.ulysses import slice_input_tensor

    from verl_eopd.core import kernels
    from verl_eopd.integration.loss import eopd_student_outputs

    h = hidden.squeeze(0).clone().requires_grad_(True)
    w = weight.clone().requires_grad_(True)

    def student_pass(index, _chunk_bytes):
        return kernels.student_logprobs_at_from_hidden(h, w, index, with_entropy=True, chunk_bytes=64)

    out = eopd_student_outputs(cfg, dcfg, data, h.shape[0], V, student_pass)
    rolled = torch.roll(data["input_ids"].values(), -1)[None]  # verl's input_ids_rmpad_rolled, sliced as verl does
    if rank is not None:
        rolled = slice_input_tensor(rolled, dim=1)
    lq, _ = kernels.student_logprobs_at_from_hidden(h, w, rolled[0, :, None].long(), chunk_bytes=64)
    out["log_probs"] = lq[None, :, 0]
    n = sum(LENS)
    rows = torch.arange(h.shape[0]) + (rank or 0) * h.shape[0]  # global row index
    weights = torch.where(rows < n, 0.5 + rows / n, 0.0)[None]  # a loss that tells the rows apart; SP padding: 0
    ((out["eopd_fkl"] + out["eopd_logp"] + out["log_probs"]) * weights).sum().backward()
    teacher = kernels.teacher_stats_from_hidden(h.detach(), w.detach(), rolled[0].long(), K, chunk_bytes=64)
    res = {k: v.detach() for k, v in out.items()}
    res.update({f"teacher_{k}": v[None] for k, v in teacher.items()})
    return res, h.grad, w.grad


def _hidden_case(rank: int) -> dict:
    """This rank's from_hidden outputs and gradients on its slice of the hidden states, as its logits would be
    sliced, with two rows per lm-head chunk (a fresh process: nothing to restore)."""
    from verl.utils.ulysses import slice_input_tensor

    from verl_eopd.core import kernels

    _small_chunks(kernels)
    data, _ = make_data(token_column=False)
    hidden, weight = make_hidden()
    cfg, dcfg = _configs()
    out, gh, gw = _hidden_outputs(data, slice_input_tensor(hidden, dim=1), weight, cfg, dcfg, rank)
    return {"out": out, "gh": gh, "gw": gw}


def _worker(rank: int, world: int, init_file: str, out_file: str) -> None:
    """One rank of a real SP group: every case of this module on this rank's slice, saved for the tests."""
    from verl.utils.ulysses import set_ulysses_sequence_parallel_group

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    set_ulysses_sequence_parallel_group(dist.group.WORLD)
    cases = {f"logits_token_column={column}": _logits_case(column) for column in (False, True)}
    cases["hidden"] = _hidden_case(rank)  # last: it shrinks the kernels' chunks in this process
    torch.save(cases, f"{out_file}.{rank}")
    dist.barrier()
    dist.destroy_process_group()


WORLD = 3  # 20 tokens on 3 ranks: the last rank holds padding


@pytest.fixture(scope="module")
def sp_ranks(tmp_path_factory) -> list:
    """The per-rank outputs of every case, from one 3-process gloo SP group (forked: conftest.start_ranks)."""
    tmp = tmp_path_factory.mktemp("sp")
    fd, init_file = tempfile.mkstemp(dir=tmp)
    os.close(fd)
    os.unlink(init_file)
    start_ranks(_worker, (WORLD, init_file, str(tmp / "out")), WORLD)
    return [torch.load(f"{tmp / 'out'}.{r}") for r in range(WORLD)]


def test_sp_from_hidden_matches_one_process_and_the_logits_path(sp_ranks, monkeypatch):
    """Under Ulysses SP each rank's from_hidden pass sees its slice of the hidden states: the per-rank outputs,
    concatenated, equal the one-process from_hidden outputs and the logits processor's; the per-rank gradients
    on h concatenate to the one-process gradient, and on W they sum to it (FSDP's reduction over the SP group)."""
    from verl_eopd.core import kernels
    from verl_eopd.integration.loss import eopd_logits_processor

    _small_chunks(kernels, monkeypatch.setattr)  # restored after the test
    data, _ = make_data(token_column=False)
    hidden, weight = make_hidden()
    cfg, dcfg = _configs()
    full, gh, gw = _hidden_outputs(data, hidden, weight, cfg, dcfg)
    via_logits = eopd_logits_processor(cfg, dcfg, data, hidden @ weight.T)
    # the logits processor on the full product against the kernels' row chunks: dz = 2 gamma_H sum_k |h_k W_ik|
    # (matmul_abs), then _per_token_bounds (9.8e-6 teacher side, 3.3e-5 log-probs, 1.7e-4 entropies); observed
    # 4.8e-7 at most
    from tolerances import assert_grads_close, assert_within, gamma, matmul_abs

    S = float(matmul_abs(hidden, weight).max())
    bounds = _per_token_bounds(S, 2 * gamma(H) * S, data)
    for key, v in via_logits.items():
        assert_within(full[key], v.detach(), bounds[key], key)
    world = WORLD
    parts = [p["hidden"] for p in sp_ranks]
    n = sum(LENS)
    assert n % world and set(parts[0]["out"]) == set(full)  # 20 tokens on 3 ranks: the last rank holds padding
    # each rank's slice in other row chunks: the same dz and bounds; gradients 2 gamma_{T+V+H} T max|g| (T = 20
    # tokens, + 3 for the sum over ranks on W). Observed 4.8e-7 (outputs), 9.5e-7 (grads: 5e-4 of the bound)
    for key in full:
        got = torch.cat([p["out"][key] for p in parts], dim=1)[:, :n]
        if not got.is_floating_point():  # teacher_topk_ids: integers, exact
            assert torch.equal(got, full[key]), key
            continue
        assert_within(got, full[key], bounds[key], key)
    assert_grads_close({"h": torch.cat([p["gh"] for p in parts])[:n], "w": sum(p["gw"] for p in parts)},
                       {"h": gh, "w": gw}, tokens=n + world, vocab=V, hidden=H)
