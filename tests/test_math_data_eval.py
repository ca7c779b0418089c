"""Data preparation on fixtures in each dataset's real schema, the evaluation loop, and the reward wiring."""

import json
import os
import re
import subprocess
import sys
import types

import pandas as pd
import pytest

from verl_eopd.math.data import DAPO_PREFIX, DAPO_SUFFIX, EVAL_INSTRUCTION, TRAIN_INSTRUCTION, prepare
from verl_eopd.math.eval import EvalSettings, make_generator, run_eval


ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _write(path, rows):
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix == ".parquet":
        pd.DataFrame(rows).to_parquet(path)
    else:
        path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return str(path)


@pytest.fixture(scope="module")
def fixtures(tmp_path_factory):
    """Small local copies, column for column, of the public datasets' schemas (see verl_eopd/math/data.py)."""
    d = tmp_path_factory.mktemp("raw")
    f = {}
    f["math_train"] = _write(d / "math_lighteval" / "train.parquet", [  # DigitalLearningGmbH/MATH-lighteval
        {"problem": "What is $1+1$?", "level": "Level 1", "type": "Algebra",
         "solution": "We add: $1+1=\\boxed{2}$."},
        {"problem": "Simplify $\\frac{2}{4}$.", "level": "Level 2", "type": "Prealgebra",
         "solution": "Divide: $\\frac{2}{4} = \\boxed{\\frac{1}{2}}$."},
        {"problem": "A problem whose solution never boxes its answer.", "level": "Level 5", "type": "Geometry",
         "solution": "A long worked solution that states the result in words only, " * 3},
        {"problem": "   ", "level": "Level 1", "type": "Algebra", "solution": "$\\boxed{3}$"},
    ])
    processed = []  # open-r1/DAPO-Math-17k-Processed (en): raw problem in `prompt`, answer in `solution`
    for i, (problem, answer) in enumerate([("Find $x$ if $2x=34$.", "17"), ("Compute $3^3$.", "27"),
                                           ("Find $x$ if $2x=34$.", "17"), ("求 $1+2$ 的值。", "3")]):
        processed.append({"prompt": problem, "solution": answer, "data_source": "math_dapo",
                          "source_prompt": [{"content": DAPO_PREFIX + problem + DAPO_SUFFIX, "role": "user"}],
                          "ability": "MATH", "reward_model": {"ground_truth": answer, "style": "rule-lighteval/MATH_v2"},
                          "extra_info": {"index": f"uuid-{i}"}})
    f["dapo_math"] = _write(d / "dapo_processed.jsonl", processed)
    original = []  # BytedTsinghua-SIA/DAPO-Math-17k: templated chat prompt, repeated; one conflicting duplicate
    for rep in range(3):
        for i, (problem, answer) in enumerate([("Find $y$ if $y-1=4$.", "5"), ("How many primes are below 10?", "4"),
                                               ("Evaluate $2+2$.", "4" if rep < 2 else "5")]):
            original.append({"data_source": "math_dapo",
                             "prompt": [{"content": DAPO_PREFIX + problem + DAPO_SUFFIX, "role": "user"}],
                             "ability": "MATH", "reward_model": {"ground_truth": answer, "style": "rule-lighteval/MATH_v2"},
                             "extra_info": {"index": f"u{i}"}})
    f["dapo_original"] = _write(d / "dapo_original.parquet", original)
    f["math500"] = _write(d / "math500" / "test.jsonl", [  # HuggingFaceH4/MATH-500
        {"problem": "What is $2\\cdot 3$?", "solution": "It is $\\boxed{6}$.", "answer": "6", "subject": "Algebra",
         "level": 1, "unique_id": "test/algebra/1.json"},
        {"problem": "Write $0.5$ as a fraction.", "solution": "$\\boxed{\\frac12}$", "answer": "\\frac{1}{2}",
         "subject": "Prealgebra", "level": 2, "unique_id": "test/prealgebra/2.json"},
    ])
    f["amc23"] = _write(d / "amc23.jsonl", [  # math-ai/amc23: numeric answers
        {"id": 0, "question": "How many ways ...?", "answer": 27.0, "url": "https://x/1"},
        {"id": 1, "question": "Find the sum.", "answer": 0.5, "url": "https://x/2"},
        {"id": 2, "question": "No answer recorded.", "answer": None, "url": "https://x/3"},
    ])
    f["minerva"] = _write(d / "minerva.jsonl", [{"question": "Compute the speed in m/s.", "answer": "3 \\times 10^8"}])
    f["olympiadbench"] = _write(d / "olympiad.parquet", [  # Hothan/OlympiadBench OE_TO_maths_en_COMP
        {"id": 1606, "question": "Find the ratio.", "solution": ["Long solution."], "final_answer": ["$\\frac{1}{2}$"],
         "context": None, "modality": "Text-only", "difficulty": "Competition", "is_multiple_answer": False,
         "unit": None, "answer_type": "Numerical", "error": None, "question_type": "Open-ended",
         "subfield": "Algebra", "subject": "Math", "language": "English"},
        {"id": 1607, "question": "Find all $n$.", "solution": ["..."], "final_answer": ["$1$", "$2$"],
         "context": None, "modality": "Text-only", "difficulty": "Competition", "is_multiple_answer": True,
         "unit": None, "answer_type": "Numerical", "error": None, "question_type": "Open-ended",
         "subfield": "Number Theory", "subject": "Math", "language": "English"},
    ])
    f["aime24"] = _write(d / "aime24.jsonl", [{"id": 60, "problem": "Find $m+n$.", "solution": "... so $\\boxed{204}$",
                                               "answer": "204", "url": "https://x", "year": 2024}])
    f["aime24_mathai"] = _write(d / "aime24_mathai.jsonl", [  # math-ai/aime24: no answer column, boxed solution
        {"id": 0, "problem": "Find $m+n$.", "solution": "\\boxed{204}", "url": "https://x"}])
    f["aime25"] = _write(d / "aime25.jsonl", [{"id": "0", "problem": "Find the sum of all bases.", "answer": "70"}])
    return f


