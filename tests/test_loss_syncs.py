"""At most one host sync per micro-batch and pass on the EOPD loss path through integration/loss.py (issue 23,
item 3): the logits processor (or, with from_hidden, the lm head's replacement in integration/hidden.py) and the
registered loss of one micro-batch read the device once, none in backward.

What is counted, per pass, by the TorchDispatchMode of tests/test_kernels_gpu_sizing.py (`CountOps`), on real
CPU tensors in verl's micro-batch layout (`rank_worker.to_td`, verl's `left_right_2_no_padding`):
  * the ops that read a device value on CUDA: `aten._local_scalar_dense` (`.item()`, `bool(t)`, `int(t)`,
    `float(t)`), `aten.item`, `is_nonzero`, `equal`; the ops whose output size depends on the data (`nonzero`,
    boolean indexing, `unique`, `masked_select`, `repeat_interleave`): they copy a count to the host;
  * copies to the CPU (`.cpu()`, `.tolist()` of a device tensor).
  * the one read itself: on CPU its copy is CPU to CPU and `.tolist()` dispatches no aten op, so the test counts
    the calls of `HostChecks.read` (the only place the loss path copies values to the host).
Forward: calls of `HostChecks.read` == 1 and no other sync; backward: none of either. verl's own code around the
loss (`distillation_ppo_loss`: `compute_distillation_loss_range`'s boolean index and its `Metric`s' `.item()`,
the engine's `loss.item()`) is verl's and is not run here.
"""

from __future__ import annotations

import types
from functools import partial

import pytest
import torch

from test_kernels_gpu_sizing import CountOps
from verl_eopd.core import kernels

pytestmark = pytest.mark.integration


@pytest.fixture
def reads(monkeypatch):
    """The calls of HostChecks.read (the one host read of a pass), appended to the returned list."""
    from verl_eopd.integration import loss as loss_module

    # a processor call of an earlier test whose loss never ran leaves its checks pending; the next micro-batch
    # reads them first (micro_batch_checks), which would count here: each test starts with none pending
    monkeypatch.setattr(loss_module, "_PENDING", [])
    calls = []
    real = kernels.HostChecks.read

    def read(self, *a, **kw):
        calls.append(self.across_ranks)
        return real(self, *a, **kw)

    monkeypatch.setattr(kernels.HostChecks, "read", read)
    for op in ("_softmax", "_log_softmax"):  # the kernels' once-per-process probes (a host read each, not per pass)
        kernels._fused_in_place(op, torch.zeros(2, 3))
    return calls


def _micro_batch(exact_teacher: bool, token_column: bool = False, temperature=1.0, n: int = 4):
    """verl's no-padding micro-batch of `n` sequences (rank_worker's seeded batch) and the EOPD actor loss."""
    from rank_worker import P, make_batch, to_td
    from verl.utils import tensordict_utils as tu

    batch = {k: v[:n] for k, v in make_batch(seed=3).items()}
    td = to_td(batch, task=False, micro=n, dynamic=False)
    if not exact_teacher:
        for key in ("teacher_entropy", "teacher_token_logprob"):
            td.pop(key)
    if token_column:  # the server payload's column K: the next token and its exact log-prob
        ids, lp = td["teacher_ids"].values(), td["teacher_logprobs"].values()
        nxt = torch.roll(td["input_ids"].values(), -1).unsqueeze(-1)
        col = torch.nested.nested_tensor_from_jagged(torch.cat([ids, nxt], -1), offsets=td["input_ids"].offsets())
        td["teacher_ids"] = col
        td["teacher_logprobs"] = torch.nested.nested_tensor_from_jagged(
            torch.cat([lp, lp[:, :1] - 0.5], -1), offsets=td["input_ids"].offsets())
    tu.assign_non_tensor(td, temperature=temperature)
    assert tu.get_non_tensor_data(data=td, key="max_response_len", default=-1) > 0  # set by verl's conversion
    assert P > 1
    return td


def _loss_fn():
    from rank_worker import loss_fn

    return loss_fn({"entropy_threshold": 5.0})


def _as_model_output(outputs: dict, td) -> dict:
    """The processor's [1, nnz] outputs as verl's engine hands them to the loss: nested per sequence."""
    offsets = td["input_ids"].offsets()
    return {k: torch.nested.nested_tensor_from_jagged(v.squeeze(0), offsets=offsets) for k, v in outputs.items()}


