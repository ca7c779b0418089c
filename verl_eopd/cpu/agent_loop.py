"""verl's agent-loop manager for CPU runs, with less per-response cross-process work.

On a GPU the response tokens dominate a rollout; on a 2-core CPU with the embedded tiny pair, verl's per-response
bookkeeping does (docs/cpu.md profiles a step). For every response verl's `AgentLoopWorkerTQ` builds an agent
loop through `hydra.utils.instantiate` (an OmegaConf merge of its arguments), makes three Ray calls to reach the
generation server (load balancer acquire, `generate`, release) and one to a reward-loop worker process. This
module keeps verl's agent loops, post-processing, TransferQueue writes and teacher route unchanged and removes
those costs, through verl's documented door (`actor_rollout_ref.rollout.agent.agent_loop_manager_class`, read by
verl's `TaskRunnerV1`; the CPU settings name `CPUAgentLoopManager`):

    agent loop      the registered class is constructed directly when its registry entry is only a `_target_`
                    (verl's own single-turn and tool loops); any other entry goes through verl's instantiate
    generate        `_BatchingClient`: the `generate` calls that one worker's agent loops make within a few
                    milliseconds go to one server as one `generate_batch` call (one acquire/release of the load
                    balancer per batch); each request keeps its own sampling parameters and output
    reward          rule-based rewards (no reward model) run in the agent-loop worker's own process in verl's
                    `RewardLoopWorker` (same reward manager and function), instead of a Ray call per response
    TransferQueue   `_PutBatcher`: the puts that one worker's concurrent rollouts make within a few milliseconds
                    (each response's fields, each prompt's status tags) go to TransferQueue as one
                    `async_kv_batch_put` per partition and kind, not one controller round trip and storage put
                    per call. verl's two writing methods (PUT_METHODS) run as they are, bound on the worker
                    instance with their module names `tq` and `list_of_dict_to_tensordict` read from the batcher
                    (`_rebound`): nothing of verl's is changed, and a patch of verl's module would not reach them
                    (Ray sends verl's worker class to the worker process by value, with its own globals)
    wait            `wait_idle` returns when every rollout dispatched so far has ended, so the trainer's replay
                    buffer can wait for them in one Ray call instead of listing the TransferQueue partition
                    every poll_interval while they run (integration/trainer.py; each listing decodes every
                    key's tags in the TaskRunner and the controller: most of the TaskRunner's CPU time in
                    generation, and more the slower the host, since the polls follow the wall clock)

The batched `generate` is for the `hf` rollout backend only (its server has `generate_batch`); the rest holds for
every CPU run. On GPUs all of this is verl's path as is.
"""

from __future__ import annotations

import asyncio
import types
from typing import Any, NamedTuple, Optional

import ray
import transfer_queue as tq

from verl.trainer.ppo.v1.agent_loop_tq import AgentLoopManagerTQ, AgentLoopWorkerTQ
from verl.utils.tensordict_utils import list_of_dict_to_tensordict

from .hf_registry import BACKEND_NAME as BACKEND

MANAGER = "verl_eopd.cpu.agent_loop.CPUAgentLoopManager"
BATCH_WINDOW_S = 0.005  # how long a worker's client collects generate calls (or puts) before sending them together
# verl's worker methods that write to TransferQueue (through the module names `tq`, `list_of_dict_to_tensordict`)
PUT_METHODS = ("_run_prompt", "_agent_loop_postprocess")


class _Window:
    """Collects the calls made within `window_s` (`_pending`) and hands them to `_send` together: the first call
    of a window schedules it, later calls join it until it starts."""

    def __init__(self, window_s: float):
        self._window_s = window_s
        self._pending: list = []
        self._flush: Optional[asyncio.Task] = None  # the batch still collecting calls
        self._in_flight: set[asyncio.Task] = set()

    def _schedule(self) -> None:
        if self._pending and (self._flush is None or self._flush.done()):
            self._flush = asyncio.get_running_loop().create_task(self._send())
            self._in_flight.add(self._flush)  # a reference until it ends (the event loop keeps only weak ones)
            self._flush.add_done_callback(self._in_flight.discard)

    async def _take(self) -> list:
        """Waits out the window, then takes its calls (later calls start the next window)."""
        await asyncio.sleep(self._window_s)
        pending, self._pending, self._flush = self._pending, [], None
        return pending

    async def _send(self) -> None:
        raise NotImplementedError


