"""`hf`: a Hugging Face transformers rollout backend for verl 0.9.1, so `main_ppo` generates on CPU.

Registered in verl's rollout registries by cpu/hf_registry.py (the plugin's set-up calls it in every
process):

    agent loop --generate(prompt_ids, sampling_params)--> load balancer --> HFRolloutServer (Ray actor)
    actor worker --update_weights(named tensors)--> HFServerAdapter --buckets (Ray call)--> HFRolloutServer

The server is token-in / token-out with vLLM's semantics as verl uses them (max_tokens default, greedy at
temperature 0, top_k -1 = off, EOS kept in the output, log-probs of the sampled tokens, the teacher's
`prompt_logprobs` layout). Concurrent requests with equal sampling parameters are micro-batched into one
left-padded `model.generate`. World size 1 only (no TP/DP/PP), text only, no LoRA-adapter sync, no real
abort (the sync trainer never aborts), no HTTP endpoint.

Import cost: this module imports only verl's rollout base/replica modules and never verl's engines, so
importing it does not resolve verl's device platform; transformers models and Ray scheduling helpers are
imported when a server or replica is built.
"""

from __future__ import annotations

import asyncio
import logging
import os
import threading
from typing import Any, Generator, Optional

import ray
import torch

from verl.workers.rollout.base import BaseRollout
from verl.workers.rollout.replica import RolloutMode, RolloutReplica, TokenOutput

from ..integration import server_route

logger = logging.getLogger(__name__)

THREADS_ENV = "EOPD_HF_ROLLOUT_THREADS"  # torch intra-op threads of each server (default: os.cpu_count())
GREEDY_EPS = 1e-5  # vLLM's _SAMPLING_EPS: temperature below this means greedy
_PREFILL_LOGITS_BYTES = 256 << 20  # fp32 logits one prompt-log-prob forward may hold at once

# sampling_params keys the server reads; anything else is ignored with a one-time warning
_KNOWN_PARAMS = {
    "temperature", "top_p", "top_k", "repetition_penalty", "logprobs", "prompt_logprobs", "stop_token_ids",
    "ignore_eos", "seed", "detokenize", "n", "skip_special_tokens", "spaces_between_special_tokens",
}
_DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
           "float16": torch.float16, "fp16": torch.float16, "half": torch.float16}


def server_name(replica_rank: int, *, is_teacher: bool = False, is_reward: bool = False, suffix: str = "") -> str:
    """Ray actor name of a replica's server (the adapter finds the student's by name, like vLLM's)."""
    kind = "reward_" if is_reward else "teacher_" if is_teacher else ""
    return f"hf_server_{kind}{replica_rank}_0{suffix}"


def _num_threads() -> int:
    value = os.environ.get(THREADS_ENV)
    return int(value) if value else (os.cpu_count() or 1)


# ------------------------------------------------------------------------------------------------ sampling


class _SampledLogProbs:
    """A (duck-typed) logits processor placed FIRST in `generate`'s list: it sees the raw logits [B, V] of every step.

    It keeps one step of log_softmax(raw_logits / T) and, at the next step (whose input_ids end with the token
    just sampled), gathers the sampled token's log-prob: O(B * V) memory instead of `output_logits`' O(steps * B * V).
    """

    def __init__(self, temperature: float):
        self.temperature = temperature
        self._last: Optional[torch.Tensor] = None  # [B, V]
        self._columns: list[torch.Tensor] = []  # steps x [B]

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        if self._last is not None:
            self._columns.append(self._last.gather(-1, input_ids[:, -1:]).squeeze(-1))
        self._last = torch.log_softmax(scores.float() / self.temperature, dim=-1)
        return scores

    def finish(self, sequences: torch.Tensor) -> torch.Tensor:
        """[B, steps] log-probs of the generated tokens (`sequences` ends with the last step's token)."""
        if self._last is not None:
            self._columns.append(self._last.gather(-1, sequences[:, -1:]).squeeze(-1))
            self._last = None
        return torch.stack(self._columns, dim=1)


