"""The DeepMath-103K converter (a DeepMath-shaped local file built here) and scripts/paper_recipe.sh's DATASET
argument: each training set gets its own run name and checkpoint folder."""

import hashlib
import json
import os
import subprocess
import sys

import pandas as pd
import pytest

from verl_eopd.math.data import DATASETS, DEFAULT_SETS, TRAIN_INSTRUCTION, prepare
from verl_eopd.math.reward import compute_score

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RECIPE = os.path.join(ROOT, "scripts", "paper_recipe.sh")


def _deepmath_rows():
    """Rows column for column as zwhe99/DeepMath-103K: question, final_answer, difficulty (float), topic and three
    R1 solutions. The solutions box other values than final_answer, so reading them instead would show."""
    def row(question, answer, difficulty=5.0, topic="Mathematics -> Algebra -> Other"):
        return {"question": question, "final_answer": answer, "difficulty": difficulty, "topic": topic,
                "r1_solution_1": "<think>...</think> so \\boxed{999}", "r1_solution_2": "\\boxed{998}",
                "r1_solution_3": "\\boxed{997}"}

    return [
        row("Evaluate the limit $\\lim_{x\\to 0} \\frac{\\sin 2x}{x}$.", "2", 4.5,
            "Mathematics -> Calculus -> Differential Calculus -> Limits"),
        row("Find the value of $\\int_0^1 x\\,dx$.", "$\\dfrac{1}{2}$", 3.0),
        row("Is every finite group of prime order cyclic?", "Yes", 6.5),
        row("Evaluate the limit $\\lim_{x\\to 0} \\frac{\\sin 2x}{x}$.", "2"),  # a duplicate
        row("A question whose answer is missing.", None),
    ]


@pytest.mark.integration
def test_a_deepmath_shaped_file_converts_with_its_own_data_source_and_final_answer(tmp_path):
    raw = tmp_path / "raw" / "train-00000-of-00010.parquet"
    raw.parent.mkdir()
    pd.DataFrame(_deepmath_rows()).to_parquet(raw)
    report = prepare(["deepmath"], str(tmp_path / "out"), sources={"deepmath": str(raw.parent)}, log=lambda *_: None)
    assert report["deepmath"]["read"] == 5 and report["deepmath"]["written"] == 3
    assert report["deepmath"]["dropped"] == {"no_answer": 1, "duplicate": 1}
    rows = pd.read_parquet(tmp_path / "out" / "deepmath.parquet").to_dict("records")
    assert [r["data_source"] for r in rows] == ["deepmath"] * 3
    assert [r["reward_model"]["ground_truth"] for r in rows] == ["2", "\\dfrac{1}{2}", "Yes"]
    assert all(r["reward_model"]["style"] == "rule" and r["ability"] == "math" for r in rows)
    first = rows[0]
    assert list(first["prompt"]) == [{"role": "user", "content": _deepmath_rows()[0]["question"] + TRAIN_INSTRUCTION}]
    assert first["extra_info"]["difficulty"] == "4.5"
    assert first["extra_info"]["topic"] == "Mathematics -> Calculus -> Differential Calculus -> Limits"
    assert first["extra_info"]["split"] == "train" and first["extra_info"]["source"] == str(raw.parent)
    # verifiable: the reward the training scores with accepts a boxed equivalent of final_answer, refuses R1's box
    assert compute_score("math500", "so the value is \\boxed{0.5}", rows[1]["reward_model"]["ground_truth"]) == 1.0
    assert compute_score("math500", "\\boxed{999}", rows[0]["reward_model"]["ground_truth"]) == 0.0


@pytest.mark.integration
def test_the_trl_lib_copy_of_deepmath_reads_too(tmp_path):
    """trl-lib/DeepMath-103K: a chat `prompt` (one user turn) and the short final answer in `solution`."""
    raw = tmp_path / "trl.jsonl"
    raw.write_text("\n".join(json.dumps(r) for r in [
        {"prompt": [{"role": "user", "content": "Evaluate $2^{10}$."}], "solution": "1024"},
        {"prompt": [{"role": "user", "content": "Find $x$ with $x^2 = 4$, $x > 0$."}], "solution": "$2$"},
    ]) + "\n")
    prepare(["deepmath"], str(tmp_path / "out"), sources={"deepmath": str(raw)}, log=lambda *_: None)
    rows = pd.read_parquet(tmp_path / "out" / "deepmath.parquet").to_dict("records")
    assert [(r["extra_info"]["problem"], r["reward_model"]["ground_truth"], r["data_source"]) for r in rows] == [
        ("Evaluate $2^{10}$.", "1024", "deepmath"), ("Find $x$ with $x^2 = 4$, $x > 0$.", "2", "deepmath")]


@pytest.mark.unit
def test_deepmath_is_a_training_set_read_from_the_hub_id_and_opt_in():
    spec = DATASETS["deepmath"]
    assert (spec.source, spec.split, spec.role, spec.problem_key, spec.answer_key) == \
        ("zwhe99/DeepMath-103K", "train", "train", "question", "final_answer")
    assert "deepmath" not in DEFAULT_SETS and set(DEFAULT_SETS) == set(DATASETS) - {"deepmath"}


