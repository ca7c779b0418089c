"""The CPU agent-loop worker's TransferQueue writes and the trainer's wait for rollouts (cpu/agent_loop.py,
integration/trainer.py): batched puts store what verl's one-call-per-response puts store, verl's own writing
methods run with only their TransferQueue names rebound, and the replay buffer waits instead of polling."""

from __future__ import annotations

import asyncio

import pytest
import torch

from conftest import local_ray
from verl_eopd.cpu import agent_loop

pytestmark = pytest.mark.integration


@pytest.fixture()
def run():
    loop = asyncio.new_event_loop()
    yield loop.run_until_complete
    loop.close()


class FakeTQ:
    """Records every `async_kv_batch_put` / `async_kv_put` it receives; fails the calls naming `fail_key`."""

    def __init__(self, fail_key=None):
        self.calls: list[dict] = []
        self.fail_key = fail_key

    async def async_kv_batch_put(self, keys, partition_id, fields=None, tags=None, data_parser=None):
        await asyncio.sleep(0)
        self.calls.append({"op": "batch", "keys": list(keys), "partition": partition_id, "fields": fields,
                           "tags": tags, "parser": data_parser})
        if self.fail_key in keys:
            raise RuntimeError(f"storage refused {self.fail_key}")
        return ("meta", tuple(keys))

    async def async_kv_put(self, key, partition_id, fields=None, tag=None, data_parser=None):
        self.calls.append({"op": "single", "keys": [key], "partition": partition_id, "fields": fields, "tag": tag})
        return ("meta", (key,))

    def kv_list(self, partition_id):  # any other attribute is the module's
        return {"listed": partition_id}


def rows(key: str, length: int) -> list[dict]:
    return [{"input_ids": torch.arange(length), "score": float(length), "uid": key}]


def test_concurrent_puts_go_out_as_one_put_per_partition_and_kind(run):
    """Status tags and response rows written by concurrent rollouts within the window: one tag-only put and one
    field put per partition, the rows turned into one TensorDict by verl's list_of_dict_to_tensordict, every
    caller answered with its batch's result; a later call starts the next batch."""
    from verl.utils.tensordict_utils import list_of_dict_to_tensordict

    fake = FakeTQ()
    batcher = agent_loop._PutBatcher(fake, list_of_dict_to_tensordict, window_s=0.01)

    async def scenario():
        first = await asyncio.gather(
            batcher.async_kv_put(key="u1", partition_id="train", tag={"status": "running"}),
            batcher.async_kv_put(key="u2", partition_id="train", tag={"status": "running"}),
            batcher.async_kv_batch_put(keys=["u1_0_0"], partition_id="train", fields=agent_loop._Rows(rows("u1", 3)),
                                       tags=[{"status": "success", "seq_len": 3}]),
            batcher.async_kv_batch_put(keys=["u2_0_0"], partition_id="train", fields=agent_loop._Rows(rows("u2", 5)),
                                       tags=[{"status": "success", "seq_len": 5}]),
            batcher.async_kv_put(key="v1", partition_id="val", tag={"status": "running"}),
        )
        second = await batcher.async_kv_put(key="u1", partition_id="train", tag={"status": "finished"})
        return first, second

    first, second = run(scenario())
    by_kind = {(c["partition"], c["fields"] is None): c for c in fake.calls[:3]}
    assert len(fake.calls) == 4 and len(by_kind) == 3
    tags = by_kind[("train", True)]
    assert tags["keys"] == ["u1", "u2"] and tags["tags"] == [{"status": "running"}] * 2
    data = by_kind[("train", False)]
    assert data["keys"] == ["u1_0_0", "u2_0_0"] and [t["seq_len"] for t in data["tags"]] == [3, 5]
    td = data["fields"]
    assert td.batch_size[0] == 2 and td["input_ids"].is_nested  # verl's builder: rows of unequal length -> jagged
    assert [t.tolist() for t in td["input_ids"].unbind()] == [[0, 1, 2], [0, 1, 2, 3, 4]]
    assert list(td["uid"]) == ["u1", "u2"] and list(td["score"]) == [3.0, 5.0]
    assert by_kind[("val", True)]["keys"] == ["v1"]
    assert first[0] == first[1] == ("meta", ("u1", "u2")) and first[2] == ("meta", ("u1_0_0", "u2_0_0"))
    assert fake.calls[3]["keys"] == ["u1"] and fake.calls[3]["tags"] == [{"status": "finished"}]
    assert second == ("meta", ("u1",))
    assert batcher.kv_list("train") == {"listed": "train"}