def _read(path):
    return pd.read_parquet(path).to_dict("records")


@pytest.mark.integration
def test_prepare_writes_verl_rl_parquet_and_reports_bad_rows(tmp_path, fixtures):
    names = ["math_train", "dapo_math", "math500", "amc23", "minerva", "olympiadbench", "aime24", "aime25"]
    report = prepare(names, str(tmp_path), sources={n: fixtures[n] for n in names}, log=lambda m: None)

    math_rows = _read(tmp_path / "math_train.parquet")
    assert [r["reward_model"]["ground_truth"] for r in math_rows] == ["2", "\\frac{1}{2}"]
    assert report["math_train"]["dropped"] == {"no_answer": 1, "no_problem": 1}
    assert report["math_train"]["examples"] == {"no_answer": [2], "no_problem": [3]}
    r0 = math_rows[0]
    assert r0["data_source"] == "math_train" and r0["ability"] == "math"
    assert list(r0["prompt"]) == [{"role": "user", "content": "What is $1+1$?" + TRAIN_INSTRUCTION}]
    assert r0["extra_info"]["level"] == "Level 1" and r0["extra_info"]["problem"] == "What is $1+1$?"

    dapo = _read(tmp_path / "dapo_math.parquet")
    assert [(r["extra_info"]["problem"], r["reward_model"]["ground_truth"]) for r in dapo] == \
        [("Find $x$ if $2x=34$.", "17"), ("Compute $3^3$.", "27")]
    assert report["dapo_math"]["dropped"] == {"duplicate": 1, "not_english": 1}

    truths = {n: [r["reward_model"]["ground_truth"] for r in _read(tmp_path / f"{n}.parquet")]
              for n in ["math500", "amc23", "minerva", "olympiadbench", "aime24", "aime25"]}
    assert truths == {"math500": ["6", "\\frac{1}{2}"], "amc23": ["27", "0.5"], "minerva": ["3 \\times 10^8"],
                      "olympiadbench": ["\\frac{1}{2}", "1, 2"], "aime24": ["204"], "aime25": ["70"]}
    assert report["amc23"]["dropped"] == {"no_answer": 1}
    for n in truths:
        assert _read(tmp_path / f"{n}.parquet")[0]["prompt"][0]["content"].endswith(EVAL_INSTRUCTION)
    stored = json.loads((tmp_path / "prepare_report.json").read_text())
    assert set(stored) == set(names) and stored["amc23"]["written"] == 2


