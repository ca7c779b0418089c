"""After the run (issue 26): export, evaluate, use, on the shipped tiny pair's student.

No trainer launch: the checkpoint is a real verl FSDP2 checkpoint of the pair's student, written by verl's own
engine and `FSDPCheckpointManager` in this process (one gloo rank, the suite's `verl_cpu` fixture), after the
weights were changed so that an export of the original student cannot pass. The tracker file is written with
the step, as verl's trainer writes it after the save (ray_trainer `_save_checkpoint`). Then, each pasted as
printed: the end-of-run summary's merge command, `scripts/evaluate.py --pass-k 1,8`, and the transformers
snippet of docs/after_training.md.
"""

from __future__ import annotations

import json
import re
from functools import partial
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from verl_eopd.cpu.embedded import load_pair, shipped_dir
from verl_eopd.math.eval import (DataParallelGenerator, EvalSettings, check_model, pass_at_k, plan_devices,
                                 shard_bounds)
from verl_eopd.report import summarize

from after_training import broken_engine, export_evaluate_use, fake_engine, field

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[1]
STEP = 3


@pytest.fixture(scope="module")
def saved(verl_cpu, tmp_path_factory):
    """verl's FSDP2 engine on the pair's student; checkpoint STEP saved by verl (model, optimizer, extra)."""
    from verl.trainer.config import CheckpointConfig
    from verl.workers.config import FSDPEngineConfig, FSDPOptimizerConfig, HFModelConfig
    from verl.workers.engine import EngineRegistry

    pair = load_pair(shipped_dir())
    engine = EngineRegistry.new(
        model_type="language_model", backend="fsdp2",
        model_config=HFModelConfig(path=pair["student"], enable_gradient_checkpointing=False,
                                   override_config={"attn_implementation": "sdpa"}),
        engine_config=FSDPEngineConfig(strategy="fsdp2", use_torch_compile=False, micro_batch_size_per_gpu=2,
                                       mixed_precision={"param_dtype": "fp32", "reduce_dtype": "fp32",
                                                        "buffer_dtype": "fp32"}),
        optimizer_config=FSDPOptimizerConfig(lr=1e-3, total_training_steps=4),
        checkpoint_config=CheckpointConfig(),
    )
    engine.initialize()
    with torch.no_grad():  # "training": the final norm's scale changes, so the export must carry these weights
        engine.module.model.norm.weight.mul_(1.25)
    root = tmp_path_factory.mktemp("run") / "ckpt"
    engine.save_checkpoint(local_path=str(root / f"global_step_{STEP}" / "actor"), global_step=STEP)
    (root / "latest_checkpointed_iteration.txt").write_text(str(STEP))
    state = {k: (v.full_tensor() if hasattr(v, "full_tensor") else v).detach().clone()
             for k, v in engine.module.state_dict().items()}
    return {"engine": engine, "root": root, "pair": pair, "state": state}


def _config(root: Path, logger=("console",)):
    return OmegaConf.create({"trainer": {"default_local_dir": str(root), "logger": list(logger), "project_name": "p",
                                         "experiment_name": "e"}})