class _Sampling:
    """One group's sampling parameters, parsed with vLLM's conventions (temperature 0 = greedy, top_k <= 0 and
    top_p = 1 = off). Processors are built here rather than by `generate`, in HF's order (penalty, then
    temperature, top-k, top-p), so the log-prob recorder can run before all of them."""

    def __init__(self, params: dict, config):
        self.temperature = float(params.get("temperature", 1.0))
        self.greedy = self.temperature < GREEDY_EPS
        self.top_k = max(int(params.get("top_k", -1) or 0), 0)
        self.top_p = float(params.get("top_p", 1.0))
        self.repetition_penalty = float(params.get("repetition_penalty", config.repetition_penalty))
        self.want_logprobs = bool(params.get("logprobs", False))
        k = params.get("prompt_logprobs")
        self.prompt_logprobs = None if k is None else int(k)
        self.ignore_eos = bool(params.get("ignore_eos", config.ignore_eos))
        self.extra_stop_ids = {int(t) for t in (params.get("stop_token_ids") or [])}
        seed = params.get("seed")
        self.seed = None if seed is None else int(seed)

    @property
    def logprob_temperature(self) -> float:
        return 1.0 if self.greedy else self.temperature  # what the actor divides its logits by

    def processors(self) -> list:
        from transformers.generation.logits_process import (
            RepetitionPenaltyLogitsProcessor,
            TemperatureLogitsWarper,
            TopKLogitsWarper,
            TopPLogitsWarper,
        )

        procs = []
        if self.repetition_penalty != 1.0:
            procs.append(RepetitionPenaltyLogitsProcessor(self.repetition_penalty))
        if not self.greedy:
            if self.temperature != 1.0:
                procs.append(TemperatureLogitsWarper(self.temperature))
            if self.top_k > 0:
                procs.append(TopKLogitsWarper(self.top_k))
            if self.top_p < 1.0:
                procs.append(TopPLogitsWarper(self.top_p))
        return procs


# ------------------------------------------------------------------------------------------------ server


