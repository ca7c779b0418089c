"""The `hf` rollout backend (verl_eopd.cpu.hf_rollout) against verl 0.9.1's rollout contract, on CPU.

The server's plain class runs in this process, driven with asyncio on one module-wide event loop; one
module-wide Ray session covers the replica (a real server actor) and the in-worker adapter. Every log-prob
is compared with a dense teacher-forced forward of the same checkpoint, loaded separately.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil

import pytest
import torch

from conftest import local_ray
from tolerances import assert_within, fp32_logit_bound, log_softmax_bound, model_logit_scale
from verl_eopd.cpu import hf_registry as hf_rollout
from verl_eopd.cpu.hf_rollout import HFReplica, HFRolloutServer, HFServerAdapter

pytestmark = pytest.mark.integration

PROMPT_LEN, RESPONSE_LEN = 32, 16
TRAIN_PARAMS = dict(temperature=1.0, top_p=1.0, top_k=-1, repetition_penalty=1.0, logprobs=True)  # the agent loop's
GREEDY_PARAMS = dict(temperature=0, top_p=1.0, top_k=-1, repetition_penalty=1.0, logprobs=True)  # validation's
PROMPTS = [[5, 6, 7, 8, 9], [10, 11, 12], [20, 21, 22, 23, 24, 25, 26]]


def lp_bound(model, temperature: float = 1.0) -> float:
    """|log p_a - log p_b| between the server's fp32 log-probs (left-padded batch, KV cache) and a dense fp32 forward
    of the same model over the same <= PROMPT_LEN + RESPONSE_LEN tokens: the logits within fp32_logit_bound (2 gamma_n
    Z), divided by the temperature, then two fp32 log-softmaxes over V (log_softmax_bound, |z / T| <= Z / T).
    For the tiny student (Z = 35.8): 6.1e-3 at T = 1, 8.7e-3 at T = 0.7; observed <= 3.8e-6 in every test that
    uses it (the worst-case rounding analysis is loose, not the implementation)."""
    dz = fp32_logit_bound(model, PROMPT_LEN + RESPONSE_LEN) / temperature
    return log_softmax_bound(model_logit_scale(model) / temperature, model.config.vocab_size, dz)


# ------------------------------------------------------------------------------------------------ fixtures


@pytest.fixture(scope="module")
def run():
    """Run a coroutine on one event loop for the whole module (the servers' batch tasks live on it)."""
    loop = asyncio.new_event_loop()
    yield loop.run_until_complete
    tasks = asyncio.all_tasks(loop)  # the servers' batch loops
    for task in tasks:
        task.cancel()
    if tasks:
        loop.run_until_complete(asyncio.wait(tasks))
    loop.close()


def rollout_config(**overrides):
    from verl.workers.config import RolloutConfig

    kwargs = dict(name="hf", tensor_model_parallel_size=1, dtype="float32", prompt_length=PROMPT_LEN,
                  response_length=RESPONSE_LEN)
    return RolloutConfig(**{**kwargs, **overrides})


def model_config(path):
    from verl.workers.config import HFModelConfig

    return HFModelConfig(path=path, override_config={"attn_implementation": "sdpa"})


@pytest.fixture(scope="module")
def student(tiny_models):
    return tiny_models["student"]


@pytest.fixture(scope="module")
def server(student):
    return HFRolloutServer(rollout_config(), model_config(student))


@pytest.fixture(scope="module")
def dense(student):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(student, attn_implementation="sdpa", dtype=torch.float32).eval()


@torch.no_grad()
def dense_logprobs(model, seq: list[int], temperature: float = 1.0) -> torch.Tensor:
    """[S-1, V] log_softmax(logits / T) of one unpadded sequence; row i predicts token i+1."""
    logits = model(torch.tensor([seq])).logits[0, :-1].float()
    return torch.log_softmax(logits / temperature, dim=-1)


def sampled_logprobs(model, prompt: list[int], response: list[int], temperature: float) -> torch.Tensor:
    """[n] teacher-forced log-probs of the response tokens (what the actor recomputes)."""
    lp = dense_logprobs(model, prompt + response, temperature)[len(prompt) - 1:]
    return lp.gather(-1, torch.tensor(response)[:, None]).squeeze(-1)


async def generate_all(server, prompts, params):
    return await asyncio.gather(*[server.generate(p, dict(params), request_id=f"r{i}") for i, p in enumerate(prompts)])


def perturbed(state: dict[str, torch.Tensor], seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {k: v + 0.5 * v.std().nan_to_num(1.0) * torch.randn(v.shape, generator=g) for k, v in state.items()}


# ------------------------------------------------------------------------------------------------ registration


def test_register_resolves_hf_in_both_registries(monkeypatch):
    from verl.workers.rollout.base import _ROLLOUT_REGISTRY, get_rollout_class
    from verl.workers.rollout.replica import RolloutReplicaRegistry, get_rollout_replica_class

    hf_rollout.register()
    hf_rollout.register()  # idempotent
    assert get_rollout_replica_class("hf") is HFReplica
    assert get_rollout_class("hf", "async") is HFServerAdapter
    assert not HFReplica.__abstractmethods__ and not HFServerAdapter.__abstractmethods__
    assert _ROLLOUT_REGISTRY[("hf", "async")] == "verl_eopd.cpu.hf_rollout.HFServerAdapter"

    monkeypatch.setitem(RolloutReplicaRegistry._registry, "hf", lambda: None)  # someone else's "hf"
    with pytest.raises(RuntimeError, match="already registered"):
        hf_rollout.register()


def test_importing_first_in_a_fresh_process_registers_without_resolving_the_platform(fresh_python):
    """A Ray server actor imports this module before verl; verl's plugin entry point then calls `register()` on
    the partially imported module (no circular-import failure). Nothing imports verl's engines or picks a
    device platform (a CPU platform is installed later, before the engines are imported)."""
    code = (
        "import json, sys\n"
        "from verl_eopd.cpu import hf_rollout\n"
        "from verl.workers.rollout.base import get_rollout_class\n"
        "from verl.workers.rollout.replica import get_rollout_replica_class\n"
        "import verl.plugin.platform.platform_manager as pm\n"
        "print(json.dumps({'replica': get_rollout_replica_class('hf').__name__,\n"
        "  'adapter': get_rollout_class('hf').__name__, 'platform': repr(pm._current_platform),\n"
        "  'engine_modules': [m for m in sys.modules if m.startswith('verl.workers.engine')]}))\n"
    )
    out = fresh_python(["-c", code], timeout=120)
    assert out.returncode == 0 and "failed to load" not in out.stderr, out.stderr
    facts = json.loads(out.stdout.strip().splitlines()[-1])
    assert facts == {"replica": "HFReplica", "adapter": "HFServerAdapter", "platform": "None", "engine_modules": []}


# ------------------------------------------------------------------------------------------------ server


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_sampled_requests_are_batched_and_log_probs_match_a_dense_forward(server, dense, run, monkeypatch,
                                                                          temperature):
    groups = []
    run_group = server._run_group
    monkeypatch.setattr(server, "_run_group", lambda prompts, *a: groups.append(len(prompts)) or run_group(prompts, *a))
    outs = run(generate_all(server, PROMPTS, {**TRAIN_PARAMS, "temperature": temperature, "max_tokens": 8}))
    assert groups == [len(PROMPTS)]  # one left-padded generate for the three concurrent requests
    for prompt, out in zip(PROMPTS, outs):
        assert 1 <= len(out.token_ids) == len(out.log_probs) <= 8
        assert out.stop_reason == "completed" and "global_steps" in out.extra_fields
        ref = sampled_logprobs(dense, prompt, out.token_ids, temperature)
        assert_within(torch.tensor(out.log_probs), ref, lp_bound(dense, temperature), "sampled log-probs")


def test_no_logprobs_unless_asked(server, run):
    out = run(server.generate(PROMPTS[0], {**TRAIN_PARAMS, "logprobs": False}, request_id="x"))
    assert out.log_probs is None and len(out.token_ids) >= 1


def test_a_seed_makes_sampling_reproducible(server, run):
    params = {**TRAIN_PARAMS, "temperature": 50.0, "ignore_eos": True}
    draw = lambda extra: run(generate_all(server, PROMPTS, {**params, **extra}))
    seeded = [[o.token_ids for o in draw({"seed": 7})] for _ in range(2)]
    unseeded = [[o.token_ids for o in draw({})] for _ in range(2)]
    assert seeded[0] == seeded[1]
    assert unseeded[0] != unseeded[1]  # 48 tokens near uniform over 320: equal only by a ~1e-100 chance


def test_top_k_is_honoured_and_off_means_off(server, dense, run):
    """top_k=-1 must not fall back to HF's default top-k of 50; top_k=5 keeps the 5 most likely tokens."""
    def ranks(params):
        outs = run(generate_all(server, PROMPTS, {**params, "ignore_eos": True}))
        found = []
        for prompt, out in zip(PROMPTS, outs):
            lp = dense_logprobs(dense, prompt + out.token_ids)[len(prompt) - 1:]
            chosen = lp.gather(-1, torch.tensor(out.token_ids)[:, None])
            found += (lp > chosen).sum(-1).tolist()  # rank 0 = most likely
        return found

    assert max(ranks({**TRAIN_PARAMS, "temperature": 50.0})) >= 50  # near uniform over 320 tokens
    assert max(ranks({**TRAIN_PARAMS, "temperature": 50.0, "top_k": 5})) < 5


def test_greedy_is_deterministic_and_a_max_tokens_cut_is_a_prefix(server, dense, run):
    params = {**GREEDY_PARAMS, "ignore_eos": True}
    full = run(server.generate(PROMPTS[0], dict(params), request_id="a"))
    again = run(server.generate(PROMPTS[0], dict(params), request_id="b"))
    cut = run(server.generate(PROMPTS[0], {**params, "max_tokens": 5}, request_id="c"))
    assert len(full.token_ids) == RESPONSE_LEN  # no max_tokens: vLLM's default, min(response, prompt + response - len)
    assert again.token_ids == full.token_ids
    assert cut.token_ids == full.token_ids[:5]
    ref = sampled_logprobs(dense, PROMPTS[0], full.token_ids, 1.0)  # greedy log-probs are at T = 1
    assert_within(torch.tensor(full.log_probs), ref, lp_bound(dense), "greedy log-probs")
    long_prompt = list(range(3, 3 + PROMPT_LEN + RESPONSE_LEN - 4))
    out = run(server.generate(long_prompt, dict(params), request_id="d"))
    assert len(out.token_ids) == 4  # the default leaves prompt_length + response_length in total


def test_stop_tokens_and_generation_config_eos_end_the_response_and_are_kept(server, student, tmp_path, run):
    free = run(server.generate(PROMPTS[1], {**GREEDY_PARAMS, "ignore_eos": True}, request_id="a")).token_ids
    stop = free[3]
    expected = free[: free.index(stop) + 1]
    out = run(server.generate(PROMPTS[1], {**GREEDY_PARAMS, "stop_token_ids": [stop], "ignore_eos": True},
                              request_id="b"))
    assert out.token_ids == expected and len(out.log_probs) == len(expected)

    # a checkpoint whose generation_config lists `stop` as a second EOS id (as Qwen's list <|endoftext|>)
    path = tmp_path / "eos_model"
    shutil.copytree(student, path)
    (path / "generation_config.json").write_text(json.dumps({"eos_token_id": [2, stop], "pad_token_id": 0}))
    from verl.workers.config import HFModelConfig

    # no attn override: verl's default flash_attention_2 (CUDA only) must become sdpa
    eos_server = HFRolloutServer(rollout_config(), HFModelConfig(path=str(path)))
    assert eos_server.model.config._attn_implementation == "sdpa"
    assert eos_server.eos_token_ids == {2, stop}
    first_eos = next(i for i, t in enumerate(free) if t in (2, stop))
    out = run(eos_server.generate(PROMPTS[1], dict(GREEDY_PARAMS), request_id="c"))
    assert out.token_ids == free[: first_eos + 1]  # the EOS token is part of the response
    out = run(eos_server.generate(PROMPTS[1], {**GREEDY_PARAMS, "ignore_eos": True}, request_id="d"))
    assert out.token_ids == free
    eos_server._batch_task.cancel()  # this server goes away with the test


@pytest.mark.parametrize("k", [0, 4])
def test_teacher_prompt_logprobs_have_verls_layout_and_values(server, dense, run, k):
    """What AsyncTeacherLLMServerManager sends and reads: [S, max(k, 1)], row i scores token i+1, dummy last row."""
    seqs = [[7, 8, 9, 10, 11, 12, 13, 14, 15], [30, 31, 32, 33, 34]]  # different lengths: left padding
    params = {"max_tokens": 1, "temperature": 1.0, "prompt_logprobs": k, "detokenize": False}
    outs = run(generate_all(server, seqs, params))
    width = max(k, 1)
    for seq, out in zip(seqs, outs):
        ids = torch.tensor(out.extra_fields["prompt_ids"])
        vals = torch.tensor(out.extra_fields["prompt_logprobs"])
        assert ids.shape == vals.shape == (len(seq), width)
        assert len(out.token_ids) == 1 and out.log_probs is None
        assert ids[-1].tolist() == [0] * width and vals[-1].tolist() == [0.0] * width
        lp = dense_logprobs(dense, seq)
        if k == 0:
            assert ids[:-1, 0].tolist() == seq[1:]
            assert_within(vals[:-1, 0], lp.gather(-1, ids[:-1]).squeeze(-1), lp_bound(dense), "prompt log-probs")
        else:
            ref_vals, ref_ids = lp.topk(k, dim=-1)
            assert ids[:-1].tolist() == ref_ids.tolist()
            assert_within(vals[:-1], ref_vals, lp_bound(dense), "top-k prompt log-probs")


def test_weight_sync_changes_and_restores_greedy_output(server, run):
    original = {k: v.clone() for k, v in server.model.state_dict().items()}
    greedy = lambda: run(server.generate(PROMPTS[2], {**GREEDY_PARAMS, "ignore_eos": True}, request_id="g"))
    before = greedy()

    names = sorted(original)
    new = perturbed(original)
    assert run(server.update_weights({n: new[n] for n in names[:5]}, is_last=False)) is None
    loaded = run(server.update_weights({n: new[n] for n in names[5:]}, is_last=True, global_steps=3))
    assert loaded["loaded"] == len(names) and loaded["missing"] == []
    changed = greedy()
    assert changed.token_ids != before.token_ids
    assert changed.extra_fields["global_steps"] == 3 and isinstance(changed.extra_fields["global_steps"], int)

    with pytest.raises(KeyError, match="does not have"):
        run(server.update_weights({**original, "model.no_such.weight": torch.zeros(1)}, global_steps=9))
    assert greedy().token_ids == changed.token_ids  # nothing was loaded

    run(server.update_weights(original, global_steps=4))
    after = greedy()
    assert after.token_ids == before.token_ids and after.log_probs == before.log_probs
    assert after.extra_fields["global_steps"] == 4


# ------------------------------------------------------------------------------------------------ replica, adapter


def test_replica_rejects_parallel_rollouts(student):
    with pytest.raises(ValueError, match="actor_rollout_ref.rollout.tensor_model_parallel_size=1"):
        HFReplica(replica_rank=0, config=rollout_config(tensor_model_parallel_size=2), model_config=None,
                  gpus_per_node=2)


@pytest.fixture(scope="module")
def ray_session():
    with local_ray(num_cpus=2) as ray:
        yield ray


def test_replica_server_actor_and_adapter_weight_sync(ray_session, student, run):
    from omegaconf import OmegaConf

    from verl.workers.config import CheckpointEngineConfig

    ray = ray_session
    # the teacher's form of model config: a DictConfig with _target_, converted inside the server actor
    model_cfg = OmegaConf.create({"_target_": "verl.workers.config.HFModelConfig", "path": student,
                                  "override_config": {"attn_implementation": "sdpa"}})
    replica = HFReplica(replica_rank=0, config=rollout_config(), model_config=model_cfg, gpus_per_node=1)
    assert replica.rollout_worker_use_gpu() is False
    run(replica.init_standalone())
    handle = replica.server_handle
    assert replica.servers == [handle] and handle is not None
    assert isinstance(replica.server_address, str) and replica.server_address.endswith(":hf_server_0_0")
    facts = ray.get(handle.ready.remote())
    assert facts["num_threads"] == os.cpu_count()  # not Ray's OMP_NUM_THREADS=1

    greedy = lambda: ray.get(handle.generate.remote(prompt_ids=PROMPTS[0], request_id="g",
                                                    sampling_params={**GREEDY_PARAMS, "ignore_eos": True}))
    before = greedy()

    # the adapter as an actor worker builds it; bucket size 0 MB sends one tensor per bucket
    config = rollout_config(checkpoint_engine=CheckpointEngineConfig(update_weights_bucket_megabytes=0))
    adapter = HFServerAdapter(config, model_config(student), device_mesh=None)
    assert adapter.replica_rank == 0 and adapter.is_leader_rank
    from transformers import AutoModelForCausalLM

    original = AutoModelForCausalLM.from_pretrained(student, dtype=torch.float32).state_dict()
    new = perturbed(original, seed=1)
    run(adapter.resume(tags=["weights"]))
    run(adapter.update_weights(iter(new.items()), global_steps=7))
    changed = greedy()
    assert changed.token_ids != before.token_ids and changed.extra_fields["global_steps"] == 7
    run(adapter.update_weights(iter(original.items()), global_steps=8))
    after = greedy()
    assert after.token_ids == before.token_ids and after.extra_fields["global_steps"] == 8

    for hook in ("sleep", "wake_up", "clear_kv_cache", "release_kv_cache", "resume_kv_cache", "abort_all_requests",
                 "resume_generation", "start_profile", "stop_profile"):
        run(getattr(replica, hook)())
    run(adapter.release())

    with pytest.raises(NotImplementedError, match="wire_format"):
        run(adapter.update_weights(iter([]), wire_format="delta_flush"))
    with pytest.raises(NotImplementedError, match="lora.merge=True"):
        run(adapter.update_weights(iter([]), peft_config={"r": 8}))


def test_teacher_prompt_logprobs_carry_the_exact_token_column_when_switched_on(server, dense, run, monkeypatch):
    """With EOPD_TEACHER_TOKEN_COLUMN=1 (teacher_route=server, server_token_logprob=exact) the hf teacher
    ships what the patched vLLM/SGLang servers ship: top-k columns unchanged, column k = next token, exact."""
    from verl_eopd.integration import server_route as server_logprobs

    monkeypatch.setenv(server_logprobs.ENV, "1")
    k, seq = 4, [7, 8, 9, 10, 11, 12]
    params = {"max_tokens": 1, "temperature": 1.0, "prompt_logprobs": k, "detokenize": False}
    (out,) = run(generate_all(server, [seq], params))
    ids = torch.tensor(out.extra_fields["prompt_ids"])
    vals = torch.tensor(out.extra_fields["prompt_logprobs"])
    assert ids.shape == vals.shape == (len(seq), k + 1)
    lp = dense_logprobs(dense, seq)
    ref_vals, ref_ids = lp.topk(k, dim=-1)
    assert ids[:-1, :k].tolist() == ref_ids.tolist()
    assert ids[:-1, k].tolist() == seq[1:]
    assert_within(vals[:-1, k], lp.gather(-1, ids[:-1, k:]).squeeze(-1), lp_bound(dense), "token column")
    assert ids[-1].tolist() == [0] * (k + 1) and vals[-1].tolist() == [0.0] * (k + 1)


# ------------------------------------------------------------------------------------------------ batching client


class _Remote:
    """`handle.method.remote(...)` of a Ray actor handle, for a plain object in this process (awaitable)."""

    def __init__(self, fn, calls):
        self.fn, self.calls = fn, calls

    def remote(self, *args, **kwargs):
        self.calls.append((args, kwargs))
        return self.fn(*args, **kwargs)


class _FakeClient:
    """verl's LLMServerClient surface that cpu/agent_loop.py's batching client uses, over one plain server."""

    def __init__(self, server, fail: bool = False):
        self.acquired, self.released, self.batches, self.single = [], [], [], []
        self.handle = type("Handle", (), {})()
        batch = server.generate_batch
        if fail:
            async def batch(requests):
                raise RuntimeError("server down")
        self.handle.generate_batch = _Remote(batch, self.batches)

    def _vllm_request_id(self, request_id):
        return f"vllm-{request_id}"

    async def _acquire_server(self, request_id, **extra):
        self.acquired.append(request_id)
        return "server-0", self.handle

    def _release_server(self, server_id, request_id=None):
        self.released.append((server_id, request_id))

    async def generate(self, request_id, **kwargs):
        self.single.append(request_id)
        return "delegated"


def test_generate_batch_returns_what_one_call_per_request_returns(server, dense, run):
    requests = [{"prompt_ids": p, "request_id": f"b{i}", "sampling_params": {**GREEDY_PARAMS, "ignore_eos": True,
                                                                              "max_tokens": 3 + i}}
                for i, p in enumerate(PROMPTS)]
    batched = run(server.generate_batch(requests))
    one_by_one = [run(server.generate(**r)) for r in requests]
    assert [o.token_ids for o in batched] == [o.token_ids for o in one_by_one]
    assert [len(o.token_ids) for o in batched] == [3, 4, 5]  # each request keeps its own sampling parameters
    for a, b in zip(batched, one_by_one):
        assert_within(torch.tensor(a.log_probs), torch.tensor(b.log_probs), lp_bound(dense), "batched vs one")


def test_batching_client_sends_concurrent_requests_as_one_batch(server, run):
    from verl_eopd.cpu.agent_loop import _BatchingClient

    fake = _FakeClient(server)
    client = _BatchingClient(fake)
    params = {**GREEDY_PARAMS, "ignore_eos": True, "max_tokens": 4}

    async def many():
        return await asyncio.gather(*[client.generate(f"r{i}", prompt_ids=p, sampling_params=dict(params),
                                                      priority=i, mm_processor_output=None)
                                      for i, p in enumerate(PROMPTS)])

    outs = run(many())
    assert len(fake.batches) == 1 and len(fake.acquired) == 1 and fake.released == [("server-0", "vllm-r0")]
    (requests,), _ = fake.batches[0]
    assert [r["prompt_ids"] for r in requests] == PROMPTS and [r["request_id"] for r in requests] == \
        ["vllm-r0", "vllm-r1", "vllm-r2"]
    direct = [run(server.generate(p, dict(params), request_id="d")) for p in PROMPTS]
    assert [o.token_ids for o in outs] == [o.token_ids for o in direct]  # each caller gets its own output
    for out in outs:  # as verl's LLMServerClient.generate: the weight version range of the response
        assert out.extra_fields["min_global_steps"] == out.extra_fields["max_global_steps"] == \
            out.extra_fields["global_steps"]
    # a later call starts a new batch; a multimodal request goes to verl's client as it is
    run(client.generate("later", prompt_ids=PROMPTS[0], sampling_params=dict(params)))
    assert len(fake.batches) == 2
    assert run(client.generate("img", prompt_ids=PROMPTS[0], sampling_params=dict(params), image_data=[1])) == \
        "delegated" and fake.single == ["img"]


def test_batching_client_gives_every_waiter_the_servers_error(server, run):
    from verl_eopd.cpu.agent_loop import _BatchingClient

    fake = _FakeClient(server, fail=True)
    client = _BatchingClient(fake)

    async def many():
        return await asyncio.gather(*[client.generate(f"r{i}", prompt_ids=p, sampling_params=dict(GREEDY_PARAMS))
                                      for i, p in enumerate(PROMPTS)], return_exceptions=True)

    errors = run(many())
    assert all(isinstance(e, RuntimeError) and "server down" in str(e) for e in errors)
    assert fake.released == [("server-0", "vllm-r0")]  # the load balancer's slot is given back


def test_batching_client_sends_calls_that_arrive_while_a_batch_is_out(server, run):
    """A call made while the previous batch waits for the server starts the next batch (none is left behind)."""
    from verl_eopd.cpu.agent_loop import _BatchingClient

    fake = _FakeClient(server)
    inner = fake.handle.generate_batch.fn

    async def slow(requests):
        await asyncio.sleep(0.05)
        return await inner(requests)

    fake.handle.generate_batch.fn = slow
    client = _BatchingClient(fake)
    params = {**GREEDY_PARAMS, "ignore_eos": True, "max_tokens": 2}

    async def staggered():
        first = asyncio.ensure_future(client.generate("a", prompt_ids=PROMPTS[0], sampling_params=dict(params)))
        await asyncio.sleep(0.02)  # the first batch is at the server now
        second = [client.generate(f"b{i}", prompt_ids=p, sampling_params=dict(params)) for i, p in enumerate(PROMPTS)]
        return await asyncio.wait_for(asyncio.gather(first, *second), timeout=30)

    outs = run(staggered())
    assert len(outs) == 4 and [len(batch[0][0]) for batch in fake.batches] == [1, 3]


def test_cpu_runs_use_the_cpu_agent_loop_manager_and_its_worker_builds_verls_loops(monkeypatch):
    """CPU_SETTINGS name the manager through verl's own key; the manager's workers are CPUAgentLoopWorker; an agent
    loop whose registry entry is only a `_target_` is built directly, any other goes through verl's instantiate."""
    from verl.experimental.agent_loop import agent_loop as verl_agent_loop
    from verl.experimental.agent_loop.single_turn_agent_loop import SingleTurnAgentLoop
    from verl.trainer.ppo.v1.agent_loop_tq import AgentLoopManagerTQ
    from verl.utils.import_utils import load_class_from_fqn

    from verl_eopd.cpu import agent_loop, platform

    key = "actor_rollout_ref.rollout.agent.agent_loop_manager_class"
    assert platform.CPU_SETTINGS[key] == agent_loop.MANAGER
    manager = load_class_from_fqn(agent_loop.MANAGER, "AgentLoopManager")
    assert issubclass(manager, AgentLoopManagerTQ)
    instance = manager.__new__(manager)
    monkeypatch.setattr(AgentLoopManagerTQ, "__init__", lambda self, *a, **k: None)
    manager.__init__(instance)
    assert instance.agent_loop_workers_class.__ray_actor_class__ is agent_loop.CPUAgentLoopWorker

    worker = agent_loop.CPUAgentLoopWorker.__new__(agent_loop.CPUAgentLoopWorker)
    worker._loop_classes = {}
    monkeypatch.setitem(verl_agent_loop._agent_loop_registry, "custom",
                        {"_target_": SingleTurnAgentLoop.__module__ + ".SingleTurnAgentLoop", "name": "custom"})
    assert worker._direct_class("single_turn_agent") is SingleTurnAgentLoop
    assert worker._direct_class("custom") is None  # extra keys: verl's instantiate passes them on