@pytest.mark.integration
def test_original_dapo_is_untemplated_deduplicated_and_conflicts_dropped(tmp_path, fixtures):
    report = prepare(["dapo_math"], str(tmp_path), sources={"dapo_math": fixtures["dapo_original"]}, log=lambda m: None)
    rows = _read(tmp_path / "dapo_math.parquet")
    assert [(r["extra_info"]["problem"], r["reward_model"]["ground_truth"]) for r in rows] == \
        [("Find $y$ if $y-1=4$.", "5"), ("How many primes are below 10?", "4")]
    assert report["dapo_math"]["dropped"] == {"duplicate": 6, "conflicting_answers": 1}
    assert [r["extra_info"]["index"] for r in rows] == [0, 1]


@pytest.mark.integration
def test_mirror_with_boxed_solution_only(tmp_path, fixtures):
    prepare(["aime24"], str(tmp_path), sources={"aime24": fixtures["aime24_mathai"]}, log=lambda m: None)
    assert _read(tmp_path / "aime24.parquet")[0]["reward_model"]["ground_truth"] == "204"


@pytest.mark.integration
def test_bad_sources_fail_clearly(tmp_path, fixtures):
    with pytest.raises(ValueError, match="unknown dataset"):
        prepare(["gsm8k"], str(tmp_path), log=lambda m: None)
    with pytest.raises(FileNotFoundError, match="no such file"):
        prepare(["aime25"], str(tmp_path), sources={"aime25": str(tmp_path / "missing.jsonl")}, log=lambda m: None)
    bad = _write(tmp_path / "bad.jsonl", [{"text": "no known columns"}])
    with pytest.raises(ValueError, match="none of 1 rows"):
        prepare(["aime25"], str(tmp_path), sources={"aime25": bad}, log=lambda m: None)


@pytest.mark.integration
def test_prepared_parquet_loads_in_verls_dataset(tmp_path, fixtures, tiny_models):
    """The output is what verl's RLHFDataset reads: chat template applied, ground truth carried through."""
    from omegaconf import OmegaConf
    from verl.utils.dataset.rl_dataset import RLHFDataset

    prepare(["math500"], str(tmp_path), sources={"math500": fixtures["math500"]}, log=lambda m: None)
    cfg = OmegaConf.create({"prompt_key": "prompt", "max_prompt_length": 256, "filter_overlong_prompts": False,
                            "truncation": "error", "return_raw_chat": True})
    ds = RLHFDataset([str(tmp_path / "math500.parquet")], tiny_models["tokenizer"], cfg)
    item = ds[1]
    assert item["reward_model"]["ground_truth"] == "\\frac{1}{2}"
    assert item["data_source"] == "math500"
    assert item["raw_prompt"][0]["content"].startswith("Write $0.5$ as a fraction.")


@pytest.mark.integration
def test_prepare_data_script_runs(tmp_path, fixtures, fresh_python):
    out = fresh_python([os.path.join(ROOT, "scripts", "prepare_data.py"), "--out-dir", str(tmp_path), "--datasets",
                        "aime25", "--source", f"aime25={fixtures['aime25']}"])
    assert out.returncode == 0, out.stderr
    assert "aime25: 1 rows read" in out.stdout
    assert (tmp_path / "aime25.parquet").exists()