def test_a_key_twice_in_one_window_is_written_after_the_first(run):
    from verl.utils.tensordict_utils import list_of_dict_to_tensordict

    fake = FakeTQ()
    batcher = agent_loop._PutBatcher(fake, list_of_dict_to_tensordict, window_s=0.01)

    async def scenario():
        await asyncio.gather(batcher.async_kv_put(key="u1", partition_id="train", tag={"status": "running"}),
                             batcher.async_kv_put(key="u2", partition_id="train", tag={"status": "running"}),
                             batcher.async_kv_put(key="u1", partition_id="train", tag={"status": "finished"}))

    run(scenario())
    assert [(c["keys"], c["tags"]) for c in fake.calls] == [
        (["u1", "u2"], [{"status": "running"}] * 2), (["u1"], [{"status": "finished"}])]


def test_every_caller_of_a_failed_put_gets_its_error_and_the_rest_are_written(run):
    from verl.utils.tensordict_utils import list_of_dict_to_tensordict

    fake = FakeTQ(fail_key="u2_0_0")
    batcher = agent_loop._PutBatcher(fake, list_of_dict_to_tensordict, window_s=0.01)

    async def scenario():
        return await asyncio.gather(
            batcher.async_kv_batch_put(keys=["u1_0_0"], partition_id="train", fields=agent_loop._Rows(rows("u1", 2)),
                                       tags=[{}]),
            batcher.async_kv_batch_put(keys=["u2_0_0"], partition_id="train", fields=agent_loop._Rows(rows("u2", 2)),
                                       tags=[{}]),
            batcher.async_kv_put(key="u3", partition_id="train", tag={"status": "running"}),
            return_exceptions=True)

    first, second, third = run(scenario())
    assert isinstance(first, RuntimeError) and isinstance(second, RuntimeError) and "u2_0_0" in str(first)
    assert third == ("meta", ("u3",))  # another kind, another put


def test_calls_the_batcher_cannot_merge_go_through_unchanged(run):
    """A data parser, a TensorDict built elsewhere, or a field put with `async_kv_put` are the module's own calls."""
    from tensordict import TensorDict
    from verl.utils.tensordict_utils import list_of_dict_to_tensordict

    fake = FakeTQ()
    batcher = agent_loop._PutBatcher(fake, list_of_dict_to_tensordict, window_s=0.01)
    td = TensorDict({"x": torch.ones(1, 2)}, batch_size=[1])
    parser = lambda d: d  # noqa: E731

    async def scenario():
        await batcher.async_kv_batch_put(keys=["a"], partition_id="train", fields=td, tags=[{}])
        await batcher.async_kv_batch_put(keys=["b"], partition_id="train", fields=agent_loop._Rows(rows("b", 2)),
                                         tags=[{}], data_parser=parser)
        await batcher.async_kv_put(key="c", partition_id="train", fields={"x": torch.ones(2)}, tag={"s": 1})

    run(scenario())
    assert [c["op"] for c in fake.calls] == ["batch", "batch", "single"]
    assert fake.calls[0]["fields"] is td
    assert fake.calls[1]["parser"] is parser and fake.calls[1]["fields"]["input_ids"].shape == (1, 2)
    with pytest.raises(ValueError, match="2 keys for 1 rows"):
        run(batcher.async_kv_batch_put(keys=["d", "e"], partition_id="train", fields=agent_loop._Rows(rows("d", 2))))


