"""Hydra configs and the `python -m verl_eopd.main` entrypoint: composition and fail-fast validation."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
from conftest import compose_trainer

import verl_eopd

pytestmark = pytest.mark.integration

CONF = str(Path(verl_eopd.__file__).parent / "conf")


def _compose(*overrides: str):
    return compose_trainer(*overrides)  # hydra's compose, its defaults kept between tests (tests/conftest.py)


def _loss(cfg):
    return cfg.distillation.distillation_loss


@pytest.mark.parametrize(
    "algorithm,expected",
    [
        ("eopd", dict(fkl_coef=1.0, use_task_rewards=False, n=1)),
        ("opd", dict(fkl_coef=0.0, use_task_rewards=False, n=1)),
        ("eopd_grpo", dict(fkl_coef=1.0, use_task_rewards=True, n=8)),
    ],
)
def test_each_algorithm_composes_with_the_intended_values(algorithm, expected):
    cfg = _compose(f"algorithm={algorithm}")
    loss = _loss(cfg)
    assert loss._target_ == "verl_eopd.integration.config.EOPDLossConfig" and loss.loss_mode == "eopd"
    assert (loss.topk, loss.entropy_threshold, loss.clip_ratio_low, loss.clip_ratio_high) == (16, 0.8, 0.2, 0.2)
    assert loss.fkl_coef == expected["fkl_coef"] and loss.use_task_rewards == expected["use_task_rewards"]
    assert cfg.actor_rollout_ref.rollout.n == expected["n"]
    assert loss.teacher_route == "ref" and cfg.distillation.enabled is False
    assert cfg.trainer.v1.trainer_mode == "eopd" and cfg.trainer.use_v1 is True
    assert cfg.actor_rollout_ref.model.use_fused_kernels is False
    assert loss.use_policy_gradient is False and loss.loss_max_clamp is None
    assert cfg.actor_rollout_ref.actor.use_kl_loss is False and cfg.actor_rollout_ref.actor.loss_agg_mode == "token-mean"
    assert "rollout_correction" in cfg.algorithm  # verl's own algorithm sub-config survives our group
    assert cfg.algorithm.adv_estimator == "grpo"  # never verl's default gae, which would build a critic
    # the paper's training values for real models (the embedded default overrides them for CPU)
    actor, optim = cfg.actor_rollout_ref.actor, cfg.actor_rollout_ref.actor.optim
    assert (cfg.data.train_batch_size, cfg.data.max_response_length, actor.ppo_mini_batch_size, actor.ppo_epochs) == \
        (128, 4096, 32, 1)
    assert (optim.lr, optim.lr_scheduler_type, optim.min_lr_ratio, optim.lr_warmup_steps_ratio, optim.weight_decay) == \
        (3e-6, "cosine", 0.0, 0.0, 0.01)
    assert (optim.optimizer, actor.grad_clip, cfg.actor_rollout_ref.rollout.temperature,
            cfg.actor_rollout_ref.rollout.top_p) == ("AdamW", 1.0, 1.0, 1.0)
    # the composed node builds the validated dataclass
    from verl.utils.config import omega_conf_to_dataclass

    from verl_eopd.integration.config import EOPDLossConfig

    assert isinstance(omega_conf_to_dataclass(loss), EOPDLossConfig)


def test_cli_overrides_reach_the_loss_config():
    cfg = _compose("algorithm=eopd", "distillation.distillation_loss.entropy_threshold=1.5",
                   "distillation.distillation_loss.gate=quantile", "distillation.distillation_loss.gate_quantile=0.25")
    assert (_loss(cfg).entropy_threshold, _loss(cfg).gate, _loss(cfg).gate_quantile) == (1.5, "quantile", 0.25)


@pytest.fixture(scope="module")
def printed(tmp_path_factory, fresh_python) -> dict:
    """`--cfg job` of `python -m verl_eopd.main` and of the promised `python -m verl.trainer.main` (verl 0.9.1 has
    no such module; the plugin's finder serves verl_eopd/cli.py), the same overrides, run from another directory:
    two fresh processes for the module's tests (forked: conftest.fresh_python)."""
    cwd = tmp_path_factory.mktemp("cfg")
    args = ("algorithm=opd", "data.train_batch_size=64", "--cfg", "job")
    return {name: fresh_python(["-m", module, *args], cwd=cwd, env={**os.environ, "HYDRA_FULL_ERROR": "1"})
            for name, module in (("ours", "verl_eopd.main"), ("promised", "verl.trainer.main"))}


def test_main_prints_the_composed_config(printed):
    out = printed["ours"]
    assert out.returncode == 0, out.stderr[-2000:]
    assert "_target_: verl_eopd.integration.config.EOPDLossConfig" in out.stdout and "fkl_coef: 0.0" in out.stdout
    assert "trainer_mode: eopd" in out.stdout


def test_the_promised_command_is_the_same_run(printed):
    """`python -m verl.trainer.main algorithm=...` composes exactly the config of `python -m verl_eopd.main`."""
    ours, promised = printed["ours"], printed["promised"]
    assert promised.returncode == 0, promised.stderr[-2000:]
    assert promised.stdout == ours.stdout and "loss_mode: eopd" in promised.stdout
    assert "train_batch_size: 64" in promised.stdout


def test_verls_own_trainer_main_would_win_and_nothing_is_written_into_verl(tmp_path, monkeypatch):
    """The finder answers last: a `verl.trainer.main` that verl itself ships (a stand-in file on
    verl.trainer's path) is found first; and verl's installed package holds no file of ours. (In this process:
    verl's path and the import caches are put back afterwards.)"""
    import importlib.util

    import verl
    import verl.trainer

    from verl_eopd.integration.verl_main_alias import install

    install()  # what importing verl does through the plugin (a no-op when it already has)
    monkeypatch.delitem(sys.modules, "verl.trainer.main", raising=False)
    mine = importlib.util.find_spec("verl.trainer.main").origin
    (tmp_path / "main.py").write_text("VERLS_OWN = True\n")
    monkeypatch.setattr(verl.trainer, "__path__", [*verl.trainer.__path__, str(tmp_path)])
    sys.path_importer_cache.clear()
    try:
        theirs = importlib.util.find_spec("verl.trainer.main").origin
    finally:
        sys.path_importer_cache.clear()
    assert mine == str(Path(verl_eopd.__file__).parent / "cli.py")
    assert theirs == str(tmp_path / "main.py")
    assert not (Path(verl.__file__).parent / "trainer" / "main.py").exists()


def test_stock_verl_entrypoint_composes_our_config(fresh_python):
    out = fresh_python(["-m", "verl.trainer.main_ppo", f"--config-path={CONF}", "--config-name=eopd_trainer",
                        "algorithm=eopd_grpo", "--cfg", "job"], env={**os.environ, "HYDRA_FULL_ERROR": "1"})
    assert out.returncode == 0, out.stderr[-2000:]
    assert "use_task_rewards: true" in out.stdout and "_target_: verl_eopd.integration.config.EOPDLossConfig" in out.stdout


# ------------------------------------------------------------------------------------------------ fail fast


def _run(tiny_models, *overrides):
    """verl_eopd.main.prepare: every check of a run, no process state touched (run() = prepare + launch)."""
    from verl_eopd.main import prepare

    return prepare(_tiny_cfg(tiny_models, *overrides), user_keys=[o.split("=", 1)[0].lstrip("+~") for o in overrides])


def _run_prepare(cfg):
    from verl_eopd.main import prepare

    return prepare(cfg, user_keys=[])


def _tiny_cfg(tiny_models, *overrides):
    return _compose("algorithm=eopd", f"actor_rollout_ref.model.path={tiny_models['student']}",
                   f"data.train_files={tiny_models['train']}", f"data.val_files={tiny_models['val']}",
                   f"distillation.teacher_models.teacher_model.model_path={tiny_models['teacher']}",
                   "actor_rollout_ref.actor.ppo_micro_batch_size_per_gpu=2",
                   "actor_rollout_ref.rollout.log_prob_micro_batch_size_per_gpu=2",
                   "actor_rollout_ref.ref.log_prob_micro_batch_size_per_gpu=2", *overrides)


@pytest.mark.parametrize(
    "override,key",
    [
        ("distillation.teacher_models.teacher_model.model_path=null", "distillation.teacher_models.teacher_model.model_path"),
        ("distillation.distillation_loss.entropy_threshold=-0.5", "distillation.distillation_loss.entropy_threshold"),
        ("actor_rollout_ref.model.use_fused_kernels=true", "actor_rollout_ref.model.use_fused_kernels"),
        ("distillation.distillation_loss.topk=0", "distillation.distillation_loss.topk"),
        ("distillation.distillation_loss.gate=sigmoid", "distillation.distillation_loss.gate"),
        ("distillation.enabled=true", "distillation.enabled"),
        ("trainer.v1.trainer_mode=sync", "trainer.v1.trainer_mode"),
        ("actor_rollout_ref.actor.use_kl_loss=true", "actor_rollout_ref.actor.use_kl_loss"),
    ],
)
def test_bad_configs_fail_before_any_model_loads_naming_the_key(tiny_models, no_model_loads, override, key):
    with pytest.raises(ValueError) as e:
        _run(tiny_models, override)
    assert key in str(e.value) and "Fix:" in str(e.value)
    fix = _pasteable_fix(str(e.value))
    if fix is not None:  # the fix is an override: pasted after the bad one, the run passes every check
        _run(tiny_models, override, fix)


def test_from_hidden_with_an_entropy_bonus_is_refused_and_the_fix_works(tiny_models, no_model_loads):
    with pytest.raises(ValueError) as e:
        _run(tiny_models, "distillation.distillation_loss.from_hidden=true", "actor_rollout_ref.actor.entropy_coeff=0.01")
    assert "from_hidden" in str(e.value) and "actor_rollout_ref.actor.entropy_coeff" in str(e.value)
    fix = _pasteable_fix(str(e.value))
    assert fix == "actor_rollout_ref.actor.entropy_coeff=0"
    _run(tiny_models, "distillation.distillation_loss.from_hidden=true", "actor_rollout_ref.actor.entropy_coeff=0.01", fix)


def _pasteable_fix(message: str):
    """The first `key=value` override after "Fix:" (None when the fix names a placeholder such as <path>)."""
    import re

    m = re.search(r"Fix: (\+{0,2}[\w.]+=[^\s,;<>]+)", message)
    return m.group(1).rstrip(".)") if m and "<" not in message.split("Fix:", 1)[1].split()[0] else None


@pytest.mark.parametrize("ranks", [1, 2, 4])
def test_the_embedded_default_follows_the_rank_count(tiny_models, no_model_loads, monkeypatch, ranks):
    """`trainer.n_gpus_per_node=N` alone: Ray's logical GPUs follow N, every rank's share of the 512-response
    mini-batch cuts into whole micro-batches, and every check passes (the tiny models stand in for the pair)."""
    from verl_eopd.cpu import embedded
    from verl_eopd.main import prepare

    info = {**{k: tiny_models[k] for k in ("student", "teacher", "train", "val")}, "root": "/x", "task": embedded.ADD}
    monkeypatch.setattr(embedded, "embedded_pair", lambda task=embedded.ADD: info)
    cfg = _compose("algorithm=eopd", f"trainer.n_gpus_per_node={ranks}")
    prepare(cfg, user_keys=["trainer.n_gpus_per_node"])
    assert cfg.trainer.n_gpus_per_node == ranks and cfg.ray_kwargs.ray_init.num_gpus == ranks
    micro = cfg.actor_rollout_ref.actor.ppo_micro_batch_size_per_gpu
    assert micro == min(256, 512 // ranks) and (512 // ranks) % micro == 0
    assert cfg.actor_rollout_ref.rollout.log_prob_micro_batch_size_per_gpu == micro


@pytest.mark.parametrize("batch,mini,n", [(16, 16, 1), (24, 8, 1), (12, 6, 4)])
def test_the_embedded_default_fits_its_micro_batches_to_the_users_batch_sizes(tiny_models, no_model_loads,
                                                                             monkeypatch, batch, mini, n):
    """`data.train_batch_size=16` alone (the 512-response default cut by 256-row micro-batches would stop verl's
    first log-prob pass): the actor's micro-batches cut the mini-batch, the log-prob passes' cut the rollout
    batch, and every check passes."""
    from verl_eopd.cpu import embedded
    from verl_eopd.main import prepare

    info = {**{k: tiny_models[k] for k in ("student", "teacher", "train", "val")}, "root": "/x", "task": embedded.ADD}
    monkeypatch.setattr(embedded, "embedded_pair", lambda task=embedded.ADD: info)
    keys = [f"data.train_batch_size={batch}", f"actor_rollout_ref.actor.ppo_mini_batch_size={mini}",
            f"actor_rollout_ref.rollout.n={n}"]
    cfg = _compose("algorithm=eopd", *keys)
    prepare(cfg, user_keys=[k.split("=")[0] for k in keys])
    aref = cfg.actor_rollout_ref
    assert (mini * n) % aref.actor.ppo_micro_batch_size_per_gpu == 0
    for micro in (aref.rollout.log_prob_micro_batch_size_per_gpu, aref.ref.log_prob_micro_batch_size_per_gpu):
        assert (batch * n) % micro == 0 and micro == min(256, batch * n)


def test_a_log_prob_micro_batch_that_cannot_cut_the_rollout_batch_fails_before_ray_and_the_fix_works(
        tiny_models, no_model_loads):
    with pytest.raises(ValueError) as e:
        _run(tiny_models, "data.train_batch_size=6", "actor_rollout_ref.actor.ppo_mini_batch_size=6",
             "actor_rollout_ref.rollout.log_prob_micro_batch_size_per_gpu=4")
    msg = str(e.value)
    assert "data.train_batch_size" in msg and "actor_rollout_ref.rollout.log_prob_micro_batch_size_per_gpu" in msg
    fix = _pasteable_fix(msg)
    assert fix == "actor_rollout_ref.rollout.log_prob_micro_batch_size_per_gpu=3"
    _run(tiny_models, "data.train_batch_size=6", "actor_rollout_ref.actor.ppo_mini_batch_size=6",
         "actor_rollout_ref.rollout.log_prob_micro_batch_size_per_gpu=4", fix)


@pytest.mark.parametrize("overrides,fix", [
    (("actor_rollout_ref.actor.ppo_mini_batch_size=6", "actor_rollout_ref.actor.ppo_micro_batch_size_per_gpu=4"),
     "actor_rollout_ref.actor.ppo_micro_batch_size_per_gpu=3"),  # 6 responses on 1 rank: micro 4 cannot cut them
    (("actor_rollout_ref.actor.ppo_mini_batch_size=6", "trainer.n_gpus_per_node=4"),
     "trainer.n_gpus_per_node=3"),  # 6 responses over 4 ranks
])
def test_a_batch_that_cannot_divide_over_the_ranks_fails_before_ray_and_the_fix_works(tiny_models, no_model_loads,
                                                                                      overrides, fix):
    with pytest.raises(ValueError) as e:
        _run(tiny_models, "data.train_batch_size=6", *overrides)
    assert "actor_rollout_ref.actor.ppo_micro_batch_size_per_gpu" in str(e.value) and "trainer.n_gpus_per_node" in str(e.value)
    assert _pasteable_fix(str(e.value)) == fix
    _run(tiny_models, "data.train_batch_size=6", *overrides, fix)


def test_mismatched_tokenizer_is_refused(tmp_path, tiny_models, no_model_loads):
    from tiny import build_tiny_qwen3
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.train_from_iterator([f"Zebra {i} quokka {i * 7}" for i in range(300)],
                            trainers.BpeTrainer(vocab_size=300, special_tokens=["<|im_end|>", "<|endoftext|>"],
                                                show_progress=False, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    other = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>")
    other_teacher = build_tiny_qwen3(str(tmp_path / "other"), vocab_size=352, tokenizer=other)
    with pytest.raises(ValueError) as e:
        _run(tiny_models, f"distillation.teacher_models.teacher_model.model_path={other_teacher}")
    assert "distillation.teacher_models.teacher_model.model_path" in str(e.value) and "tokenizer" in str(e.value)


def test_padded_teacher_vocabulary_is_accepted(tiny_models, no_model_loads):
    """Same tokenizer, teacher table 352 rows vs student 320: passes every check, ours and verl's."""
    loss, env, on_cpu, embedded = _run(tiny_models)
    assert loss.teacher_route == "ref" and env["VERL_PLATFORM"] == "cpu" and on_cpu and embedded is None
    # every process: the console mode, and TransferQueue's threads capped at the physical cores (its warning
    # otherwise repeats on every put/get)
    import psutil

    assert env["EOPD_CONSOLE"] == "compact"
    assert 1 <= int(env["TQ_NUM_THREADS"]) <= min(8, psutil.cpu_count(logical=False) or 1)


def test_server_route_preset_composes_and_is_checked(tiny_models, no_model_loads):
    cfg = _compose("algorithm=eopd_server")
    loss = _loss(cfg)
    assert cfg.distillation.enabled is True and loss.teacher_route == "server" and loss.topk == 16
    assert cfg.trainer.v1.trainer_mode == "eopd" and loss.use_task_rewards is False
    with pytest.raises(ValueError, match="teacher_route=server needs verl's teacher pool"):
        _run(tiny_models, "distillation.distillation_loss.teacher_route=server")


@pytest.mark.parametrize(
    "overrides,key",
    [
        (("ray_kwargs.ray_init.num_cpus=4", "transfer_queue.backend.SimpleStorage.num_data_storage_units=8"),
         "ray_kwargs.ray_init.num_cpus"),
        (("+ray_kwargs.ray_init.num_gpus=0", "trainer.device=cpu"), "ray_kwargs.ray_init.num_gpus"),
    ],
)
def test_unsatisfiable_ray_resources_on_cpu_are_an_error_not_a_hang(tiny_models, no_model_loads, overrides, key):
    """CPU runs: a placement Ray could never satisfy (it would wait silently) fails at start, naming the key;
    the override after "Fix:" pasted as written makes the run pass every check."""
    from verl_eopd.main import prepare

    keys = [o.split("=", 1)[0].lstrip("+") for o in overrides]
    with pytest.raises(ValueError) as e:
        prepare(_tiny_cfg(tiny_models, "trainer.device=cpu", *overrides), user_keys=keys)
    assert key in str(e.value) and "Fix:" in str(e.value)
    fix = _pasteable_fix(str(e.value))
    assert fix is not None and fix.lstrip("+").startswith(key), str(e.value)
    prepare(_tiny_cfg(tiny_models, "trainer.device=cpu", *overrides, fix), user_keys=keys + [key])


@pytest.mark.parametrize("mode,value", [("exact", "1"), ("fallback", "0")])
def test_server_route_switches_the_token_column_patch_in_every_process(tiny_models, no_model_loads, monkeypatch,
                                                                       mode, value):
    """teacher_route=server: EOPD_TEACHER_TOKEN_COLUMN reaches this process and, through Ray's runtime_env,
    every worker (the teacher servers patch their extraction at import, verl_eopd.integration.server_route)."""
    from verl_eopd.integration.server_route import ENV
    from verl_eopd.main import prepare

    monkeypatch.delenv(ENV, raising=False)
    cfg = _compose("algorithm=eopd_server", f"actor_rollout_ref.model.path={tiny_models['student']}",
                   f"data.train_files={tiny_models['train']}", f"data.val_files={tiny_models['val']}",
                   f"distillation.teacher_models.teacher_model.model_path={tiny_models['teacher']}",
                   f"distillation.distillation_loss.server_token_logprob={mode}",
                   "actor_rollout_ref.actor.ppo_micro_batch_size_per_gpu=2",
                   "actor_rollout_ref.rollout.log_prob_micro_batch_size_per_gpu=2")
    _, env, on_cpu, _ = prepare(cfg)
    assert env[ENV] == value and ENV not in os.environ  # prepare touches no process state; run() exports env
    assert cfg.ray_kwargs.ray_init.runtime_env.env_vars[ENV] == value
    assert env["VERL_USE_EXTERNAL_MODULES"].split(",")[-1] == "verl_eopd.plugin" and on_cpu
    assert cfg.ray_kwargs.ray_init.runtime_env.env_vars["VERL_PLATFORM"] == "cpu"


def test_embedded_default_picks_a_rollout_backend_and_one_rank_on_any_machine(monkeypatch):
    """With no model given the run must not fall back to verl's unset rollout.name and 8 GPUs: vLLM when it is
    importable (a stand-in module here), the `hf` backend otherwise; on CPU the CPU settings choose `hf`."""
    import importlib.util
    import types

    from verl_eopd.cpu import embedded
    from verl_eopd.cpu.platform import CPU_SETTINGS

    info = {k: f"/x/{k}" for k in ("student", "teacher", "train", "val")}
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "vllm" else real(name, *a))
    settings = embedded.embedded_settings(info, "eopd")
    assert settings["actor_rollout_ref.rollout.name"] == "hf"
    assert settings["trainer.n_gpus_per_node"] == 1 and settings["trainer.nnodes"] == 1
    # hf: the rollout's own log-probs serve as old log-probs (they equal a dense forward: test_hf_rollout.py)
    assert settings["algorithm.rollout_correction.bypass_mode"] is True
    stand_in = types.SimpleNamespace(name="vllm")
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: stand_in if name == "vllm" else real(name, *a))
    on_gpu = embedded.embedded_settings(info, "eopd")
    assert on_gpu["actor_rollout_ref.rollout.name"] == "vllm"
    assert on_gpu["algorithm.rollout_correction.bypass_mode"] is False  # bf16 vLLM: verl recomputes them
    assert CPU_SETTINGS["actor_rollout_ref.rollout.name"] == "hf"  # applied after the embedded settings on CPU


FP32_KEYS = ("actor_rollout_ref.actor.fsdp_config.mixed_precision.param_dtype",
             "actor_rollout_ref.ref.fsdp_config.mixed_precision.param_dtype",
             "distillation.distillation_loss.teacher_param_dtype")


@pytest.mark.parametrize("overrides,expected", [
    ((), ("fp32", "fp32", "fp32")),
    # a user's leaf wins over the CPU default
    (("++actor_rollout_ref.actor.fsdp_config.mixed_precision.param_dtype=bf16",), ("bf16", "fp32", "fp32")),
    # so does a user's node above the default's key: the whole node is the user's (verl fills reduce/buffer dtypes)
    (("++actor_rollout_ref.ref.fsdp_config.mixed_precision={param_dtype:bf16}",
      "distillation.distillation_loss.teacher_param_dtype=bf16"), ("fp32", "bf16", "bf16")),
])
def test_cpu_runs_compute_in_fp32_unless_the_user_says_otherwise(tiny_models, no_model_loads, overrides, expected):
    """On CPU the actor and the teacher (ref) engines compute in fp32, not verl's bf16 default (bf16 matmuls are
    4-5x slower on CPUs without bf16 units: docs/cpu.md), and verl's own engine config reads the value."""
    from omegaconf import OmegaConf
    from verl.utils.config import omega_conf_to_dataclass

    from verl_eopd.main import prepare

    cfg = _tiny_cfg(tiny_models, "trainer.device=cpu", *overrides)
    assert prepare(cfg, user_keys=["trainer.device"] + [o.split("=", 1)[0].lstrip("+~") for o in overrides]).on_cpu
    assert tuple(OmegaConf.select(cfg, k) for k in FP32_KEYS) == expected
    for role, dtype in zip(("actor", "ref"), expected):
        engine = omega_conf_to_dataclass(cfg.actor_rollout_ref[role].fsdp_config)
        assert engine.mixed_precision["param_dtype"] == dtype  # what verl's FSDP engine builds its policy from


@pytest.mark.parametrize("overrides,expected", [
    ((), 0),  # our agent-loop workers score each response themselves: verl's reward actors would sit idle
    (("algorithm=eopd_grpo",), 0),  # task rewards: scored the same way
    (("reward.reward_manager.name=remote",), 1),  # verl's remote manager sizes its scoring pool by the key
    (("+actor_rollout_ref.rollout.agent.agent_loop_manager_class=verl.experimental.agent_loop.AgentLoopManager",), 1),
    (("reward.num_workers=3",), 3),  # the user's value wins
])
def test_cpu_runs_start_verls_reward_actors_only_when_something_calls_them(tiny_models, no_model_loads, overrides,
                                                                           expected):
    from verl.experimental.reward_loop.reward_manager.remote import RemoteRewardManager  # noqa: F401 (registered)

    from verl_eopd.main import prepare

    cfg = _tiny_cfg(tiny_models, "trainer.device=cpu", *overrides)
    assert prepare(cfg, user_keys=["trainer.device"] + [o.split("=", 1)[0].lstrip("+") for o in overrides]).on_cpu
    assert cfg.reward.num_workers == expected
    # a reward model is scored by verl's reward actors (compute_rm_score splits the batch over them)
    from verl_eopd.cpu.platform import reward_loop_workers

    assert reward_loop_workers(_tiny_cfg(tiny_models, "reward.reward_model.enable=true",
                                         *[o for o in overrides if "num_workers" not in o])) >= 1
    if expected == 0:
        cfg.reward.reward_model.enable = True
        assert reward_loop_workers(cfg) == 1


def test_the_algorithm_choice_does_not_hide_the_embedded_defaults_below_algorithm(tiny_models, no_model_loads,
                                                                                  monkeypatch):
    """`algorithm=eopd` on the command line is a config-group choice (verl_eopd.main._cli_keys lists it as
    "algorithm"): the embedded default's `algorithm.rollout_correction.bypass_mode` and the CPU fp32 engines still
    apply, while a value the user set below `algorithm` wins (a node-above rule that counted the group choice
    recomputed the old log-probs in the default run, 1.8 s per step)."""
    from verl_eopd.cpu import embedded
    from verl_eopd.main import prepare

    info = {**{k: tiny_models[k] for k in ("student", "teacher", "train", "val")}, "root": "/x", "task": embedded.ADD}
    monkeypatch.setattr(embedded, "embedded_pair", lambda task=embedded.ADD: info)
    monkeypatch.setattr(embedded, "default_rollout_backend", lambda: "hf")
    cfg = _compose("algorithm=eopd", "trainer.device=cpu")
    prepare(cfg, user_keys=["algorithm", "trainer.device"])
    assert cfg.algorithm.rollout_correction.bypass_mode is True
    assert tuple(cfg.actor_rollout_ref[r].fsdp_config.mixed_precision.param_dtype for r in ("actor", "ref")) == ("fp32",) * 2
    cfg = _compose("algorithm=eopd", "trainer.device=cpu", "algorithm.rollout_correction.bypass_mode=false")
    prepare(cfg, user_keys=["algorithm", "trainer.device", "algorithm.rollout_correction.bypass_mode"])
    assert cfg.algorithm.rollout_correction.bypass_mode is False


@pytest.mark.parametrize("override,key,message", [
    ("data.train_files=/nonexistent/train.parquet", "data.train_files", "no such file"),
    ("data.val_files=[/nonexistent/val.parquet]", "data.val_files", "no such file"),
    ("actor_rollout_ref.model.path=./no/such/folder", "actor_rollout_ref.model.path", "neither an existing folder"),
    ("distillation.teacher_models.teacher_model.model_path='not a hub id!'",
     "distillation.teacher_models.teacher_model.model_path", "neither an existing folder"),
])
def test_missing_files_and_bad_model_paths_fail_fast_naming_the_key(tiny_models, no_model_loads, override, key,
                                                                    message):
    with pytest.raises(ValueError) as e:  # before any model loads (no_model_loads), and so in seconds
        _run(tiny_models, override)
    assert f"{key}=" in str(e.value) and message in str(e.value) and "Fix:" in str(e.value), str(e.value)


def test_a_tokenizer_that_cannot_load_is_named(tmp_path, tiny_models, no_model_loads):
    broken = tmp_path / "broken_teacher"
    broken.mkdir()
    (broken / "config.json").write_text("{}")
    with pytest.raises(ValueError) as e:
        _run(tiny_models, f"distillation.teacher_models.teacher_model.model_path={broken}")
    assert "distillation.teacher_models.teacher_model.model_path=" in str(e.value)
    assert "tokenizer does not load" in str(e.value) and "Fix:" in str(e.value)


# ------------------------------------------------------------------------------------------------ GPU machines


def test_a_gpu_run_without_flash_attn_falls_back_to_sdpa(tiny_models, no_model_loads, monkeypatch):
    """Stand-ins: a visible GPU, and flash-attn absent or present. Absent: sdpa on padded micro-batches for the
    actor (the reference-route teacher inherits it); present, or set by the user: untouched."""
    import importlib.util

    from verl_eopd.cpu import platform as cpu

    monkeypatch.setattr(cpu, "gpu_available", lambda: True)
    real = importlib.util.find_spec
    # a GPU machine has vllm (without vllm or sglang a GPU run is refused: tests/test_gpu_launch.py)
    real_or_vllm = lambda name, *a: object() if name == "vllm" else real(name, *a)  # noqa: E731
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "flash_attn" else real_or_vllm(name, *a))
    from verl_eopd.main import prepare

    cfg = _tiny_cfg(tiny_models)
    _, env, on_cpu, _ = prepare(cfg)
    assert not on_cpu and "VERL_PLATFORM" not in env
    assert cfg.actor_rollout_ref.model.override_config.attn_implementation == "sdpa"
    assert cfg.actor_rollout_ref.model.use_remove_padding is False
    cfg = _tiny_cfg(tiny_models, "+actor_rollout_ref.model.override_config.attn_implementation=eager")
    prepare(cfg, user_keys=["actor_rollout_ref.model.override_config.attn_implementation"])
    assert cfg.actor_rollout_ref.model.override_config.attn_implementation == "eager"
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: object() if name == "flash_attn" else real_or_vllm(name, *a))
    cfg = _tiny_cfg(tiny_models)
    prepare(cfg)
    assert "attn_implementation" not in (cfg.actor_rollout_ref.model.get("override_config") or {})