# ------------------------------------------------------------------------------------------- evaluation


def _bench(tmp_path, fixtures):
    prepare(["math500", "amc23"], str(tmp_path / "data"), sources={n: fixtures[n] for n in ["math500", "amc23"]},
            log=lambda m: None)
    return {n: str(tmp_path / "data" / f"{n}.parquet") for n in ["math500", "amc23"]}


class ScriptedGenerator:
    """Deterministic samples: for problem text p, sample j answers right iff j < right[p]."""

    def __init__(self, right, fail_after=None):
        self.right, self.fail_after, self.calls, self.seen = right, fail_after, 0, []

    def __call__(self, prompts, s, seed):
        self.calls += 1
        if self.fail_after is not None and self.calls > self.fail_after:
            raise KeyboardInterrupt("simulated interruption")
        out = []
        for p in prompts:
            text = p[0]["content"]
            self.seen.append(text)
            truth, n_right = self.right[text.split("\n")[0]]
            out.append([f"... \\boxed{{{truth}}}" if j < n_right else "... \\boxed{-1}" for j in range(s.k)])
        return out


RIGHT = {"What is $2\\cdot 3$?": ("6", 4), "Write $0.5$ as a fraction.": ("0.5", 1),
         "How many ways ...?": ("27", 0), "Find the sum.": ("1/2", 2)}


@pytest.mark.integration
def test_run_eval_scores_summarizes_and_resumes(tmp_path, fixtures):
    bench = _bench(tmp_path, fixtures)
    settings = EvalSettings(model="scripted", k=4)
    out = tmp_path / "eval"
    with pytest.raises(KeyboardInterrupt):  # interrupted after the first chunk (math500, 1 problem per chunk)
        run_eval(bench, str(out), settings, ScriptedGenerator(RIGHT, fail_after=1), chunk=1, log=lambda m: None)
    assert len((out / "samples.jsonl").read_text().splitlines()) == 1
    gen = ScriptedGenerator(RIGHT)
    summary = run_eval(bench, str(out), settings, gen, chunk=1, log=lambda m: None)
    assert gen.calls == 3  # the finished problem is not generated again
    # math500: samples 4/4 and 1/4 right; amc23: 0/4 and 2/4
    assert summary["math500"]["avg@4"] == pytest.approx(100 * 5 / 8)
    assert summary["math500"]["pass@4"] == pytest.approx(100.0)
    assert summary["math500"]["pass@2"] == pytest.approx(100 * (1 + 0.5) / 2)
    assert summary["amc23"]["avg@4"] == pytest.approx(100 * 2 / 8)
    assert summary["amc23"]["pass@4"] == pytest.approx(50.0)
    assert summary["mean"]["pass@4"] == pytest.approx(75.0)
    assert "| math500 | 2 | 62.50 | 100.00 |" in (out / "results.md").read_text()
    lines = [json.loads(line) for line in (out / "samples.jsonl").read_text().splitlines()]
    assert lines[-1]["answers"] == ["1/2", "1/2", "-1", "-1"]
    # a rerun generates nothing; other settings are refused before anything runs
    again = ScriptedGenerator(RIGHT)
    assert run_eval(bench, str(out), settings, again, log=lambda m: None) == summary and again.calls == 0
    with pytest.raises(ValueError, match="top_p: stored 0.8 vs now 0.9"):
        run_eval(bench, str(out), EvalSettings(model="scripted", k=4, top_p=0.9), again, log=lambda m: None)


@pytest.mark.integration
@pytest.mark.parametrize("kwargs,match", [({"k": 0}, "--n"), ({"top_p": 0.0}, "--top-p"),
                                          ({"temperature": 0.0}, "greedy"), ({"max_tokens": 0}, "--max-tokens")])
def test_eval_settings_are_checked(kwargs, match):
    with pytest.raises(ValueError, match=match):
        EvalSettings(model="m", **kwargs).check()