def test_export_evaluate_use_each_pasted_as_printed(saved, tmp_path, fresh_python):
    root, pair = saved["root"], saved["pair"]
    text = summarize(_config(root), 60.0)  # console logger only: still the export lines
    assert field(text, "checkpoint:").startswith(f"{root / f'global_step_{STEP}'} (step {STEP}")
    assert field(text, "export:") == (f"python -m verl.model_merger merge --backend fsdp --local_dir "
                                      f"{root / f'global_step_{STEP}' / 'actor'} --target_dir {root / 'hf' / f'global_step_{STEP}'}")
    target = root / "hf" / f"global_step_{STEP}"
    assert not target.exists()
    # one HF engine, and the `python ...` lines forked (conftest.fresh_python): the default run's test
    # (tests/test_e2e_cpu.py) pastes the same lines into a real shell with two data-parallel engine processes, and
    # test_data_parallel_engines_merge_in_order_with_the_single_engine_seeds checks their merge order
    done = export_evaluate_use(text, tmp_path, pair["val"], problems=6, engines=1, python=fresh_python)
    assert done["target"] == target
    print(text, done["evaluate"].stdout, done["use"].stdout, sep="\n")  # shown with pytest -s

    # 1. the merged folder: transformers loads it, and it holds the saved (changed) weights
    from transformers import AutoModelForCausalLM, AutoTokenizer

    ours = AutoModelForCausalLM.from_pretrained(str(target)).state_dict()
    for key, value in saved["state"].items():  # the merger casts every shard to bf16: exact rounding
        assert torch.equal(ours[key].to(torch.bfloat16), value.to(torch.bfloat16)), key
    original = AutoModelForCausalLM.from_pretrained(pair["student"]).state_dict()
    assert not torch.equal(ours["model.norm.weight"].float(), original["model.norm.weight"].to(torch.bfloat16).float())
    assert AutoTokenizer.from_pretrained(str(target)).chat_template == \
        AutoTokenizer.from_pretrained(pair["student"]).chat_template
    assert (target / "model.safetensors").is_file() and (target / "generation_config.json").is_file()

    # 2. evaluate.py --pass-k 1,8 on it, one HF engine on CPU: the table from the samples
    proc, out = done["evaluate"], done["eval_dir"]
    assert "[eval] 1 engine x tensor-parallel 1 on no GPUs (CPU)" in proc.stderr
    lines = proc.stdout.splitlines()
    assert lines[0] == "| benchmark | problems | Avg@8 | Pass@1 | Pass@8 |"
    rows = [json.loads(x) for x in (out / "samples.jsonl").read_text().splitlines()]
    assert sorted(r["index"] for r in rows) == list(range(6)) and all(len(r["responses"]) == 8 for r in rows)
    correct = [sum(s > 0.5 for s in r["scores"]) for r in rows]
    avg = 100 * sum(correct) / 48
    p8 = 100 * sum(pass_at_k(8, c, 8) for c in correct) / 6
    assert f"| add | 6 | {avg:.2f} | {avg:.2f} | {p8:.2f} |" in lines and f"| mean | 6 | {avg:.2f} |" in proc.stdout

    # 3. the doc's transformers snippet ran on it and printed the reward's reading of its answer
    assert re.search(r"^answer: .* score: [01]\.0$", done["use"].stdout, flags=re.M), done["use"].stdout


def test_a_checkpoint_folder_is_refused_with_the_merge_command(saved, tmp_path, fresh_python):
    """No weights in the checkpoint's huggingface/ folder: evaluate.py stops before loading, naming --model and
    the command that makes the folder to pass instead."""
    root = saved["root"]
    actor = root / f"global_step_{STEP}" / "actor"
    for given in (actor / "huggingface", actor, root / f"global_step_{STEP}", root):
        proc = fresh_python([str(ROOT / "scripts" / "evaluate.py"), "--model", str(given), "--output-dir",
                             str(tmp_path / "ev"), "--benchmarks", f"a={saved['pair']['val']}"])
        assert proc.returncode == 2, proc.stderr[-2000:]
        assert f"--model {given}: a verl FSDP checkpoint" in proc.stderr
        assert (f"python -m verl.model_merger merge --backend fsdp --local_dir {actor} --target_dir "
                f"{root / 'hf' / f'global_step_{STEP}'}") in proc.stderr
        assert not (tmp_path / "ev").exists()  # refused before anything was written
    with pytest.raises(FileNotFoundError, match="no model weights"):
        check_model(str(tmp_path))
    with pytest.raises(FileNotFoundError, match="no such folder"):
        check_model(str(tmp_path / "missing"))
    check_model("Qwen/Qwen3-1.7B-Base")  # a hub id passes (nothing to check locally)


def test_save_contents_with_hf_model_writes_a_loadable_folder_on_fsdp2_cpu(saved):
    """verl's `actor.checkpoint.save_contents=[model,optimizer,extra,hf_model]`: the checkpoint's huggingface/
    folder gets the weights, and the summary points at it instead of printing a merge command."""
    engine, root = saved["engine"], saved["root"]
    manager = engine.checkpoint_manager
    before = list(manager.checkpoint_save_contents)
    manager.checkpoint_save_contents = ["model", "optimizer", "extra", "hf_model"]  # what the config key sets
    try:
        engine.save_checkpoint(local_path=str(root / "global_step_4" / "actor"), global_step=4)
    finally:
        manager.checkpoint_save_contents = before
    (root / "latest_checkpointed_iteration.txt").write_text("4")
    try:
        hf = root / "global_step_4" / "actor" / "huggingface"
        text = summarize(_config(root), 1.0)
        assert field(text, "HF folder:").startswith(f"{hf} (saved with the checkpoint") and "model_merger" not in text
        from transformers import AutoModelForCausalLM

        loaded = AutoModelForCausalLM.from_pretrained(str(hf)).state_dict()
        for key, value in saved["state"].items():
            assert torch.equal(loaded[key].float(), value.to(loaded[key].dtype).float()), key
    finally:
        (root / "latest_checkpointed_iteration.txt").write_text(str(STEP))