@pytest.mark.parametrize("device,local_gpu,address,cluster,expected", [
    ("cpu", True, None, None, True),  # asked for
    ("cuda", True, None, None, False),
    ("cuda", False, None, None, True),  # no GPU anywhere the run can see
    ("cuda", False, "10.0.0.1:6379", 8.0, False),  # a CPU-only head/login node joining a GPU cluster
    ("cuda", False, "10.0.0.1:6379", 0.0, True),  # a CPU-only cluster
    ("cuda", False, "local", None, True),
])
def test_cpu_mode_only_when_asked_or_when_no_gpu_is_visible_to_the_run(monkeypatch, device, local_gpu, address,
                                                                        cluster, expected):
    from omegaconf import OmegaConf

    from verl_eopd.cpu import platform as cpu

    asked = []
    monkeypatch.setattr(cpu, "gpu_available", lambda: local_gpu)
    monkeypatch.setattr(cpu, "cluster_gpus", lambda a: asked.append(a) or cluster)
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    if address:
        monkeypatch.setenv("RAY_ADDRESS", address)
    assert cpu.run_on_cpu(OmegaConf.create({"trainer": {"device": device}})) is expected
    assert asked == ([address] if cluster is not None else [])
    if address and cluster is not None:  # the config's address is the same door
        monkeypatch.delenv("RAY_ADDRESS")
        asked.clear()
        cfg = OmegaConf.create({"trainer": {"device": device}, "ray_kwargs": {"ray_init": {"address": address}}})
        assert cpu.run_on_cpu(cfg) is expected and asked == [address]