@pytest.mark.integration
def test_vllm_backend_maps_settings_and_outputs(monkeypatch):
    """vLLM is not installed here: a stand-in module with vLLM's API records what the adapter asks for."""
    calls = {}

    class Tok:
        def apply_chat_template(self, messages, add_generation_prompt, tokenize, **kw):
            calls["template_kwargs"] = kw
            return "<chat>" + messages[0]["content"]

    class LLM:
        def __init__(self, model, tensor_parallel_size, **kw):
            calls["llm"] = (model, tensor_parallel_size)

        def get_tokenizer(self):
            return Tok()

        def generate(self, texts, params):
            calls["texts"], calls["params"] = texts, params
            return [types.SimpleNamespace(outputs=[types.SimpleNamespace(text=f"{t}#{j}") for j in range(p.n)])
                    for t, p in zip(texts, params, strict=True)]

    def SamplingParams(**kw):
        return types.SimpleNamespace(**kw)

    monkeypatch.setitem(sys.modules, "vllm", types.SimpleNamespace(LLM=LLM, SamplingParams=SamplingParams))
    gen = make_generator("some/model", "auto", tensor_parallel_size=2, batch_size=8)
    s = EvalSettings(model="some/model", k=3, max_tokens=100, chat_template_kwargs={"enable_thinking": False})
    out = gen([[{"role": "user", "content": "a"}], [{"role": "user", "content": "b"}]], s, seed=7)
    assert out == [["<chat>a#0", "<chat>a#1", "<chat>a#2"], ["<chat>b#0", "<chat>b#1", "<chat>b#2"]]
    assert calls["llm"] == ("some/model", 2)
    # one SamplingParams per prompt, seeded seed + i: a prompt's samples do not depend on its batch or engine
    assert [vars(x) for x in calls["params"]] == [{"n": 3, "temperature": 1.0, "top_p": 0.8, "max_tokens": 100,
                                                   "seed": 7 + i} for i in range(2)]
    assert calls["template_kwargs"] == {"enable_thinking": False}


@pytest.mark.integration
def test_evaluate_script_end_to_end_with_the_hf_backend(tmp_path, fixtures, tiny_models, fresh_python):
    """The command line on a real (tiny, untrained) model: generation, scoring, table, resume."""
    bench = _bench(tmp_path, fixtures)
    cmd = [os.path.join(ROOT, "scripts", "evaluate.py"), "--model", tiny_models["student"],
           "--benchmarks", *[f"{n}={p}" for n, p in bench.items()], "--output-dir", str(tmp_path / "ev"),
           "--k", "2", "--max-tokens", "8", "--backend", "hf", "--chunk", "1"]
    first = fresh_python(cmd, timeout=600)
    assert first.returncode == 0, first.stderr[-3000:]
    assert "| benchmark | problems | Avg@2 | Pass@2 |" in first.stdout
    assert "[eval] amc23: 2/2 new problems" in first.stderr
    summary = json.loads((tmp_path / "ev" / "summary.json").read_text())
    assert set(summary) == {"math500", "amc23", "mean"} and summary["mean"]["problems"] == 4
    lines = (tmp_path / "ev" / "samples.jsonl").read_text().splitlines()
    assert len(lines) == 4 and all(len(json.loads(x)["responses"]) == 2 for x in lines)
    second = fresh_python(cmd, timeout=600)
    assert second.returncode == 0 and "4 already done, 0 to go" in second.stderr
    bad = fresh_python(cmd[:-4] + ["--top-p", "0.5"], timeout=600)
    assert bad.returncode != 0 and "top_p: stored 0.8 vs now 0.5" in bad.stderr


