"""`trainer.dry_run=true` (issue 23, item 2): every GPU command the docs show, checked on this CPU machine as the
GPU nodes would meet it (the cluster's shape from the command), with local models and data so the tokenizer and
data checks are real. Nothing may start Ray or load weights: `run_ppo` is replaced by a function that fails the test
and `no_model_loads` fails any model load; the command-line test runs the real `python -m verl.trainer.main`."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest
from conftest import compose_trainer

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """The tiny student and teacher sharing one tokenizer, 400 training prompts (3 batches of the presets' 128) and
    a validation file, all local."""
    from conftest import STUDENT_VOCAB, TEACHER_VOCAB
    from tiny import build_tiny_qwen3, build_tokenizer

    from verl_eopd.cpu.embedded import ADD, Problem, write_rl_parquet

    root = tmp_path_factory.mktemp("dry")
    tok = build_tokenizer(str(root / "tokenizer"))
    out = {"student": build_tiny_qwen3(str(root / "student"), vocab_size=STUDENT_VOCAB, seed=0, tokenizer=tok),
           "teacher": build_tiny_qwen3(str(root / "teacher"), vocab_size=TEACHER_VOCAB, hidden=48, layers=3, seed=1,
                                       tokenizer=tok),
           "train": str(root / "train.parquet"), "val": str(root / "val.parquet")}
    write_rl_parquet([Problem(ADD, a, b) for a in range(20) for b in range(20)], out["train"], "train")
    write_rl_parquet([Problem(ADD, 5, 6)], out["val"], "val")
    return out


def _generic(models, algorithm="eopd"):
    """The README's command with the user's models and data."""
    return [f"algorithm={algorithm}", f"actor_rollout_ref.model.path={models['student']}",
            f"distillation.teacher_models.teacher_model.model_path={models['teacher']}",
            f"data.train_files={models['train']}", f"data.val_files={models['val']}"]


def _composed(algorithm: str, overrides: list[str]):
    """The config hydra composes for `algorithm=<a> <overrides>` (conftest.compose_trainer: each algorithm composed
    once, the overrides applied by hydra's own override step). The command-line test below goes through hydra's
    command line itself."""
    return compose_trainer(f"algorithm={algorithm}", *overrides)


@pytest.fixture
def dry(monkeypatch, no_model_loads, capsys):
    """`dry(overrides)`: compose as `python -m verl.trainer.main` does and run verl_eopd.main.run with the command's
    keys as the user's; returns (plan dict, printed text). verl's run_ppo fails the test if reached."""
    import verl.trainer.main_ppo as main_ppo

    from verl_eopd import dry_run, main

    def no_ray(*a, **k):
        raise AssertionError("a dry run reached verl's run_ppo")

    monkeypatch.setattr(main_ppo, "run_ppo", no_ray)
    plans = []
    real_plan = dry_run.plan
    monkeypatch.setattr(dry_run, "plan", lambda *a: plans.append(real_plan(*a)) or plans[-1])

    def go(overrides):
        overrides = list(overrides) + ["trainer.dry_run=true"]
        algorithm = next(o.split("=", 1)[1] for o in overrides if o.startswith("algorithm="))
        cfg = _composed(algorithm, [o for o in overrides if not o.startswith("algorithm=")])
        capsys.readouterr()
        main.run(cfg, user_keys=[o.split("=", 1)[0].lstrip("+~") for o in overrides], algorithm=algorithm)
        return plans[-1], capsys.readouterr().out

    return go


def _fix(message: str) -> list[str]:
    """The pasteable `key=value` overrides after "Fix:" in an error."""
    m = re.search(r"Fix: (.*)", message)
    assert m, f"no fix in: {message}"
    fixes = re.findall(r"([\w.]+=[^\s,;<>()]+)", m.group(1).split(", or")[0])
    assert fixes, f"no pasteable fix in: {message}"
    return [f.rstrip(".") for f in fixes]


@pytest.mark.parametrize("nnodes", [1, 2, 4])
def test_the_generic_command_plans_the_papers_gpu_run(models, dry, nnodes):
    """8 GPUs per node on 1, 2, 4 nodes: FSDP2, vllm (planned: not importable here, and the plan says the nodes need
    it), dynamic micro-batches, one global pool per node, the presets' run-level values."""
    plan, text = dry(_generic(models) + ["trainer.n_gpus_per_node=8", f"trainer.nnodes={nnodes}"])
    assert plan["device"] == "cuda" and plan["cluster"] == {"nodes": nnodes, "gpus_per_node": 8,
                                                            "from": plan["cluster"]["from"]}
    assert plan["placement"] == [[("global_pool", 8)]] * nnodes
    assert plan["ranks"]["data_parallel"] == 8 * nnodes
    assert plan["strategy"] == {"actor": "fsdp2", "ref": "fsdp2"}
    assert plan["rollout"]["name"] == "vllm" and plan["micro_batches"]["dynamic"] is True
    assert plan["batches"]["responses_per_rank_per_update"] * 8 * nnodes == 32
    assert plan["data"]["train_rows"] == 400 and plan["data"]["steps"] == 400 // 128 * 3
    assert plan["checkpoints"]["save_freq"] == 50 and plan["loggers"]["names"][:2] == ["console", "file"]
    import importlib.util

    if importlib.util.find_spec("vllm") is None:
        assert any("every GPU node needs it" in n and "vllm" in n for n in plan["notes"])
    for word in ("fsdp2", "vllm", "global_pool", "dynamic", plan["checkpoints"]["dir"]):
        assert word in text


def test_eopd_server_shares_one_node_or_spans_two(models, dry):
    """The teacher pool beside the trainer: 4 + 4 on one 8-GPU node; on two nodes 4 + 4 each."""
    plan, _ = dry(_generic(models, "eopd_server") + ["trainer.n_gpus_per_node=4", "distillation.n_gpus_per_node=4"])
    assert sorted(plan["placement"][0]) == [("global_pool", 4), ("teacher_pool", 4)]
    assert plan["teacher"]["backend"] == "vllm" and plan["teacher"]["route"] == "server"
    # verl's DistillationConfig tiles the pool with replicas of its inference parallelism
    assert plan["teacher"]["replicas"] * plan["teacher"]["gpus_per_replica"] == 4
    plan, _ = dry(_generic(models, "eopd_server") + ["trainer.n_gpus_per_node=4", "distillation.n_gpus_per_node=4",
                                                     "trainer.nnodes=2", "distillation.nnodes=2"])
    assert [sorted(node) for node in plan["placement"]] == [[("global_pool", 4), ("teacher_pool", 4)]] * 2


def test_eopd_server_on_a_full_node_is_refused_and_the_fix_passes(models, dry):
    """verl's teacher pool (distillation.n_gpus_per_node, 8 by default) beside 8 trainer GPUs on one 8-GPU node:
    16 GPUs on 8; Ray would wait for the placement group forever."""
    command = _generic(models, "eopd_server") + ["trainer.n_gpus_per_node=8"]
    with pytest.raises(ValueError, match=r"fits no node") as e:
        dry(command)
    assert "distillation.n_gpus_per_node" in str(e.value)
    plan, _ = dry(command + _fix(str(e.value)))
    assert sum(g for node in plan["placement"] for _, g in node) == 8


@pytest.mark.parametrize("extra", [["algorithm=eopd_grpo"], [
    "distillation.distillation_loss.from_hidden=true"]], ids=["eopd_grpo", "from_hidden"])
def test_eopd_grpo_and_from_hidden_plan(models, dry, extra):
    command = _generic(models) + ["trainer.n_gpus_per_node=8"]
    command = [c for c in command if not (c.startswith("algorithm=") and extra[0].startswith("algorithm="))] + extra
    plan, _ = dry(command)
    if extra[0] == "algorithm=eopd_grpo":
        assert plan["loss"]["use_task_rewards"] is True
        assert plan["batches"]["responses_per_step"] == plan["batches"]["prompts_per_step"] * 8
    else:
        assert plan["loss"]["from_hidden"] is True


def _recipe(models, tmp_path, setting: str, algo: str, **env) -> list[str]:
    """`PRINT=1 bash scripts/paper_recipe.sh SETTING ALGO`'s hydra overrides, with DATA_DIR holding the local data
    under the recipe's file names, TEACHER the local teacher, and the setting's Qwen student replaced by the local
    one (no hub here): everything else exactly as the script prints it."""
    import os
    import shutil

    data = tmp_path / "data"
    data.mkdir(exist_ok=True)
    for name in ("math_train", "dapo_math", "deepmath"):
        shutil.copy(models["train"], data / f"{name}.parquet")
    shutil.copy(models["val"], data / "math500.parquet")
    env = {**os.environ, "PRINT": "1", "DATA_DIR": str(data), "TEACHER": models["teacher"],
           "CKPT_DIR": str(tmp_path / "ckpt"), **env}
    out = subprocess.run(["bash", str(ROOT / "scripts" / "paper_recipe.sh"), setting, algo], capture_output=True,
                         text=True, env=env, timeout=300, check=True).stdout.splitlines()
    assert out[1:3] == ["-m", "verl_eopd.main"], out[:3]
    args = out[3:]
    student = [a for a in args if a.startswith("actor_rollout_ref.model.path=")]
    assert student == [f"actor_rollout_ref.model.path=Qwen/{setting.split('-')[0].capitalize()}-"
                       f"{setting.split('-')[1].upper()}-Base"], student
    return [f"actor_rollout_ref.model.path={models['student']}" if a in student else a for a in args]


RECIPE_STEPS = {"qwen3-0.6b-math": 3, "qwen3-1.7b-math": 3, "qwen3-4b-dapo": 2}  # epochs: 400 rows // 128 = 3 batches


@pytest.mark.parametrize("algo", ["opd", "eopd", "eopd_grpo", "eopd_server"])
@pytest.mark.parametrize("setting", list(RECIPE_STEPS))
def test_each_paper_recipe_setting_and_algorithm_plans(models, dry, tmp_path, setting, algo):
    """Every `scripts/paper_recipe.sh` setting x algorithm on one 8-GPU node: the launch passes every check and the
    plan is the recipe's (vllm, FSDP2, dynamic batches, the setting's epochs, its checkpoint folder; eopd_server:
    4 trainer + 4 teacher GPUs on the node)."""
    plan, text = dry(_recipe(models, tmp_path, setting, algo))
    assert plan["device"] == "cuda" and plan["strategy"] == {"actor": "fsdp2", "ref": "fsdp2"}
    assert plan["rollout"]["name"] == "vllm" and plan["micro_batches"]["dynamic"] is True
    assert plan["data"]["steps"] == 3 * RECIPE_STEPS[setting]
    assert plan["checkpoints"]["dir"] == str(tmp_path / "ckpt") and plan["checkpoints"]["save_freq"] == 50
    if algo == "eopd_server":
        assert sorted(plan["placement"][0]) == [("global_pool", 4), ("teacher_pool", 4)]
        assert plan["teacher"]["route"] == "server"
    else:
        assert plan["placement"] == [[("global_pool", 8)]]
    assert plan["loss"]["use_task_rewards"] is (algo == "eopd_grpo")


def test_the_paper_recipe_on_two_nodes_plans_both(models, dry, tmp_path):
    """NNODES=2: eopd on 16 trainer GPUs; eopd_server with the teacher pool on both nodes (4 + 4 each)."""
    plan, _ = dry(_recipe(models, tmp_path, "qwen3-1.7b-math", "eopd", NNODES="2"))
    assert plan["placement"] == [[("global_pool", 8)]] * 2 and plan["ranks"]["data_parallel"] == 16
    plan, _ = dry(_recipe(models, tmp_path, "qwen3-1.7b-math", "eopd_server", NNODES="2"))
    assert [sorted(node) for node in plan["placement"]] == [[("global_pool", 4), ("teacher_pool", 4)]] * 2


@pytest.mark.parametrize("override, key", [
    ("actor_rollout_ref.actor.ppo_mini_batch_size=30", "actor_rollout_ref.actor.ppo_mini_batch_size"),
    ("trainer.n_gpus_per_node=16", "trainer.n_gpus_per_node"),
    ("actor_rollout_ref.rollout.tensor_model_parallel_size=3", "actor_rollout_ref.rollout.tensor_model_parallel_size"),
], ids=["mini_batch", "node_too_small", "rollout_tp"])
def test_what_verl_refuses_after_ray_fails_here_naming_the_key_and_the_fix_passes(models, dry, override, key):
    """A mini-batch that does not cut over the ranks (verl asserts it at the first update, dynamic batching or not),
    a pool larger than a node (Ray waits forever), a rollout replica that does not tile the ranks (verl's workers)."""
    command = _generic(models) + ["trainer.n_gpus_per_node=8", override]
    with pytest.raises(ValueError) as e:
        dry(command)
    assert str(e.value).startswith(key) or f"{key}=" in str(e.value).split("Fix:")[0], str(e.value)
    plan, _ = dry(command + _fix(str(e.value)))
    assert plan["device"] == "cuda"


def test_a_training_file_smaller_than_one_batch_is_refused(models, dry, tmp_path):
    """verl drops the last partial batch: fewer prompts than data.train_batch_size train no step."""
    from verl_eopd.cpu.embedded import ADD, Problem, write_rl_parquet

    small = tmp_path / "small.parquet"
    write_rl_parquet([Problem(ADD, 1, 2)] * 3, small, "train")
    command = _generic(models) + ["trainer.n_gpus_per_node=8", f"data.train_files={small}"]
    with pytest.raises(ValueError, match=r"data.train_batch_size=3"):
        dry(command)


def test_a_file_without_the_prompt_column_is_refused(models, dry, tmp_path):
    import pandas as pd

    bad = tmp_path / "bad.parquet"
    pd.DataFrame({"question": ["1+1"] * 200}).to_parquet(bad)
    with pytest.raises(ValueError, match=r"data.train_files: .* has no column 'prompt'.*Fix: data.prompt_key="):
        dry(_generic(models) + ["trainer.n_gpus_per_node=8", f"data.train_files={bad}"])


def test_node_gpus_plans_other_nodes(models, dry):
    """trainer.node_gpus: nodes of 4 GPUs hold a 4-GPU pool on each of 2 nodes."""
    plan, _ = dry(_generic(models) + ["trainer.n_gpus_per_node=4", "trainer.nnodes=2", "trainer.node_gpus=4"])
    assert plan["cluster"]["gpus_per_node"] == 4 and plan["placement"] == [[("global_pool", 4)]] * 2


def test_the_embedded_default_dry_run_plans_this_cpu(dry):
    """No model given, no GPU here: the CPU plan of the default run (one rank, hf rollout)."""
    plan, text = dry(["algorithm=eopd"])
    assert plan["device"] == "cpu" and plan["rollout"]["name"] == "hf" and "placement" not in plan
    assert plan["data"]["train_rows"] >= 512 and "embedded tiny default" in text


def test_the_command_line_dry_run_exits_0_without_ray(models, tmp_path, fresh_python):
    """Issue 23's "done when": `python -m verl.trainer.main ... trainer.n_gpus_per_node=8 trainer.dry_run=true`
    exits 0, prints the plan with fsdp2 and vllm, and Ray is never initialised in that process."""
    code = ("import runpy, sys; sys.argv = ['verl.trainer.main'] + sys.argv[1:]; "
            "runpy.run_module('verl.trainer.main', run_name='__main__', alter_sys=True)\n"
            "import ray; print('RAY_INITIALIZED', ray.is_initialized())")
    args = _generic(models) + ["trainer.n_gpus_per_node=8", "trainer.dry_run=true"]
    out = fresh_python(["-c", code, *args], timeout=600, cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "RAY_INITIALIZED False" in out.stdout
    assert "dry run: every check passed" in out.stdout
    assert re.search(r"strategy\s+actor fsdp2, ref/teacher fsdp2", out.stdout)
    assert re.search(r"rollout\s+vllm", out.stdout)
    assert not (tmp_path / "checkpoints").exists()  # nothing written


def test_place_pools_by_hand():
    """Groups 4, 4, 3, 3, 2 on two 8-GPU nodes: spreading fails (4+3 and 4+3 leave 1 and 1 for the 2), packing fits
    (4+4 and 3+3+2); on two 7-GPU nodes 16 GPUs cannot fit; a group larger than a node names its key."""
    from verl_eopd.dry_run import place_pools

    spec = {"a": ("trainer.n_gpus_per_node", 4, 2), "b": ("distillation.n_gpus_per_node", 3, 2),
            "c": ("reward.reward_model.n_gpus_per_node", 2, 1)}
    placed = place_pools(spec, 2, 8)
    assert sorted(sorted(g for _, g in node) for node in placed) == [[2, 3, 3], [4, 4]]
    assert place_pools({"a": spec["a"]}, 2, 8) == [[("a", 4)], [("a", 4)]]  # spread
    with pytest.raises(ValueError, match="fits no node"):
        place_pools(spec, 2, 7)
    with pytest.raises(ValueError, match=r"^distillation.n_gpus_per_node=3: .* Fix: distillation.n_gpus_per_node=2 "
                                         r"distillation.nnodes=3"):
        place_pools({"b": spec["b"]}, 3, 2)


def test_the_plan_names_verls_tensorboard_folder(models, dry, monkeypatch, tmp_path):
    """verl's tracking.py writes to TENSORBOARD_DIR as given (not joined with project/experiment), else to
    tensorboard_log/<project>/<experiment> under the launch directory; a runtime_env value wins over this process's
    (it is what Ray's processes see)."""
    command = _generic(models) + ["trainer.n_gpus_per_node=8", "trainer.logger=[console,file,tensorboard]",
                                  "trainer.experiment_name=e"]
    plan, _ = dry(command)
    assert plan["loggers"]["tensorboard"] == str(tmp_path / "tensorboard_log" / "verl-eopd" / "e")  # cwd: tmp_path
    monkeypatch.setenv("TENSORBOARD_DIR", "/tb/mine")
    plan, _ = dry(command)
    assert plan["loggers"]["tensorboard"] == "/tb/mine"
    plan, _ = dry(command + ["+ray_kwargs.ray_init.runtime_env.env_vars.TENSORBOARD_DIR=/tb/ray"])
    assert plan["loggers"]["tensorboard"] == "/tb/ray"