@pytest.mark.integration
def test_prepare_data_script_writes_deepmath_from_a_jsonl_and_refuses_an_unused_source(tmp_path, fresh_python):
    raw = tmp_path / "deepmath.jsonl"
    raw.write_text("\n".join(json.dumps(r) for r in _deepmath_rows()) + "\n")
    script = [os.path.join(ROOT, "scripts", "prepare_data.py"), "--out-dir", str(tmp_path / "d")]
    out = fresh_python(script + ["--datasets", "deepmath", "--source", f"deepmath={raw}"])
    assert out.returncode == 0, out.stderr
    assert "deepmath: 5 rows read" in out.stdout and "-> 3 written" in out.stdout
    assert set(pd.read_parquet(tmp_path / "d" / "deepmath.parquet")["data_source"]) == {"deepmath"}
    out = fresh_python(script + ["--datasets", "aime25", "--source", f"deepmath={raw}"])
    assert out.returncode == 2 and "Fix: --datasets deepmath" in out.stderr


def _recipe(*args, **env):
    run_env = {**os.environ, "PATH": os.path.dirname(sys.executable) + os.pathsep + os.environ["PATH"], **env}
    return subprocess.run(["bash", RECIPE, *args], capture_output=True, text=True, timeout=300, env=run_env)


def _printed(*args, data_dir):
    """The recipe's command (PRINT=1: composed, not run) as {key: value}, later values winning as in hydra."""
    out = _recipe(*args, PRINT="1", DATA_DIR=str(data_dir))
    assert out.returncode == 0, out.stderr
    argv = out.stdout.splitlines()
    assert argv[1:3] == ["-m", "verl_eopd.main"]
    return dict(a.split("=", 1) for a in argv[3:])


@pytest.mark.integration
def test_a_recipe_run_on_new_data_gets_its_own_run_name_and_checkpoint_folder(tmp_path):
    data = tmp_path / "data"
    default = _printed("qwen3-1.7b-math", "eopd", data_dir=data)
    deep = _printed("qwen3-1.7b-math", "eopd", "deepmath", "trainer.total_epochs=2", data_dir=data)
    # the setting's own dataset keeps the name runs had before the argument existed (they still resume)
    assert default["trainer.experiment_name"] == "qwen3-1.7b-math_eopd"
    assert default["data.train_files"] == str(data / "math_train.parquet") and default["trainer.total_epochs"] == "3"
    assert deep["trainer.experiment_name"] == "qwen3-1.7b-math_eopd_deepmath"
    assert deep["data.train_files"] == str(data / "deepmath.parquet") and deep["trainer.total_epochs"] == "2"
    assert deep["trainer.default_local_dir"].endswith("/checkpoints/verl-eopd/qwen3-1.7b-math_eopd_deepmath")
    assert default["trainer.default_local_dir"] != deep["trainer.default_local_dir"]
    assert _printed("qwen3-1.7b-math", "eopd", "math_train", data_dir=data) == default  # named = default
    # files: the same file name in two folders are two runs
    names = set()
    for folder in ("a", "b"):
        path = tmp_path / folder / "my set.parquet"
        got = _printed("qwen3-4b-dapo", "opd", str(path), data_dir=data)
        digest = hashlib.sha256(str(path).encode()).hexdigest()[:8]
        assert got["trainer.experiment_name"] == f"qwen3-4b-dapo_opd_my-set-{digest}"
        assert got["data.train_files"] == str(path)
        names.add(got["trainer.experiment_name"])
    assert len(names) == 2
    relative = _printed("qwen3-1.7b-math", "eopd", "mine/x.parquet", data_dir=data)  # from the caller's directory
    assert relative["data.train_files"] == os.path.join(os.getcwd(), "mine", "x.parquet")
    assert default["trainer.logger"] == "[console,file,tensorboard]"
    with_key = _recipe("qwen3-1.7b-math", "eopd", PRINT="1", DATA_DIR=str(data), WANDB_API_KEY="x")
    assert "trainer.logger=[console,file,tensorboard,wandb]" in with_key.stdout.splitlines()


@pytest.mark.integration
def test_the_recipe_composes_deepmath_in_hydra_and_names_missing_data(tmp_path):
    import yaml

    out = _recipe("qwen3-1.7b-math", "eopd", "deepmath", DRY_RUN="1", DATA_DIR=str(tmp_path))
    assert out.returncode == 0, out.stderr[-3000:]
    cfg = yaml.safe_load(out.stdout)
    assert cfg["trainer"]["experiment_name"] == "qwen3-1.7b-math_eopd_deepmath"
    assert cfg["data"]["train_files"] == str(tmp_path / "deepmath.parquet") and cfg["trainer"]["total_epochs"] == 1
    missing = _recipe("qwen3-1.7b-math", "eopd", "deepmath", DATA_DIR=str(tmp_path))
    assert missing.returncode == 2
    assert f"Fix: python scripts/prepare_data.py --out-dir {tmp_path} --datasets deepmath" in missing.stderr
    bad = _recipe("qwen3-1.7b-math", "eopd", "gsm8k", DATA_DIR=str(tmp_path))
    assert bad.returncode == 2 and "unknown DATASET 'gsm8k'" in bad.stderr