class _BatchingClient(_Window):
    """An `LLMServerClient` whose text-only `generate` calls are grouped: the calls made within BATCH_WINDOW_S
    reach one server (picked by verl's load balancer once per batch) as one `generate_batch` Ray call. Every
    other attribute is the wrapped client's."""

    def __init__(self, client, window_s: float = BATCH_WINDOW_S):
        super().__init__(window_s)
        self._client = client

    def __getattr__(self, name):
        return getattr(self._client, name)

    async def generate(self, request_id, *, prompt_ids: list[int], sampling_params: dict[str, Any],
                       image_data=None, video_data=None, audio_data=None, mm_processor_kwargs=None, **kwargs):
        kwargs.pop("mm_processor_output", None)
        kwargs.pop("priority", None)  # verl forwards priority to vLLM only
        if image_data or video_data or audio_data or kwargs:
            return await self._client.generate(request_id, prompt_ids=prompt_ids, sampling_params=sampling_params,
                                               image_data=image_data, video_data=video_data,
                                               audio_data=audio_data, mm_processor_kwargs=mm_processor_kwargs,
                                               **kwargs)
        future = asyncio.get_running_loop().create_future()
        self._pending.append(({"request_id": self._client._vllm_request_id(request_id), "prompt_ids": prompt_ids,
                               "sampling_params": sampling_params}, future))
        self._schedule()
        return await future

    async def _send(self) -> None:
        batch = await self._take()
        request_id = batch[0][0]["request_id"]
        try:
            server_id, server = await self._client._acquire_server(request_id)
            try:
                outputs = await server.generate_batch.remote([request for request, _ in batch])
            finally:
                self._client._release_server(server_id, request_id=request_id)
        except BaseException as e:  # every waiter gets the error
            for _, future in batch:
                if not future.done():
                    future.set_exception(e)
            return
        for (_, future), output in zip(batch, outputs, strict=True):
            steps = output.extra_fields.get("global_steps")  # as verl's LLMServerClient.generate
            output.extra_fields.setdefault("min_global_steps", steps)
            output.extra_fields.setdefault("max_global_steps", steps)
            if not future.done():
                future.set_result(output)


class _Rows:
    """The per-sample dicts verl's post-processing hands to `list_of_dict_to_tensordict` for one put, kept as
    they are so that `_PutBatcher` builds one TensorDict for all the puts it sends together."""

    def __init__(self, rows: list[dict]):
        self.rows = rows

    @property
    def batch_size(self) -> tuple[int]:  # what transfer_queue checks against the keys
        return (len(self.rows),)


class _Put(NamedTuple):
    """One call waiting in `_PutBatcher`: its partition, keys, rows (None for a tag-only put), tags, and the
    future its caller awaits."""
    partition_id: str
    keys: list[str]
    rows: Optional[_Rows]
    tags: Optional[list[dict]]
    future: asyncio.Future