@pytest.mark.parametrize("exact_teacher,token_column", [(True, False), (False, False), (False, True)])
def test_logits_path_reads_once_per_micro_batch(reads, exact_teacher, token_column):
    from rank_worker import V

    from verl_eopd.integration.loss import eopd_distillation_loss

    td = _micro_batch(exact_teacher, token_column)
    fn = _loss_fn()
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(1, td["input_ids"].values().shape[0], V, generator=g, requires_grad=True)
    with CountOps() as c:
        outputs = fn(data=td, student_logits=logits)  # verl's processor call
        model_output = _as_model_output(outputs, td)
        per_token, metrics = eopd_distillation_loss(fn.keywords["config"], fn.keywords["distillation_config"],
                                                    model_output, td)
    assert c.syncs == [] and reads == [True], (c.syncs, reads)  # one read, made across ranks
    assert all(isinstance(v, float) for v in metrics.values()) and 0 < metrics["eopd/gate_frac"] < 1
    with CountOps() as c:
        (per_token * torch.arange(per_token.numel()).reshape(per_token.shape)).sum().backward()
    assert c.syncs == [] and reads == [True], (c.syncs, reads)
    assert logits.grad.abs().sum() > 0


def _hidden_rows(td, *, use_rmpad: bool, H: int = 16, seed: int = 0):
    """The from_hidden actor engine's lm-head replacement (`_rows`) on hidden states of the micro-batch, with the
    EOPD loss bound as verl binds it (a fake engine: `_rows` reads only `_loss_function`)."""
    from rank_worker import V
    from verl.utils import tensordict_utils as tu

    from verl_eopd.integration.hidden import actor_engine_class

    tu.assign_non_tensor(td, use_remove_padding=use_rmpad)
    g = torch.Generator().manual_seed(seed)
    nnz = td["input_ids"].values().shape[0]
    if use_rmpad:
        hidden = torch.randn(1, nnz, H, generator=g)
    else:
        hidden = torch.randn(td["input_ids"].offsets().numel() - 1, 13, H, generator=g)
    hidden.requires_grad_(True)
    weight = (torch.randn(V, H, generator=g) * 0.3).requires_grad_(True)
    engine = types.SimpleNamespace(_loss_function=_loss_fn())
    engine._rows_into = partial(actor_engine_class()._rows_into, engine)
    rows = partial(actor_engine_class()._rows, engine, td, {})
    return rows, hidden, weight, engine._loss_function


@pytest.mark.parametrize("use_rmpad", [True, False])
@pytest.mark.parametrize("temperature", ["float", "tensor"])
def test_from_hidden_path_reads_once_per_micro_batch(reads, use_rmpad, temperature):
    from verl_eopd.integration.loss import eopd_distillation_loss

    td = _micro_batch(exact_teacher=False)
    n = td["input_ids"].offsets().numel() - 1
    if temperature == "tensor":  # verl's per-sample temperatures, all equal: the device flag, no unique()
        td["temperature"] = torch.full((n,), 0.7)
    else:
        from verl.utils import tensordict_utils as tu

        tu.assign_non_tensor(td, temperature=0.7)
    rows, hidden, weight, fn = _hidden_rows(td, use_rmpad=use_rmpad)
    with CountOps() as c:
        out = rows(hidden, weight)
        model_output = _as_model_output({k: v.unsqueeze(0) for k, v in out.items()}, td)
        per_token, metrics = eopd_distillation_loss(fn.keywords["config"], fn.keywords["distillation_config"],
                                                    model_output, td)
    assert c.syncs == [] and reads == [True], (c.syncs, reads)
    assert all(isinstance(v, float) for v in metrics.values())
    with CountOps() as c:
        per_token.sum().backward()
    assert c.syncs == [] and reads == [True], (c.syncs, reads)
    assert hidden.grad.abs().sum() > 0 and weight.grad.abs().sum() > 0


def test_from_hidden_log_prob_pass_reads_once(reads):
    """verl's old-log-prob pass through the from_hidden engine (no top-k distillation): one read of its own."""
    td = _micro_batch(exact_teacher=True)
    from verl.utils import tensordict_utils as tu

    tu.assign_non_tensor(td, distillation_use_topk=False, calculate_entropy=True, distillation_only=False)
    td["temperature"] = torch.full((td["input_ids"].offsets().numel() - 1,), 1.0)
    rows, hidden, weight, _ = _hidden_rows(td, use_rmpad=True)
    output_args = {"input_ids_rmpad_rolled": torch.roll(td["input_ids"].values(), -1).unsqueeze(0)}
    rows = partial(rows.func, *rows.args[:2], output_args)
    with CountOps() as c:
        out = rows(hidden, weight)
    assert c.syncs == [] and reads == [True], (c.syncs, reads)
    assert set(out) == {"log_probs", "entropy"}


# --------------------------------------------------------------------------------------------------
# The same values as before: verl's layout functions as the reference
# --------------------------------------------------------------------------------------------------


