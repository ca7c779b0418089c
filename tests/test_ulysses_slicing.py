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
import torch.multiprocessing as mp

pytestmark = pytest.mark.integration

K, V = 4, 40
LENS = [7, 4, 9]  # three packed sequences, 20 tokens: not a multiple of 3 ranks, padding exercised


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


def _worker(rank, world, init_file, token_column, out_file):
    from verl.utils.ulysses import set_ulysses_sequence_parallel_group, slice_input_tensor

    from verl_eopd.integration.loss import eopd_logits_processor

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    set_ulysses_sequence_parallel_group(dist.group.WORLD)
    data, logits = make_data(token_column)
    local = slice_input_tensor(logits, dim=1)  # what verl's engine hands this rank
    cfg, dcfg = _configs()
    out = eopd_logits_processor(cfg, dcfg, data, local)
    torch.save({k: v.detach() for k, v in out.items()}, f"{out_file}.{rank}")
    dist.barrier()
    dist.destroy_process_group()


@pytest.mark.parametrize("token_column", [False, True])
def test_sp_slices_reassemble_to_the_single_process_output(token_column, tmp_path):
    from verl_eopd.integration.loss import eopd_logits_processor

    data, logits = make_data(token_column)
    cfg, dcfg = _configs()
    full = eopd_logits_processor(cfg, dcfg, data, logits.clone())
    world = 3
    fd, init_file = tempfile.mkstemp(dir=tmp_path)
    os.close(fd)
    os.unlink(init_file)
    mp.start_processes(_worker, args=(world, init_file, token_column, str(tmp_path / "out")), nprocs=world,
                       join=True, start_method="spawn")
    parts = [torch.load(f"{tmp_path / 'out'}.{r}") for r in range(world)]
    n = sum(LENS)
    assert set(parts[0]) == set(full)
    for key in full:
        got = torch.cat([p[key] for p in parts], dim=1)[:, :n]
        torch.testing.assert_close(got, full[key], atol=1e-6, rtol=1e-6, msg=lambda m, key=key: f"{key}: {m}")
    if token_column:
        assert "eopd_token_fallback" in full and float(full["eopd_token_fallback"].sum()) == 0.0