class _PutBatcher(_Window):
    """Stands in for the `transfer_queue` module in verl's `agent_loop_tq` within a CPU agent-loop worker.

    verl's worker writes every response with its own `async_kv_batch_put` (one key) and every prompt's status
    with `async_kv_put` (one tag): each is a controller round trip to create or find the key, then a storage
    put or a tag update. Here the calls that arrive within `window_s` go out together: the tag-only puts of a
    partition as one `async_kv_batch_put(keys, tags=...)`, the field puts of a partition (their rows, `_Rows`)
    as one `async_kv_batch_put` whose TensorDict verl's own `list_of_dict_to_tensordict` builds from all their
    rows. TransferQueue stores each key's fields and tags as it would from one call per key.

    Order: every call waits for its own batch, so the calls in one batch come from rollouts running
    concurrently, whose writes have no order between them; a key seen twice in one window (never in verl's
    worker: a prompt's status puts are sequential) goes to the next batch, after the first. Each caller gets
    its batch's error, or the merged put's KVBatchMeta (verl's worker does not read it). Every other
    attribute, and any call with a `data_parser`, is the module's own."""

    def __init__(self, tq, to_tensordict, window_s: float = BATCH_WINDOW_S):
        super().__init__(window_s)
        self._tq, self._to_tensordict = tq, to_tensordict  # _pending: _Put

    def __getattr__(self, name):
        return getattr(self._tq, name)

    async def async_kv_put(self, key: str, partition_id: str, fields=None, tag: Optional[dict] = None,
                           data_parser=None):
        if fields is not None or data_parser is not None or tag is None:
            return await self._tq.async_kv_put(key=key, partition_id=partition_id, fields=fields, tag=tag,
                                               data_parser=data_parser)
        return await self._enqueue(partition_id, [key], None, [tag])

    async def async_kv_batch_put(self, keys: list[str], partition_id: str, fields=None,
                                 tags: Optional[list[dict]] = None, data_parser=None):
        if data_parser is not None or (fields is not None and not isinstance(fields, _Rows)) or \
                (fields is None and tags is None):
            if isinstance(fields, _Rows):
                fields = self._to_tensordict(fields.rows)
            return await self._tq.async_kv_batch_put(keys=keys, partition_id=partition_id, fields=fields,
                                                     tags=tags, data_parser=data_parser)
        if fields is not None and len(fields.rows) != len(keys):
            raise ValueError(f"{len(keys)} keys for {len(fields.rows)} rows of fields")
        return await self._enqueue(partition_id, list(keys), fields, None if tags is None else list(tags))

    async def _enqueue(self, partition_id, keys, rows, tags):
        future = asyncio.get_running_loop().create_future()
        self._pending.append(_Put(partition_id, keys, rows, tags, future))
        self._schedule()
        return await future

    async def _send(self) -> None:
        pending = await self._take()
        groups: dict[tuple, tuple[list, set]] = {}
        for call in pending:
            kind = None if call.rows is None else frozenset(call.rows.rows[0]) if call.rows.rows else frozenset()
            calls, seen = groups.setdefault((call.partition_id, kind, call.tags is None), ([], set()))
            if seen.intersection(call.keys):
                self._pending.append(call)  # the same key twice in one window: in the next batch
                continue
            calls.append(call)
            seen.update(call.keys)
        self._schedule()
        await asyncio.gather(*(self._put(calls) for calls, _ in groups.values()))

    async def _put(self, group: list[_Put]) -> None:
        """One `async_kv_batch_put` for calls of one partition and kind (all with rows or none, all with tags
        or none)."""
        first = group[0]
        keys = [key for call in group for key in call.keys]
        tags = None if first.tags is None else [tag for call in group for tag in call.tags]
        try:
            fields = None if first.rows is None else self._to_tensordict([r for call in group for r in call.rows.rows])
            meta = await self._tq.async_kv_batch_put(keys=keys, partition_id=first.partition_id, fields=fields,
                                                     tags=tags)
        except BaseException as e:  # every waiter gets the error
            for call in group:
                if not call.future.done():
                    call.future.set_exception(e)
            return
        for call in group:
            if not call.future.done():
                call.future.set_result(meta)


def _rebound(function, **names):
    """verl's `function` (its code, defaults and closure unchanged) reading those of `names` that its code uses
    from `names` instead of its module; None when it uses none of them."""
    used = {name: value for name, value in names.items() if name in function.__code__.co_names}
    if not used:
        return None
    copy = types.FunctionType(function.__code__, {**function.__globals__, **used}, function.__name__,
                              function.__defaults__, function.__closure__)
    copy.__kwdefaults__, copy.__qualname__, copy.__doc__ = function.__kwdefaults__, function.__qualname__, function.__doc__
    return copy