def test_the_worker_runs_verls_own_writing_methods_with_only_their_transfer_queue_names_rebound():
    """`_rebound` keeps verl's code, defaults and every other global; names a function does not use are not
    added, and a function that uses none of them is left to verl (a changed verl keeps working unbatched)."""
    from verl.trainer.ppo.v1 import agent_loop_tq

    verl_worker = agent_loop_tq.AgentLoopWorkerTQ.__ray_actor_class__
    marker, rows_cls = object(), agent_loop._Rows
    for name in agent_loop.PUT_METHODS:
        original = getattr(verl_worker, name)
        copy = agent_loop._rebound(original, tq=marker, list_of_dict_to_tensordict=rows_cls)
        assert copy is not None and copy.__code__ is original.__code__ and copy.__qualname__ == original.__qualname__
        assert copy.__globals__["tq"] is marker and copy.__globals__["torch"] is torch
        uses_builder = "list_of_dict_to_tensordict" in original.__code__.co_names
        assert (copy.__globals__["list_of_dict_to_tensordict"] is rows_cls) == uses_builder
        assert original.__globals__["tq"] is not marker  # verl's module is untouched
    assert "list_of_dict_to_tensordict" in verl_worker._agent_loop_postprocess.__code__.co_names
    assert agent_loop._rebound(verl_worker.generate_sequences, list_of_dict_to_tensordict=rows_cls) is None


@pytest.fixture(scope="module")
def transfer_queue():
    import transfer_queue as tq
    from omegaconf import OmegaConf

    with local_ray(num_cpus=4):
        tq.init(OmegaConf.create({"backend": {"SimpleStorage": {"num_data_storage_units": 1}}}))
        yield tq
        tq.close()


def verl_like_rows(n: int) -> list[dict]:
    """Per-response dicts of the kinds verl's post-processing writes: variable-length int and float tensors,
    scalars, strings, dicts and None."""
    g = torch.Generator().manual_seed(0)
    out = []
    for i in range(n):
        p, r = 3 + i % 4, 1 + (5 * i) % 7
        prompts, responses = torch.randint(0, 50, (p,), generator=g), torch.randint(0, 50, (r,), generator=g)
        input_ids = torch.cat([prompts, responses])
        out.append({"prompts": prompts, "responses": responses, "response_mask": torch.ones(r, dtype=torch.int64),
                    "input_ids": input_ids, "position_ids": torch.arange(p + r),
                    "attention_mask": torch.ones_like(input_ids), "rollout_log_probs": -torch.rand(r, generator=g),
                    "reward_score": float(i % 2), "num_turns": 2, "uid": f"u{i}", "index": i,
                    "extra_fields": {"reward_extra_info": {"acc": float(i % 2)}, "global_steps": 1},
                    "multi_modal_inputs": None, "raw_prompt": [{"role": "user", "content": f"q{i}"}]})
    return out


def test_batched_puts_read_back_as_verls_one_put_per_response(transfer_queue, run):
    """Through a real TransferQueue (controller and storage unit as Ray actors): the same responses written
    verl's way (one `async_kv_batch_put` of one row each, status tags one `async_kv_put` each) and through the
    batcher from concurrent callers read back identical, field by field and tag by tag."""
    from verl.utils.tensordict_utils import list_of_dict_to_tensordict

    tq, n = transfer_queue, 12
    data = verl_like_rows(n)
    keys = [f"u{i}_0_0" for i in range(n)]
    tags = [{"status": "success", "seq_len": int(d["input_ids"].numel()), "global_steps": 1} for d in data]
    batcher = agent_loop._PutBatcher(tq, list_of_dict_to_tensordict)

    async def verl_way():
        for i in range(n):
            await tq.async_kv_put(key=f"u{i}", partition_id="verl", tag={"status": "running"})
            await tq.async_kv_batch_put(keys=[keys[i]], partition_id="verl",
                                        fields=list_of_dict_to_tensordict([data[i]]), tags=[tags[i]])

    async def one(i):
        await batcher.async_kv_put(key=f"u{i}", partition_id="ours", tag={"status": "running"})
        await asyncio.sleep(0.002 * (i % 3))  # rollouts end at different times: several batches
        await batcher.async_kv_batch_put(keys=[keys[i]], partition_id="ours",
                                         fields=agent_loop._Rows([data[i]]), tags=[tags[i]])

    async def batched():
        await asyncio.gather(*(one(i) for i in range(n)))

    run(verl_way())
    run(batched())
    listed = {p: tq.kv_list(p)[p] for p in ("verl", "ours")}
    assert listed["verl"] == listed["ours"] and len(listed["ours"]) == 2 * n  # every key, every tag
    ref, ours = (tq.kv_batch_get(keys=keys, partition_id=p) for p in ("verl", "ours"))
    assert set(ref.keys()) == set(ours.keys()) == set(data[0])
    for field in data[0]:
        a, b = ref[field], ours[field]
        if isinstance(a, torch.Tensor):
            assert a.is_nested == b.is_nested and a.dtype == b.dtype, field
            pairs = zip(a.unbind(), b.unbind()) if a.is_nested else [(a, b)]
            assert all(torch.equal(x, y) for x, y in pairs), field
        else:
            assert list(a) == list(b), field
    assert [t.tolist() for t in ours["input_ids"].unbind()] == [d["input_ids"].tolist() for d in data]


