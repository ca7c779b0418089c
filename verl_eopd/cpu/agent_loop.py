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

Only for the `hf` rollout backend (its server has `generate_batch`); every other case is verl's path as is.
"""

from __future__ import annotations

import asyncio
from typing import Any, Optional

import ray

from verl.trainer.ppo.v1.agent_loop_tq import AgentLoopManagerTQ, AgentLoopWorkerTQ

from .hf_registry import BACKEND_NAME as BACKEND

MANAGER = "verl_eopd.cpu.agent_loop.CPUAgentLoopManager"
BATCH_WINDOW_S = 0.005  # how long a worker's client collects generate calls before sending them together


class _BatchingClient:
    """An `LLMServerClient` whose text-only `generate` calls are grouped: the calls made within BATCH_WINDOW_S
    reach one server (picked by verl's load balancer once per batch) as one `generate_batch` Ray call. Every
    other attribute is the wrapped client's."""

    def __init__(self, client, window_s: float = BATCH_WINDOW_S):
        self._client, self._window_s = client, window_s
        self._pending: list[tuple[dict, asyncio.Future]] = []
        self._flush: Optional[asyncio.Task] = None  # the batch still collecting calls
        self._in_flight: set[asyncio.Task] = set()

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
        loop = asyncio.get_running_loop()
        future = loop.create_future()
        self._pending.append(({"request_id": self._client._vllm_request_id(request_id), "prompt_ids": prompt_ids,
                               "sampling_params": sampling_params}, future))
        if self._flush is None or self._flush.done():
            self._flush = loop.create_task(self._send())
            self._in_flight.add(self._flush)  # a reference until it ends (the event loop keeps only weak ones)
            self._flush.add_done_callback(self._in_flight.discard)
        return await future

    async def _send(self) -> None:
        await asyncio.sleep(self._window_s)
        batch, self._pending, self._flush = self._pending, [], None  # later calls start the next batch
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


class _LocalRewardHandle:
    """Stands in for a reward-loop worker's Ray handle: `handle.compute_score.remote(data)` runs verl's
    `RewardLoopWorker.compute_score` in this process (an awaitable, as the Ray call is)."""

    def __init__(self, worker):
        self.compute_score = self._Method(worker.compute_score)

    class _Method:
        def __init__(self, fn):
            self.remote = fn


class CPUAgentLoopWorker(AgentLoopWorkerTQ.__ray_actor_class__):
    """verl's TransferQueue agent-loop worker with the three per-response costs above removed."""

    def __init__(self, config, llm_client, teacher_client=None, reward_loop_worker_handles=None):
        super().__init__(config, llm_client, teacher_client, reward_loop_worker_handles)
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