class _LocalRewardHandle:
    """Stands in for a reward-loop worker's Ray handle: `handle.compute_score.remote(data)` runs verl's
    `RewardLoopWorker.compute_score` in this process (an awaitable, as the Ray call is)."""

    def __init__(self, worker):
        self.compute_score = self._Method(worker.compute_score)

    class _Method:
        def __init__(self, fn):
            self.remote = fn


class CPUAgentLoopWorker(AgentLoopWorkerTQ.__ray_actor_class__):
    """verl's TransferQueue agent-loop worker with the per-response costs above removed."""

    def __init__(self, config, llm_client, teacher_client=None, reward_loop_worker_handles=None):
        super().__init__(config, llm_client, teacher_client, reward_loop_worker_handles)
        # verl's post-processing and status writes, reading TransferQueue through this worker's `_PutBatcher`
        batcher = _PutBatcher(tq, list_of_dict_to_tensordict)
        for name in PUT_METHODS:
            method = _rebound(getattr(AgentLoopWorkerTQ.__ray_actor_class__, name), tq=batcher,
                              list_of_dict_to_tensordict=_Rows)
            if method is not None:
                setattr(self, name, types.MethodType(method, self))
        if config.actor_rollout_ref.rollout.name == BACKEND:
            self.llm_client = _BatchingClient(self.llm_client)
        if reward_loop_worker_handles is not None and not config.reward.reward_model.enable:
            from verl.experimental.reward_loop.reward_loop import RewardLoopWorker

            self.reward_loop_worker_handles = [_LocalRewardHandle(RewardLoopWorker(config))]
        self._loop_classes: dict[str, Optional[type]] = {}

    def _direct_class(self, agent_name: str) -> Optional[type]:
        """The registered class when the registry entry is only a `_target_` (else None: verl instantiates)."""
        if agent_name not in self._loop_classes:
            from hydra.utils import get_class

            from verl.experimental.agent_loop.agent_loop import _agent_loop_registry

            entry = _agent_loop_registry.get(agent_name)
            simple = entry is not None and set(entry.keys()) == {"_target_"}
            self._loop_classes[agent_name] = get_class(entry["_target_"]) if simple else None
        return self._loop_classes[agent_name]

    async def wait_idle(self) -> None:
        """Returns once every rollout this worker has started (`generate_sequences`) has ended, failed or not
        (verl's `_run_prompt` records a failure in TransferQueue and does not raise)."""
        while self.background_tasks:
            await asyncio.gather(*list(self.background_tasks), return_exceptions=True)

    async def _run_agent_loop(self, sampling_params, trajectory, *, agent_name: str, trace: bool = True, **kwargs):
        cls = self._direct_class(agent_name)
        if cls is None:
            return await super()._run_agent_loop(sampling_params, trajectory, agent_name=agent_name, trace=trace,
                                                 **kwargs)
        from verl.experimental.agent_loop.agent_loop import DictConfigWrap, ToolListWrap
        from verl.utils.rollout_trace import rollout_trace_attr

        with rollout_trace_attr(step=trajectory["step"], sample_index=trajectory["sample_index"],
                                rollout_n=trajectory["rollout_n"], validate=trajectory["validate"],
                                name="agent_loop", trace=trace):
            agent_loop = cls(trainer_config=DictConfigWrap(config=self.config), server_manager=self.llm_client,
                             tokenizer=self.tokenizer, processor=self.processor, hf_model_type=self.hf_model_type,
                             dataset_cls=self.dataset_cls, data_config=DictConfigWrap(self.config.data),
                             tools=ToolListWrap(self.tools))
            output = await agent_loop.run(sampling_params, **kwargs)
            return await self._agent_loop_postprocess(output, trajectory["validate"], **kwargs)


class CPUAgentLoopManager(AgentLoopManagerTQ):
    """verl's TransferQueue agent-loop manager, with `CPUAgentLoopWorker` as its workers."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.agent_loop_workers_class = ray.remote(CPUAgentLoopWorker)

    def wait_idle(self) -> None:
        """Blocks until every worker's dispatched rollouts have ended (`CPUAgentLoopWorker.wait_idle`)."""
        ray.get([worker.wait_idle.remote() for worker in self.agent_loop_workers])