def _evaluate_main():
    import importlib.util

    spec = importlib.util.spec_from_file_location("evaluate_script", os.path.join(ROOT, "scripts", "evaluate.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.main


@pytest.mark.integration
@pytest.mark.parametrize("flags,match", [
    (["--n", "4", "--pass-k", "1,8"], "--pass-k=1,8: Pass@k needs 1 <= k <= n = 4 .* got k = 8. Fix: --n 8"),
    (["--k", "4", "--pass-k", "0,2"], "--pass-k=0,2: .* got k = 0"),
    (["--pass-k", "1,x"], "--pass-k='1,x': expected comma-separated integers"),
    (["--n", "4", "--k", "8"], "--n 4 and --k 8 disagree"),
    (["--backend", "hf", "--tensor-parallel-size", "2"], "the HF backend runs one device per engine"),
])
def test_evaluate_refuses_bad_pass_k_before_loading(tmp_path, fixtures, no_model_loads, capsys, flags, match):
    bench = _bench(tmp_path, fixtures)
    argv = ["--model", "org/model", "--benchmarks", f"math500={bench['math500']}", "--output-dir",
            str(tmp_path / "ev"), *flags]
    with pytest.raises(SystemExit) as exit_:
        _evaluate_main()(argv)
    assert exit_.value.code == 2
    assert re.search(match, capsys.readouterr().err), match
    assert not (tmp_path / "ev").exists()


# ---------------------------------------------------------------------------------------------- wiring


@pytest.mark.integration
@pytest.mark.parametrize("algorithm", ["eopd", "opd", "eopd_grpo", "eopd_server"])
def test_presets_score_with_the_math_reward_through_verls_loader(algorithm):
    """Every preset with user models scores with verl_eopd.math.reward (GRPO reward / logged accuracy), loaded by
    verl's own custom-reward loader."""
    from hydra import compose, initialize_config_dir
    from verl.trainer.ppo.reward import get_custom_reward_fn

    conf = os.path.join(ROOT, "verl_eopd", "conf")
    with initialize_config_dir(config_dir=conf, version_base=None):
        cfg = compose("eopd_trainer", overrides=[f"algorithm={algorithm}"])
    assert cfg.reward.custom_reward_function.path == "pkg://verl_eopd.math.reward"
    fn = get_custom_reward_fn(cfg)
    assert fn(data_source="math500", solution_str="so \\boxed{\\frac{1}{2}}", ground_truth="0.5", extra_info={}) == 1.0
    assert fn(data_source="math500", solution_str="so 0.5", ground_truth="0.5", extra_info={}) == 0.0


def _recipe(setting, algo, *extra, **mode):
    """scripts/paper_recipe.sh SETTING ALGO EXTRA... with DRY_RUN=1 (the composed config), or the given mode."""
    env = {**os.environ, **(mode or {"DRY_RUN": "1"}),
           "PATH": os.path.dirname(sys.executable) + os.pathsep + os.environ["PATH"]}
    return subprocess.run(["bash", os.path.join(ROOT, "scripts", "paper_recipe.sh"), setting, algo, *extra],
                          capture_output=True, text=True, timeout=300, env=env)


@pytest.mark.integration
@pytest.mark.parametrize("setting,algo,student,train,epochs,n,fkl", [
    ("qwen3-1.7b-math", "eopd", "Qwen/Qwen3-1.7B-Base", "math_train", 3, 1, 1.0),
    ("qwen3-0.6b-math", "opd", "Qwen/Qwen3-0.6B-Base", "math_train", 3, 1, 0.0),
    ("qwen3-4b-dapo", "eopd_grpo", "Qwen/Qwen3-4B-Base", "dapo_math", 2, 8, 1.0),
    ("qwen3-1.7b-math", "eopd_server", "Qwen/Qwen3-1.7B-Base", "math_train", 3, 1, 1.0),
])
def test_paper_recipes_compose_with_the_papers_hyperparameters(setting, algo, student, train, epochs, n, fkl):
    """The recipe's command (PRINT=1: its arguments, one a line) composed by hydra in this process, as its DRY_RUN=1
    (`--cfg job`, run in tests/test_deepmath_recipe.py) composes it in a fresh one."""
    from conftest import compose_trainer
    from omegaconf import OmegaConf

    out = _recipe(setting, algo, "trainer.nnodes=2", PRINT="1")
    assert out.returncode == 0, out.stderr[-3000:]
    argv = out.stdout.splitlines()
    assert argv[1:3] == ["-m", "verl_eopd.main"], argv[:3]
    cfg = OmegaConf.to_container(compose_trainer(*argv[3:]), resolve=False)  # hydra's compose (conftest)
    actor, rollout = cfg["actor_rollout_ref"]["actor"], cfg["actor_rollout_ref"]["rollout"]
    loss = cfg["distillation"]["distillation_loss"]
    assert cfg["actor_rollout_ref"]["model"]["path"] == student
    assert cfg["distillation"]["teacher_models"]["teacher_model"]["model_path"] == "Qwen/Qwen3-8B"
    assert cfg["data"]["train_files"].endswith(f"{train}.parquet")
    assert cfg["data"]["train_batch_size"] == 128 and cfg["data"]["max_response_length"] == 4096
    assert cfg["data"]["apply_chat_template_kwargs"] == {"enable_thinking": False}
    assert (rollout["n"], rollout["temperature"], rollout["top_p"], rollout["name"]) == (n, 1.0, 1.0, "vllm")
    assert actor["ppo_mini_batch_size"] == 32 and actor["ppo_epochs"] == 1
    assert (actor["optim"]["lr"], actor["optim"]["lr_scheduler_type"], actor["optim"]["min_lr_ratio"]) == (3e-6, "cosine", 0.0)
    assert actor["optim"]["lr_warmup_steps_ratio"] == 0.0 and actor["use_kl_loss"] is False
    assert actor["entropy_coeff"] == 0.0
    assert cfg["trainer"]["total_epochs"] == epochs and cfg["trainer"]["nnodes"] == 2  # user overrides win
    assert os.path.isabs(cfg["data"]["train_files"]) and os.path.isabs(cfg["trainer"]["default_local_dir"])
    assert cfg["trainer"]["experiment_name"] == f"{setting}_{algo}" and cfg["trainer"]["max_actor_ckpt_to_keep"] == 2
    if algo == "eopd_server":  # one 8-GPU node: 4 train, 4 serve the teacher
        assert cfg["trainer"]["n_gpus_per_node"] == 4 and cfg["distillation"]["n_gpus_per_node"] == 4
        assert cfg["distillation"]["enabled"] is True and loss["teacher_route"] == "server"
    else:
        assert cfg["trainer"]["n_gpus_per_node"] == 8 and loss["teacher_route"] == "ref"
    assert (loss["topk"], loss["entropy_threshold"], loss["fkl_coef"]) == (16, 0.8, fkl)
    assert (loss["clip_ratio_low"], loss["clip_ratio_high"]) == (0.2, 0.2)
    assert loss["use_task_rewards"] is (algo == "eopd_grpo")
    assert cfg["reward"]["custom_reward_function"]["path"] == "pkg://verl_eopd.math.reward"


@pytest.mark.integration
def test_paper_recipe_rejects_unknown_names_and_missing_data(tmp_path):
    assert "unknown SETTING" in _recipe("qwen3-32b", "eopd").stderr
    assert "unknown ALGO" in _recipe("qwen3-1.7b-math", "ppo").stderr
    env = {**os.environ, "DRY_RUN": "1", "TEACHER_GPUS": "8"}
    out = subprocess.run(["bash", os.path.join(ROOT, "scripts", "paper_recipe.sh"), "qwen3-1.7b-math", "eopd_server"],
                         capture_output=True, text=True, timeout=60, env=env)
    assert out.returncode == 2 and "Fix: TEACHER_GPUS=4" in out.stderr
    env = {**os.environ, "DATA_DIR": str(tmp_path)}
    out = subprocess.run(["bash", os.path.join(ROOT, "scripts", "paper_recipe.sh"), "qwen3-1.7b-math", "eopd"],
                         capture_output=True, text=True, timeout=60, env=env)
    assert out.returncode == 2 and "prepare_data.py" in out.stderr