def test_resuming_a_checkpoint_trained_with_other_eopd_settings_is_refused_before_ray(tiny_models, no_model_loads,
                                                                                     tmp_path):
    """A checkpoint folder whose eopd_settings.json says fkl_coef 0.5 and tau 1.2: this run (1.0, 0.8) would
    continue it under another objective. Refused naming the settings; the three fixes each pass."""
    import json

    from verl_eopd.integration.config import settings_record

    ckpt = tmp_path / "ckpt"
    (ckpt / "global_step_7").mkdir(parents=True)
    (ckpt / "latest_checkpointed_iteration.txt").write_text("7")
    prepared = _tiny_cfg(tiny_models)  # what a run records: its config after prepare (the CPU settings applied)
    _run_prepare(prepared)
    saved = settings_record(prepared)
    saved.update(fkl_coef=0.5, entropy_threshold=1.2, logits_chunk_mb=1)  # chunk size: speed only, never a change
    (ckpt / "global_step_7" / "eopd_settings.json").write_text(json.dumps(saved))
    where = f"trainer.default_local_dir={ckpt}"
    with pytest.raises(ValueError) as e:
        _run(tiny_models, where)
    msg = str(e.value)
    assert "fkl_coef: 0.5 -> 1.0" in msg and "entropy_threshold: 1.2 -> 0.8" in msg and "logits_chunk_mb" not in msg
    assert "global_step_7" in msg and "Fix: trainer.resume_accept_changed_eopd=true" in msg
    _run(tiny_models, where, _pasteable_fix(msg))
    _run(tiny_models, where, "trainer.resume_mode=disable")
    _run(tiny_models, f"trainer.default_local_dir={tmp_path / 'elsewhere'}")
    saved.update(fkl_coef=1.0, entropy_threshold=0.8)
    (ckpt / "global_step_7" / "eopd_settings.json").write_text(json.dumps(saved))
    _run(tiny_models, where)  # same objective: resumes