class HFRolloutServer:
    """One HF causal LM serving one replica (wrapped with `ray.remote` by HFReplica; a plain class in tests).

    `generate` requests are queued; a batch task groups the ones with equal sampling parameters and runs each
    group as one left-padded `model.generate` in a thread. Every use of the model (generate, prompt forward,
    weight load) holds `_model_lock`, so weights are never swapped under a running batch.
    """

    def __init__(self, config, model_config, rollout_mode=None, replica_rank: int = 0, batch_window_s: float = 0.01):
        from transformers import AutoModelForCausalLM, GenerationConfig

        from verl.utils.config import omega_conf_to_dataclass
        from verl.workers.config import HFModelConfig, RolloutConfig

        self.config = config if isinstance(config, RolloutConfig) else omega_conf_to_dataclass(config)
        self.model_config = (model_config if isinstance(model_config, HFModelConfig)
                             else omega_conf_to_dataclass(model_config, dataclass_type=HFModelConfig))
        self.rollout_mode, self.replica_rank, self.batch_window_s = rollout_mode, replica_rank, batch_window_s
        self.num_threads = _num_threads()
        torch.set_num_threads(self.num_threads)  # Ray starts actors with OMP_NUM_THREADS=1
        # as vLLM seeds its engine with rollout.seed: unseeded requests draw from this replica's stream
        torch.manual_seed(int(self.config.seed) + int(replica_rank))

        hf_config = self.model_config.hf_config
        attn = getattr(hf_config, "_attn_implementation", None)
        dtype = _DTYPES.get(str(self.config.dtype).replace("torch.", ""))
        if dtype is None:
            raise ValueError(f"hf rollout: unsupported rollout.dtype={self.config.dtype!r} (use float32 on CPU)")
        self.model = AutoModelForCausalLM.from_pretrained(  # flash-attn (verl's default) is CUDA only: sdpa
            self.model_config.local_path, config=hf_config, dtype=dtype,
            attn_implementation=attn if attn in ("sdpa", "eager") else "sdpa",
            trust_remote_code=self.model_config.trust_remote_code,
        ).eval()

        tokenizer = self.model_config.tokenizer
        eos: set[int] = set()
        for source in (self.model_config.generation_config, self.model.generation_config, tokenizer):
            ids = getattr(source, "eos_token_id", None)
            eos.update(int(i) for i in (ids if isinstance(ids, (list, tuple)) else [ids]) if i is not None)
        self.eos_token_ids = eos
        pad = getattr(tokenizer, "pad_token_id", None)
        self.pad_token_id = int(pad) if pad is not None else min(eos, default=0)
        # generate() fills unset fields from model.generation_config (a Hub config's top_k/top_p/temperature
        # would leak into every request): keep it neutral, every run passes its parameters explicitly
        self.model.generation_config = GenerationConfig(pad_token_id=self.pad_token_id)

        self.max_model_len = (self.config.max_model_len or getattr(hf_config, "max_position_embeddings", None)
                              or self.config.prompt_length + self.config.response_length)
        self.global_steps: Optional[int] = None
        self._model_lock = threading.Lock()
        self._pending_weights: dict[str, torch.Tensor] = {}
        self._queue: Optional[asyncio.Queue] = None
        self._batch_task: Optional[asyncio.Task] = None
        self._warned: set[str] = set()

    async def ready(self) -> dict:
        """Server facts, read from a worker thread (where generation runs)."""
        threads = await asyncio.to_thread(torch.get_num_threads)
        return {"num_threads": threads, "dtype": str(next(self.model.parameters()).dtype),
                "eos_token_ids": sorted(self.eos_token_ids), "max_model_len": self.max_model_len}

    # -------------------------------------------------------------------------------- token-in / token-out

    async def generate(self, prompt_ids: list[int], sampling_params: dict[str, Any], request_id: str,
                       image_data: Optional[list] = None, video_data: Optional[list] = None, **kwargs) -> TokenOutput:
        """Generate a response for one prompt. Returns TokenOutput with token_ids [n <= max_tokens] (EOS kept),
        log_probs [n] when sampling_params["logprobs"] is truthy, and extra_fields["global_steps"] (the weight
        version that generated it) plus, for `prompt_logprobs=k`, extra_fields["prompt_ids"/"prompt_logprobs"]
        [S, max(k, 1)] (row i scores token i+1; last row a dummy zero row)."""
        if image_data or video_data or kwargs.get("audio_data"):
            raise NotImplementedError("hf rollout backend is text only (got image/video/audio data)")
        params = dict(sampling_params)
        prompt = [int(t) for t in prompt_ids]
        room = self.max_model_len - len(prompt)
        if room < 1:
            raise ValueError(f"prompt length {len(prompt)} leaves no room to generate within max_model_len "
                             f"{self.max_model_len}")
        if "max_tokens" in params:
            max_tokens = params.pop("max_tokens")
        elif "max_new_tokens" in params:
            max_tokens = params.pop("max_new_tokens")
        else:  # vLLMHttpServer.generate's default
            max_tokens = min(self.config.response_length,
                             self.config.prompt_length + self.config.response_length - len(prompt))
        max_tokens = max(1, min(int(max_tokens), room))
        for key in set(params) - _KNOWN_PARAMS - self._warned:
            self._warned.add(key)
            logger.warning("hf rollout: ignoring sampling param %r", key)
        if self.config.full_determinism:  # as vLLMHttpServer: a fixed per-replica sampling seed
            params.setdefault("seed", self.replica_rank + self.config.seed)
        if int(params.get("n", 1)) != 1:
            raise NotImplementedError("hf rollout: n > 1 in one request (verl sends one request per sample)")

        loop = asyncio.get_running_loop()
        if self._batch_task is None or self._batch_task.done() or self._batch_task.get_loop() is not loop:
            self._queue = asyncio.Queue()  # (re)bind to this event loop
            self._batch_task = loop.create_task(self._batch_loop())
        future = loop.create_future()
        self._queue.put_nowait((prompt, max_tokens, params, future))
        token_ids, log_probs, extra = await future
        return TokenOutput(token_ids=token_ids, log_probs=log_probs, stop_reason="completed", num_preempted=0,
                           extra_fields=extra)

    async def generate_batch(self, requests: list[dict[str, Any]]) -> list[TokenOutput]:
        """`generate` for several requests in one call (cpu/agent_loop.py's batching client: one Ray call per
        batch instead of one per response). Each request is `generate`'s keyword arguments; outputs in order.
        They join the same queue, so equal sampling parameters run as one batch as usual."""
        return list(await asyncio.gather(*(self.generate(**request) for request in requests)))

    async def _batch_loop(self):
        """Collect requests for `batch_window_s`, then run each group of equal sampling params (<= max_num_seqs)."""
        while True:
            items = [await self._queue.get()]
            await asyncio.sleep(self.batch_window_s)
            while not self._queue.empty():
                items.append(self._queue.get_nowait())
            groups: dict[tuple, list] = {}
            for item in items:
                key = tuple(sorted((k, repr(v)) for k, v in item[2].items()))
                groups.setdefault(key, []).append(item)
            for group in groups.values():
                for start in range(0, len(group), self.config.max_num_seqs):
                    chunk = [it for it in group[start:start + self.config.max_num_seqs] if not it[3].done()]
                    if not chunk:
                        continue
                    try:
                        results = await asyncio.to_thread(self._run_group, [it[0] for it in chunk],
                                                          [it[1] for it in chunk], chunk[0][2])
                        for it, result in zip(chunk, results, strict=True):
                            if not it[3].done():
                                it[3].set_result(result)
                    except Exception as e:  # every waiter gets the error; the loop keeps serving
                        for it in chunk:
                            if not it[3].done():
                                it[3].set_exception(e)

    def _run_group(self, prompts: list[list[int]], max_tokens: list[int], params: dict) -> list[tuple]:
        """Generate for prompts sharing `params` (runs in a worker thread). Returns (token_ids, log_probs, extra)
        per prompt."""
        spec = _Sampling(params, self.config)
        stop_ids = spec.extra_stop_ids | (set() if spec.ignore_eos else self.eos_token_ids)
        max_new = max(max_tokens)
        with self._model_lock, torch.inference_mode(), torch.random.fork_rng(devices=[], enabled=spec.seed is not None):
            torch.set_num_threads(self.num_threads)
            if spec.seed is not None:
                torch.manual_seed(spec.seed)
            version = self.global_steps
            extras = [{"global_steps": version, "num_cached_tokens": 0} for _ in prompts]
            last_logits = None
            if spec.prompt_logprobs is not None or max_new == 1:
                last_logits = self._prefill(prompts, spec.prompt_logprobs, extras)
            if max_new == 1:  # one token (the OPD teacher's case): sample it from the prefill's last row
                tokens, log_probs = self._sample_one(prompts, last_logits, spec)
            else:
                tokens, log_probs = self._generate(prompts, max_new, stop_ids, spec)
        results = []
        for b, extra in enumerate(extras):
            toks = tokens[b][: max_tokens[b]]
            stop_at = next((i + 1 for i, t in enumerate(toks) if t in stop_ids), None)
            toks = toks[:stop_at]  # the stop/EOS token stays in the output, like vLLM
            lps = log_probs[b][: len(toks)] if spec.want_logprobs else None
            results.append((toks, lps, extra))
        return results

    def _left_pad(self, prompts: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
        """input_ids, attention_mask [B, L], left-padded."""
        width = max(len(p) for p in prompts)
        ids = torch.tensor([[self.pad_token_id] * (width - len(p)) + p for p in prompts])
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
        return ids, mask

    def _generate(self, prompts, max_new: int, stop_ids: set[int], spec: _Sampling):
        """One left-padded model.generate. Returns tokens [B][max_new] and their log_softmax(raw / T) [B][max_new]."""
        from transformers import GenerationConfig
        from transformers.generation.logits_process import LogitsProcessorList

        ids, mask = self._left_pad(prompts)
        recorder = _SampledLogProbs(spec.logprob_temperature) if spec.want_logprobs else None
        # generate builds no processor itself (all neutral here) and appends ours after its own, so the
        # recorder is first and sees the raw logits
        # (greedy leaves the sampling fields unset: explicit ones would only draw "flag ignored" warnings)
        neutral = {} if spec.greedy else dict(temperature=1.0, top_k=0, top_p=1.0)
        gen_config = GenerationConfig(do_sample=not spec.greedy, repetition_penalty=1.0, max_new_tokens=max_new,
                                      eos_token_id=sorted(stop_ids) or None, pad_token_id=self.pad_token_id, **neutral)
        processors = LogitsProcessorList(([recorder] if recorder else []) + spec.processors())
        sequences = self.model.generate(input_ids=ids, attention_mask=mask, generation_config=gen_config,
                                        logits_processor=processors)
        tokens = sequences[:, ids.shape[1]:].tolist()
        log_probs = recorder.finish(sequences).tolist() if recorder else [None] * len(prompts)
        return tokens, log_probs

    def _forward_rows(self, prompts, rows_needed: bool):
        """Left-padded forwards in chunks of prompts. Yields (index of the chunk's first prompt,
        logits [b, L or 1, V] fp32, left-pad width of each prompt)."""
        vocab = self.model.config.get_text_config().vocab_size
        width = max(len(p) for p in prompts)
        per_chunk = max(1, _PREFILL_LOGITS_BYTES // (4 * vocab * width)) if rows_needed else len(prompts)
        for start in range(0, len(prompts), per_chunk):
            chunk = prompts[start:start + per_chunk]
            ids, mask = self._left_pad(chunk)
            positions = (mask.cumsum(-1) - 1).clamp_min(0)
            out = self.model(input_ids=ids, attention_mask=mask, position_ids=positions,
                             logits_to_keep=0 if rows_needed else 1, use_cache=False)
            yield start, out.logits.float(), [ids.shape[1] - len(p) for p in chunk]

    def _prefill(self, prompts, k: Optional[int], extras: list[dict]) -> torch.Tensor:
        """One forward over each prompt. Fills extras[b]["prompt_ids"/"prompt_logprobs"] when k is not None, in
        verl.workers.rollout.vllm_rollout.utils.extract_prompt_logprobs' layout:

            row i < S-1: log p(token | prompt[:i+1]) of prompt[i+1] (k = 0), or of the top-k tokens by rank (k > 0)
            row S-1:     dummy zeros (width max(k, 1))

        from the raw logits (temperature 1). Returns the last position's raw logits [B, V]."""
        last = []
        for start, logits, pads in self._forward_rows(prompts, rows_needed=k is not None):
            last.append(logits[:, -1])
            if k is None:
                continue
            for j, pad in enumerate(pads):
                seq = prompts[start + j]
                log_probs = torch.log_softmax(logits[j, pad:-1], dim=-1)  # [S-1, V]: row i predicts token i+1
                if k == 0:
                    ids = torch.tensor(seq[1:]).unsqueeze(-1)
                    vals = log_probs.gather(-1, ids)
                else:
                    vals, ids = log_probs.topk(k, dim=-1)  # sorted by rank
                width = max(k, 1)
                extras[start + j]["prompt_ids"] = ids.tolist() + [[0] * width]
                extras[start + j]["prompt_logprobs"] = vals.tolist() + [[0.0] * width]
                if k > 0 and server_route.enabled():  # the exact sampled-token column, as the patched servers
                    token_lp = log_probs.gather(-1, torch.tensor(seq[1:]).unsqueeze(-1)).squeeze(-1)
                    server_route.append_token_column(extras[start + j], seq[1:], token_lp.tolist())
        return torch.cat(last)

    def _sample_one(self, prompts, last_logits: torch.Tensor, spec: _Sampling):
        """Sample one token per prompt from the last position's raw logits [B, V], as generate would."""
        ids, _ = self._left_pad(prompts)
        scores = last_logits
        for proc in spec.processors():
            scores = proc(ids, scores)
        if spec.greedy:
            tokens = scores.argmax(-1)
        else:
            tokens = torch.multinomial(torch.softmax(scores, dim=-1), 1).squeeze(-1)
        log_probs = torch.log_softmax(last_logits / spec.logprob_temperature, dim=-1).gather(-1, tokens[:, None])
        return tokens[:, None].tolist(), log_probs.tolist()

    # -------------------------------------------------------------------------------- weight sync

    async def update_weights(self, named_tensors: dict[str, torch.Tensor], is_last: bool = True,
                             global_steps: Optional[int] = None) -> Optional[dict]:
        """Receive one bucket of full tensors (HF names); on the last bucket load them all (load_state_dict under
        the model lock) and set the weight version. Unknown names raise KeyError before anything is loaded."""
        self._pending_weights.update(named_tensors)
        if not is_last:
            return None
        state, self._pending_weights = self._pending_weights, {}
        return await asyncio.to_thread(self._load_weights, state, global_steps)

    def _load_weights(self, state: dict[str, torch.Tensor], global_steps: Optional[int]) -> dict:
        with self._model_lock, torch.no_grad():
            own = self.model.state_dict()
            unexpected = sorted(set(state) - set(own))
            if unexpected:
                raise KeyError(f"hf rollout: {len(unexpected)} weight names the rollout model does not have, "
                               f"e.g. {unexpected[:5]}")
            self.model.load_state_dict(state, strict=False)  # casts to the rollout dtype; tied weights stay tied
            if global_steps is not None:
                self.global_steps = int(global_steps)
        return {"loaded": len(state), "missing": sorted(set(own) - set(state))}

    async def set_global_steps(self, global_steps: int):
        self.global_steps = int(global_steps)

    # -------------------------------------------------------------------------------- lifecycle hooks (no-ops)
    # CPU: the weights stay resident and generate keeps no cache between batches; the sync trainer never aborts.

    async def wake_up(self, tags: Optional[list[str]] = None):
        return None

    async def sleep(self):
        return None

    async def clear_kv_cache(self):
        return None

    async def release_kv_cache(self):
        return None

    async def resume_kv_cache(self):
        return None

    async def abort_all_requests(self, reject_request: bool = False, **kwargs) -> dict:
        return {"aborted_count": 0, "request_ids": []}

    async def resume_generation(self):
        return None

    async def start_profile(self, **kwargs):
        return None

    async def stop_profile(self):
        return None


# ------------------------------------------------------------------------------------------------ replica


class HFReplica(RolloutReplica):
    """One HFRolloutServer actor per replica, on the node of the replica's first worker, holding no CPUs of its
    own (it shares the actor worker's; the two alternate: generate, then train)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        if self.world_size != 1:
            raise ValueError(
                f"rollout backend 'hf' runs one process per replica, but tensor_model_parallel_size="
                f"{self.config.tensor_model_parallel_size} x data_parallel_size={self.config.data_parallel_size} x "
                f"pipeline_model_parallel_size={self.config.pipeline_model_parallel_size} = {self.world_size}. Set "
                "actor_rollout_ref.rollout.tensor_model_parallel_size=1 (and data_/pipeline_model_parallel_size=1; "
                "for a teacher: distillation.teacher_models.<name>.inference.tensor_model_parallel_size=1)"
            )
        self.server_class = ray.remote(HFRolloutServer)

    def _server_name(self) -> str:
        return server_name(self.replica_rank, is_teacher=self.is_teacher_model, is_reward=self.is_reward_model,
                           suffix=self.name_suffix)

    def rollout_worker_use_gpu(self) -> bool:
        return False

    async def init_standalone(self):
        """Only the server: it owns its weights, so no resource pool or CheckpointEngineWorker (whose base
        implementation asks for GPUs)."""
        self.rollout_mode = RolloutMode.STANDALONE
        await self.launch_servers()

    async def launch_servers(self):
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

        if self.workers:
            node_id = await self.workers[0].__ray_call__.remote(lambda worker: ray.get_runtime_context().get_node_id())
        else:
            node_id = ray.get_runtime_context().get_node_id()
        name = self._server_name()
        options = dict(name=name, scheduling_strategy=NodeAffinitySchedulingStrategy(node_id=node_id, soft=False),
                       max_concurrency=self.max_concurrency, num_cpus=0)
        if os.environ.get(THREADS_ENV):  # the server's thread count follows the TaskRunner's setting
            options["runtime_env"] = {"env_vars": {THREADS_ENV: os.environ[THREADS_ENV]}}
        server = self.server_class.options(**options).remote(
            config=self.config, model_config=self.model_config, rollout_mode=self.rollout_mode,
            replica_rank=self.replica_rank)
        await server.ready.remote()  # surfaces model-loading errors here, not at the first request
        self.servers = [server]
        self._server_handle = server
        # not an HTTP endpoint: the load balancer's (and metrics') unique key for this replica
        self._server_address = f"{ray.util.get_node_ip_address()}:{name}"


# ------------------------------------------------------------------------------------------------ adapter


class HFServerAdapter(BaseRollout):
    """Lives in each actor worker (and CheckpointEngineWorker); pushes the actor's weights to its replica's server.

    Weight sync (naive mode, every step): every rank drains the (name, full tensor) generator, because
    DTensor.full_tensor() is a collective; the replica's leader copies tensors to CPU and sends them in buckets
    of `checkpoint_engine.update_weights_bucket_megabytes` (one in flight), the last one with `global_steps`.
    """

    def __init__(self, config, model_config, device_mesh, replica_rank: int = -1):
        super().__init__(config, model_config, device_mesh)
        rank = int(os.environ.get("RANK", "0"))
        world = (self.config.tensor_model_parallel_size * self.config.data_parallel_size
                 * self.config.pipeline_model_parallel_size)
        self.replica_rank = rank // world if replica_rank == -1 else replica_rank
        self.rollout_rank = rank % world
        self.is_leader_rank = self.rollout_rank == 0
        self.bucket_bytes = self.config.checkpoint_engine.update_weights_bucket_megabytes << 20
        self.server_handle = None

    def _server(self):
        if self.server_handle is None:  # servers are launched after the workers' init_model
            self.server_handle = ray.get_actor(server_name(self.replica_rank))
        return self.server_handle

    async def resume(self, tags: list[str]):
        if self.config.free_cache_engine and self.is_leader_rank:
            await self._server().wake_up.remote(tags=tags)

    async def release(self):
        if self.config.free_cache_engine and self.is_leader_rank:
            await self._server().sleep.remote()

    async def update_weights(self, weights: Generator[tuple[str, torch.Tensor], None, None],
                             wire_format: str = "named_tensors", global_steps: Optional[int] = None, **kwargs):
        if wire_format != "named_tensors":
            raise NotImplementedError(
                f"hf rollout receives full named tensors only, got wire_format={wire_format!r}; use "
                "actor_rollout_ref.rollout.checkpoint_engine.backend=naive")
        if kwargs.get("peft_config") is not None:  # raised before draining: every rank raises alike
            raise NotImplementedError(
                "hf rollout cannot sync LoRA adapters; set actor_rollout_ref.model.lora.merge=True")
        bucket, size, in_flight = {}, 0, None
        for name, tensor in weights:  # every rank drains the generator
            if not self.is_leader_rank:
                continue
            # copy=True gives the tensor its own storage: pickling a view would ship its whole base storage
            bucket[name] = tensor.detach().to("cpu", copy=True)
            size += tensor.numel() * tensor.element_size()
            if size >= self.bucket_bytes:
                if in_flight is not None:
                    await in_flight  # one bucket in flight: bounded memory, buckets arrive in order
                in_flight = self._server().update_weights.remote(bucket, is_last=False)
                bucket, size = {}, 0
        if not self.is_leader_rank:
            return None
        if in_flight is not None:
            await in_flight
        return await self._server().update_weights.remote(bucket, is_last=True, global_steps=global_steps)