# ------------------------------------------------------------------------------- data parallel, sharding


@pytest.mark.parametrize("total,parts", [(10, 3), (2, 4), (0, 2), (8, 8), (7, 1)])
def test_shard_bounds_cover_in_order(total, parts):
    bounds = shard_bounds(total, parts)
    assert len(bounds) == parts and bounds[0][0] == 0 and bounds[-1][1] == total
    assert all(a[1] == b[0] for a, b in zip(bounds, bounds[1:]))
    sizes = [e - s for s, e in bounds]
    assert max(sizes) - min(sizes) <= 1


def test_data_parallel_engines_merge_in_order_with_the_single_engine_seeds():
    prompts = [[{"role": "user", "content": f"q{i}"}] for i in range(5)]
    s = EvalSettings(model="m", k=2)
    gen = DataParallelGenerator(partial(fake_engine, "e"), ["3", "5,6"])
    try:
        assert gen.engines == 2
        out = gen(prompts, s, 100)
        again = gen(prompts[:1], s, 5)  # fewer prompts than engines: the idle engine gets nothing
    finally:
        gen.close()
    strip = lambda rows: [[re.sub(r"\|dev=[^|]*", "", x) for x in r] for r in rows]  # noqa: E731
    assert strip(out) == strip(fake_engine("e")(prompts, s, 100))  # order and per-prompt seeds of one engine
    devices = [re.search(r"dev=([^|]*)", r[0]).group(1) for r in out]
    assert devices == ["3", "3", "3", "5,6", "5,6"]  # shards 3/2, each on its own device group
    assert [re.search(r"dev=([^|]*)", r[0]).group(1) for r in again] == ["3"]
    assert strip(again) == strip(fake_engine("e")(prompts[:1], s, 5))


def test_a_failing_engine_is_reported_not_waited_on():
    with pytest.raises(RuntimeError, match=r"devices '1' failed:(.|\n)*CUDA out of memory \(stand-in\)"):
        DataParallelGenerator(broken_engine, ["0", "1"][1:])


@pytest.mark.parametrize("gpus,weights,memory,tp,dp,expected", [
    (8, 4 * 2**30, 80 * 2**30, None, None, (8, 1)),    # 1.7B bf16 on 80 GB: one engine per GPU
    (8, 64 * 2**30, 80 * 2**30, None, None, (4, 2)),   # 32B bf16: 64 GB > half of 80 -> pairs
    (8, 140 * 2**30, 80 * 2**30, None, None, (2, 4)),
    (8, 4 * 2**30, 80 * 2**30, 2, None, (4, 2)),       # explicit tensor parallel
    (8, 4 * 2**30, 80 * 2**30, None, 3, (3, 1)),       # explicit engine count
    (0, 4 * 2**30, 0, None, None, (1, 1)),             # CPU
    (0, 4 * 2**30, 0, None, 2, (2, 1)),
    (4, 0, 80 * 2**30, None, None, (4, 1)),            # hub id: size unknown
])
def test_device_plan(gpus, weights, memory, tp, dp, expected):
    assert plan_devices([str(i) for i in range(gpus)], weights, memory, tp, dp) == expected


@pytest.mark.parametrize("tp,dp,match", [(16, None, "--tensor-parallel-size=16: 8 GPUs"),
                                         (2, 5, "--data-parallel-size=5 x --tensor-parallel-size=2 needs 10")])
def test_device_plan_refuses_what_does_not_fit(tp, dp, match):
    with pytest.raises(ValueError, match=match):
        plan_devices([str(i) for i in range(8)], 0, 80 * 2**30, tp, dp)