def test_response_layout_equals_verls_no_padding_2_padding():
    """`_Responses` (row index found on the device) gives verl's `no_padding_2_padding` values, for nested and flat
    per-token tensors and trailing dims; `_pad_responses` gives `to_padded_tensor`."""
    from verl.workers.utils.padding import no_padding_2_padding

    from verl_eopd.core.kernels import HostChecks
    from verl_eopd.integration.loss import _pad_responses, _Responses

    td = _micro_batch(exact_teacher=True, n=8)
    checks = HostChecks()
    resp = _Responses(td, checks)
    nnz = td["input_ids"].values().shape[0]
    g = torch.Generator().manual_seed(1)
    for t in (torch.randn(nnz, generator=g), torch.randn(nnz, 3, generator=g), td["teacher_entropy"],
              torch.randint(0, 9, (nnz,), generator=g)):
        want = no_padding_2_padding(t, td)
        got = resp(t)
        assert got.dtype == want.dtype and torch.equal(got, want)
    checks.read()  # the asserts verl makes on the host pass as flags
    rows = [torch.arange(3.0), torch.tensor([3.0]), torch.arange(4.0, 8.0)]
    nested = torch.nested.as_nested_tensor(rows, layout=torch.jagged)  # as verl's response_to_nested builds them
    assert torch.equal(_pad_responses(nested, 4, -1.0), nested.to_padded_tensor(-1.0))
    wide = _pad_responses(nested, 6, 0.0)  # verl's max_response_len may exceed the micro-batch's longest
    assert torch.equal(wide[:, :4], nested.to_padded_tensor(0.0)) and not wide[:, 4:].any()


def test_packed_rows_without_remove_padding_equals_the_slices():
    from verl_eopd.integration.hidden import packed_rows

    td = _micro_batch(exact_teacher=True, n=8)
    lens = td["input_ids"].offsets().diff().tolist()
    hidden = torch.randn(len(lens), max(lens) + 2, 5)
    want = torch.cat([hidden[b, :lens[b]] for b in range(len(lens))])
    assert torch.equal(packed_rows(hidden, td, use_rmpad=False), want)


# --------------------------------------------------------------------------------------------------
# Bad input: the checks' own messages, after the one read
# --------------------------------------------------------------------------------------------------


def test_bad_inputs_are_reported_by_their_own_messages_at_the_read(reads):
    from rank_worker import V

    from verl_eopd.integration.loss import eopd_distillation_loss

    fn = _loss_fn()
    cfg = fn.keywords["config"], fn.keywords["distillation_config"]

    def run(td, logits):
        outputs = fn(data=td, student_logits=logits)
        return eopd_distillation_loss(*cfg, _as_model_output(outputs, td), td)

    td = _micro_batch(exact_teacher=True)
    logits = torch.randn(1, td["input_ids"].values().shape[0], V)
    bad = logits.clone()
    bad[0, 5, 3] = float("nan")
    reads.clear()
    with pytest.raises(ValueError, match=r"student_logits holds NaN or \+inf logits at row 5"):
        run(td, bad)
    assert reads == [True]  # the processor added its flag; the loss read it with its own
    td = _micro_batch(exact_teacher=False, token_column=True)
    ids = td["teacher_ids"].values()
    ids[7, -1] = (ids[7, -1] + 1) % V
    with pytest.raises(ValueError, match=r"sampled-token column\) holds token .* at packed row 7"):
        run(td, logits)
    td = _micro_batch(exact_teacher=False)
    n = td["input_ids"].offsets().numel() - 1
    td["temperature"] = torch.tensor([1.0] * (n - 1) + [0.5])
    rows, hidden, weight, fn = _hidden_rows(td, use_rmpad=True)
    reads.clear()
    with pytest.raises(ValueError, match=r"one temperature per micro-batch, got \[0.5, 1.0\]"):
        out = rows(hidden, weight)
        eopd_distillation_loss(*cfg, _as_model_output({k: v.unsqueeze(0) for k, v in out.items()}, td), td)
    assert reads == [True]


def test_a_tensor_temperature_gives_the_float_temperatures_values_and_gradients():
    """verl's per-sample temperatures (a device tensor, all equal) and its host number give the same loss, metrics
    and gradients on the from_hidden path (the kernel divides by the 0-d tensor instead of the number)."""
    from verl.utils import tensordict_utils as tu

    from verl_eopd.integration.loss import eopd_distillation_loss

    res = {}
    for kind in ("float", "tensor"):
        td = _micro_batch(exact_teacher=False)
        if kind == "tensor":
            td["temperature"] = torch.full((td["input_ids"].offsets().numel() - 1,), 0.7)
        else:
            tu.assign_non_tensor(td, temperature=0.7)
        rows, hidden, weight, fn = _hidden_rows(td, use_rmpad=True)
        out = rows(hidden, weight)
        model_output = _as_model_output({k: v.unsqueeze(0) for k, v in out.items()}, td)
        per_token, metrics = eopd_distillation_loss(fn.keywords["config"], fn.keywords["distillation_config"],
                                                    model_output, td)
        per_token.sum().backward()
        res[kind] = per_token.detach(), metrics, hidden.grad, weight.grad
    (a, ma, ha, wa), (b, mb, hb, wb) = res["float"], res["tensor"]
    assert torch.equal(a, b) and ma == mb and torch.equal(ha, hb) and torch.equal(wa, wb)