def test_cpu_worker_wait_idle_returns_when_every_dispatched_rollout_has_ended(run):
    """`wait_idle` waits for rollouts started before it and for those they start meanwhile, and returns (does not
    raise) when one fails: verl's `_run_prompt` records failures in TransferQueue itself."""
    from verl_eopd.cpu import agent_loop

    worker = agent_loop.CPUAgentLoopWorker.__new__(agent_loop.CPUAgentLoopWorker)
    worker.background_tasks = set()
    ended: list[str] = []

    def start(name, delay, fail=False, then=None):
        async def rollout():
            await asyncio.sleep(delay)
            if then is not None:
                start(*then)
            ended.append(name)
            if fail:
                raise RuntimeError(name)
        task = asyncio.get_running_loop().create_task(rollout())
        worker.background_tasks.add(task)
        task.add_done_callback(worker.background_tasks.discard)  # as verl's generate_sequences does

    async def scenario():
        start("a", 0.02)
        start("b", 0.01, fail=True)
        start("c", 0.01, then=("d", 0.05))  # started by a running one, after wait_idle began
        await worker.wait_idle()
        return sorted(ended), len(worker.background_tasks)

    assert run(scenario()) == (["a", "b", "c", "d"], 0)


def test_the_replay_buffer_waits_for_a_manager_that_can_say_its_rollouts_ended(monkeypatch):
    """EOPDTrainer's replay buffer: with the CPU manager (`wait_idle`) every `sample` (training and validation)
    first waits for the dispatched rollouts, so its first listing finds them; verl's manager (no `wait_idle`)
    is polled as verl does. poll_interval still comes from the config (the refill path polls)."""
    from omegaconf import OmegaConf
    from verl.trainer.ppo.v1.trainer_sync import PPOTrainerSync

    from verl_eopd.integration.trainer import EOPDTrainer

    calls: list = []

    class Buffer:
        poll_interval = 2.0

        def sample(self, **kw):
            calls.append(("sample", kw["partition_id"]))
            return "batch"

    monkeypatch.setattr(PPOTrainerSync, "_build_replay_buffer", lambda self: Buffer())
    trainer = EOPDTrainer.__new__(EOPDTrainer)
    trainer.config = OmegaConf.create({"trainer": {"v1": {"sampler": {"sampler_kwargs": {"poll_interval": 0.05}}}}})
    buffer = trainer._build_replay_buffer()
    assert buffer.poll_interval == 0.05 and trainer.trainer_mode == "sync"

    class CPUManager:
        def wait_idle(self):
            calls.append(("wait_idle", None))

    trainer.agent_loop_manager = CPUManager()
    assert buffer.sample(global_steps=1, partition_id="train", batch_size=4) == "batch"
    assert buffer.sample(global_steps=1, partition_id="val", batch_size=4) == "batch"
    assert calls == [("wait_idle", None), ("sample", "train"), ("wait_idle", None), ("sample", "val")]
    calls.clear()
    trainer.agent_loop_manager = object()  # verl's manager: no wait_idle
    assert buffer.sample(global_steps=2, partition_id="train", batch_size=4) == "batch"
    assert calls == [("sample", "train")]
