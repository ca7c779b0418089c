"""End to end on CPU: verl's real v1 trainer distils the embedded tiny student from the tiny teacher.

Each run is the command line itself, `python -m verl_eopd.main ...` in a subprocess (its own Ray session and
process state: embedded default, CPU settings, checks, EOPD trainer, HF rollout backend, teacher in the
reference worker). Metrics are read back from verl's file logger.
"""

from __future__ import annotations

import json
import math
import subprocess
from pathlib import Path

import pytest

from conftest import ONE_AGENT_WORKER, run_main
from verl_eopd.cpu import embedded
from verl_eopd.integration.hidden import FROM_HIDDEN_LINE

pytestmark = pytest.mark.e2e

DESIGN_METRICS = ("teacher_entropy_mean", "gate_frac", "fkl_mean", "fkl_gated_mean", "rkl_mean",
                  "student_entropy_mean", "student_entropy_gated_mean", "teacher_topk_mass_mean")
STEPS = 4


# The shipped students (tiny-v5: 650 SFT steps; tiny-v4: 600) are already close to the teacher's format and their
# remaining reverse KL sits on the digits, which 6 steps do not move reliably. These mechanics tests use the shipped
# teacher and data with a student fine-tuned for 60 steps only (tests/assets/weak_student_add, built by
# scripts/build_pair.py --student-steps 60 --teacher-from verl_eopd/cpu/pairs/tiny-v4: the format is still being
# learnt, so each step of distillation gives a clear fall in reverse KL, 0.1-0.3 nats per step from 6.8 in every
# run seen, against a step-to-step noise of a few hundredths) at lr 1e-3; scripts/mini_repro.py studies tiny-v4.
WEAK_STUDENT = Path(__file__).parent / "assets" / "weak_student_add" / "student"
LR = "1e-3"
# half the default run's 512 responses per step (one mini-batch, 4 PPO epochs): the same 4 updates per step, each
# on about 3k tokens, which is plenty to see the fall in reverse KL; generation and update cost half
HALF_BATCH = ("data.train_batch_size=256", "actor_rollout_ref.actor.ppo_mini_batch_size=256")


@pytest.fixture(scope="module")
def e2e(tmp_path_factory):
    """A folder for the runs and the weak-student pair (a pair.json in this module's folder: the shipped
    teacher and data, the weak student), which the runs use through EOPD_PAIR_DIR."""
    from verl_eopd.cpu import embedded

    root = tmp_path_factory.mktemp("e2e")
    shipped = embedded.embedded_pair()
    pair = root / "weak_pair"
    pair.mkdir()
    record = {**{k: shipped[k] for k in ("task", "version", "teacher", "train", "val")}, "student": str(WEAK_STUDENT)}
    (pair / embedded.PAIR_FILE).write_text(json.dumps(record))
    return {"root": root, "pair": pair}


def _run(e2e: dict, algorithm: str, name: str, *overrides: str) -> tuple[list[dict], str]:
    """One mechanics run: no validation (the default run's test checks it), one agent-loop worker (the default
    run's test runs the CPU default's two); metrics from verl's file log and the console (stdout and stderr)."""
    root = e2e["root"]
    cmd = [f"algorithm={algorithm}", f"trainer.experiment_name={name}", "trainer.val_before_train=false",
           "trainer.test_freq=-1", "trainer.logger=[console,file]", f"actor_rollout_ref.actor.optim.lr={LR}",
           f"trainer.default_local_dir={root / 'ckpt' / name}", ONE_AGENT_WORKER, *overrides]
    proc = run_main(cmd, cwd=root, VERL_FILE_LOGGER_ROOT=str(root / "metrics"), EOPD_PAIR_DIR=str(e2e["pair"]))
    path = root / "metrics" / "verl-eopd" / f"{name}.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()], proc.stdout + proc.stderr


def _series(records, key):
    return [r["data"][key] for r in records if key in r["data"]]


def _check_run(records, steps):
    train = [r for r in records if "actor/loss" in r["data"]]
    assert [r["step"] for r in train] == list(range(1, steps + 1))
    for r in train:
        d = r["data"]
        for k in DESIGN_METRICS:
            assert f"actor/eopd/{k}" in d, k
        assert all(math.isfinite(v) for k, v in d.items() if k.startswith(("actor/", "critic/")) and isinstance(v, float))
        assert 0.0 < d["actor/eopd/gate_frac"] < 1.0
    rkl = _series(train, "actor/eopd/rkl_mean")
    # the student's reverse KL to the teacher falls (the second half of the steps vs the first, on-policy noise;
    # measured 6.77 6.67 6.38 6.24 6.07 5.99 for eopd, 6.91 6.55 6.41 6.25 for opd on 2 ranks)
    half = steps // 2
    assert sum(rkl[-half:]) < sum(rkl[:half]), rkl
    return train


def _fkl_in_loss(data: list[dict]) -> tuple[list[float], list[float]]:
    """Per step: (loss - reverse-KL surrogate, gate fraction x gated forward KL). The loss is the token mean of
    (surrogate + fkl_coef x gate x FKL) per micro-batch and the metrics are the same token means, so the two are
    equal for eopd (fkl_coef 1) up to the weighting of micro-batches of different token counts, and the first is
    nothing for opd (FKL switched off). `data`: the logged metrics of each training step."""
    return ([d["actor/loss"] - d["actor/eopd/rkl_surrogate_mean"] for d in data],
            [d["actor/eopd/gate_frac"] * d["actor/eopd/fkl_gated_mean"] for d in data])


def _math_data(root: Path) -> str:
    """The pair's training problems written by prepare_data's converter as `math500` rows (verl_eopd.math.data),
    for verl_eopd.math.reward; the tiny student's answers are unboxed, hence box_required=false."""
    import pandas as pd

    from verl_eopd.cpu import embedded
    from verl_eopd.math.data import prepare

    raw = pd.read_parquet(embedded.embedded_pair()["train"])
    src = root / "raw" / "sums.jsonl"
    src.parent.mkdir(parents=True, exist_ok=True)
    src.write_text("".join(json.dumps({"problem": r["prompt"][0]["content"], "answer": r["reward_model"]["ground_truth"]})
                           + "\n" for r in raw.to_dict("records")))
    prepare(["math500"], str(root / "data"), sources={"math500": str(src)}, eval_instruction="", log=lambda m: None)
    return str(root / "data" / "math500.parquet")


# each mechanics run also carries more paths end to end (one Ray launch each, the suite's budget). `eopd` itself
# is the default run's test below (the README's command, the loss checked as the gated forward KL there).
#   opd        two FSDP2 ranks from the command line (Ray's logical GPUs and the micro-batches follow N)
#   eopd_grpo  verl_eopd.math.reward inside verl's reward loop on prepare_data's rows, trainer.console=full, and
#              from_hidden=true: the actor and the reference-route teacher without [tokens, V] logits
@pytest.mark.parametrize("algorithm", ["opd", "eopd_grpo"])
def test_tiny_default_end_to_end(e2e, algorithm):
    extra = {"opd": ["trainer.n_gpus_per_node=2", *HALF_BATCH],
             "eopd_grpo": [f"data.train_files={_math_data(e2e['root'])}", "data.max_prompt_length=64",
                           "reward.custom_reward_function.path=pkg://verl_eopd.math.reward",
                           "reward.custom_reward_function.name=compute_score",
                           "+reward.custom_reward_function.reward_kwargs.box_required=false",
                           "trainer.console=full", "distillation.distillation_loss.from_hidden=true"]}[algorithm]
    records, console = _run(e2e, algorithm, f"ci_{algorithm}", f"trainer.total_training_steps={STEPS}",
                            "trainer.save_freq=-1", *extra)
    train = _check_run(records, STEPS)
    first = train[0]["data"]
    fkl_part, gated = _fkl_in_loss([r["data"] for r in train])
    assert all(x > 1e-3 for x in gated)  # gated forward KL that eopd adds and opd must leave out
    if algorithm == "opd":
        assert all(abs(x) < 0.1 * y for x, y in zip(fkl_part, gated)), (fkl_part, gated)
    if algorithm == "eopd_grpo":
        assert FROM_HIDDEN_LINE in console  # the from_hidden engine ran (one line per actor rank)
        assert "critic/score/mean" in first and "actor/pg_loss" in first
        scores = _series(train, "critic/score/mean")
        assert sum(scores) > 0.0 and all(0.0 <= s <= 1.0 for s in scores), scores  # the math reward scored some
        assert "actor/pg_loss:" in console  # trainer.console=full: verl's every-metric line
    else:
        assert "actor/pg_loss:" not in console  # the compact console
    if algorithm == "opd":  # Ray's logical GPUs and the micro-batches followed the 2 ranks
        assert "(2 ranks)" in console, console[-3000:]


@pytest.mark.parametrize("token_logprob", ["exact", "fallback"])
def test_server_route_live_on_cpu(e2e, token_logprob):
    """algorithm=eopd_server end to end: verl's own teacher pool (MultiTeacherModelManager, the `hf` backend
    on a logical GPU), top-k payload through the agent loop. `exact`: the sampled-token column is switched on in
    the server process (EOPD_TEACHER_TOKEN_COLUMN via the runtime env), so no token needs the fallback.
    `fallback`: verl's top-k payload alone, the tokens outside the teacher's top-k get the tail estimate."""
    records, _ = _run(e2e, "eopd_server", f"ci_server_{token_logprob}", "trainer.total_training_steps=2",
                      "trainer.save_freq=-1", *HALF_BATCH, f"distillation.distillation_loss.server_token_logprob={token_logprob}")
    train = [r for r in records if "actor/loss" in r["data"]]
    assert [r["step"] for r in train] == [1, 2]
    for r in train:
        d = r["data"]
        assert 0.0 < d["actor/eopd/token_in_topk_frac"] <= 1.0
        if token_logprob == "exact":
            assert d["actor/eopd/teacher_token_fallback_frac"] == 0.0
        else:  # every token outside the top-k falls back, and only those
            assert d["actor/eopd/teacher_token_fallback_frac"] == pytest.approx(1 - d["actor/eopd/token_in_topk_frac"],
                                                                               abs=1e-6)
        assert d["actor/eopd/teacher_entropy_lower_mean"] <= d["actor/eopd/teacher_entropy_mean"] \
            <= d["actor/eopd/teacher_entropy_upper_mean"]
        assert 0.0 < d["actor/eopd/gate_frac"] < 1.0 and math.isfinite(d["actor/loss"])
    if token_logprob == "fallback":
        assert sum(_series(train, "actor/eopd/teacher_token_fallback_frac")) > 0  # the weak student strays


SHORT_STEPS = 16


def test_default_run_validates_at_both_ends_and_distils(tmp_path):
    """The README's main command itself (`bash scripts/run.sh`, which sets up its environment and runs
    `python -m verl_eopd.main algorithm=eopd`), shortened to SHORT_STEPS: verl validates greedily on the whole
    held-out split before training and at the end, the student moves towards the teacher (its reverse KL on its
    own samples falls), and the run ends with the summary (student before -> after, the teacher on the same
    problems, where the checkpoint and metrics are).

    The held-out accuracy lift is the full 60-step run's figure (docs/cpu.md, several run seeds): on the shipped
    pair accuracy first dips and rises after about 20 steps (16.1% -> 13.3-24.7% at step 20 over run seeds
    21-28; tiny-v4 dipped longer), so a short run cannot assert it without flaking."""
    root = Path(__file__).resolve().parent.parent
    proc = subprocess.run(["bash", str(root / "scripts" / "run.sh"), "algorithm=eopd",
                           f"trainer.total_training_steps={SHORT_STEPS}", f"trainer.test_freq={SHORT_STEPS}",
                           f"trainer.save_freq={SHORT_STEPS}"], cwd=tmp_path, capture_output=True, text=True,
                          timeout=1800)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    path = tmp_path / "verl-eopd" / "tiny_eopd.jsonl"
    records = [json.loads(line) for line in path.read_text().splitlines()]
    key = "val-core/eopd_tiny_add/acc/mean@1"
    val = [(r["step"], r["data"][key]) for r in records if key in r["data"]]
    assert [step for step, _ in val] == [0, SHORT_STEPS], val
    (_, before), (_, after) = val
    assert abs(before - embedded.embedded_pair()["held_out_greedy"]["student"]) <= 2 / 360  # the shipped student
    assert before <= 0.30, before  # it starts near the edge, not at the teacher's level
    assert 0.0 <= after <= 1.0
    train = [r["data"] for r in records if "actor/eopd/gate_frac" in r["data"]]
    assert len(train) == SHORT_STEPS and all(0.05 < d["actor/eopd/gate_frac"] < 0.4 for d in train)
    # algorithm=eopd: the loss holds the gated forward KL, per step to 15% (micro-batches of different token
    # counts) and over the run to 3%. Measured over the first 16 steps of 60-step runs: sixteen on tiny-v4 (both
    # schedules of docs/cpu.md's seed studies) 0.965-1.044 per step, 0.994-1.008 summed; eight on tiny-v5 (run
    # seeds 21-28) 0.969-1.095 per step, 0.999-1.011 summed. An opd loss gives 0, a doubled coefficient 2.
    fkl_part, gated = _fkl_in_loss(train)
    assert all(x > 1e-3 for x in gated) and all(abs(x - y) <= 0.15 * y for x, y in zip(fkl_part, gated)), (fkl_part, gated)
    assert abs(sum(fkl_part) - sum(gated)) <= 0.03 * sum(gated), (fkl_part, gated)
    # the student moves towards the teacher: the reverse KL of steps 12-16 at least 0.05 nats below that of steps
    # 2-4. Step 1 scores the shipped student's own samples before any update; on these pairs the first updates
    # raise the reverse KL (1.4-1.7 -> 1.7-2.3 nats by step 2-4) and on some runs it stays there for 10-20 steps,
    # so "last third below first third" flaked at 12 steps on tiny-v4 (a CI run of 32c3ab8: 7.63 against 7.60
    # nats, summed) and had margins down to 0.014 nats at 16. Measured on the default run's first 16 steps: 17
    # runs on tiny-v4 (run seeds 4-7 and 10-15 of both schedules of docs/cpu.md, and this test) 0.107-0.44 nats;
    # 8 runs on tiny-v5 (run seeds 21-28) 0.20-0.46. A run that does not learn (step-to-step noise about 0.05
    # nats) passes 0.05 about one time in eleven.
    rkl = [d["actor/eopd/rkl_mean"] for d in train]
    fall = sum(rkl[1:4]) / 3 - sum(rkl[-5:]) / 5
    assert fall > 0.05, (fall, rkl)
    out = proc.stdout
    assert "held-out accuracy" in out and f"{100 * before:.1f}% -> {100 * after:.1f}%" in out, out[-2000:]
    teacher = float(out.split("    teacher ")[1].split("%")[0])
    assert teacher >= 85.0, out[-2000:]
    assert f"checkpoint: {tmp_path / 'checkpoints' / 'verl-eopd' / 'tiny_eopd' / f'global_step_{SHORT_STEPS}'}" in out
    # after the run (issue 26): the summary's export line pasted, evaluate.py --pass-k 1,8 on the folder it names,
    # then the transformers snippet of docs/after_training.md, each as printed
    from after_training import export_evaluate_use

    done = export_evaluate_use(out, tmp_path, embedded.embedded_pair()["val"])
    assert done["target"] == tmp_path / "checkpoints" / "verl-eopd" / "tiny_eopd" / "hf" / f"global_step_{SHORT_STEPS}"
    assert done["evaluate"].stdout.splitlines()[0] == "| benchmark | problems | Avg@8 | Pass@1 | Pass@8 |"
    assert "[eval] 2 engines x tensor-parallel 1 on no GPUs (CPU)" in done["evaluate"].stderr  # data parallel
    assert f"metrics:    {path}" in out
    # the console a person reads: the header, one compact line per step, no every-metric line
    assert "[verl_eopd] algorithm=eopd on CPU (1 rank), rollout hf" in out
    steps = [line for line in out.splitlines() if "[eopd] step " in line and " rkl " in line]
    assert len(steps) == SHORT_STEPS and all(len(line) < 200 for line in steps), steps[:3]
    assert "actor/pg_loss" not in out and "actor/eopd/gate_frac" not in out
    # the 60-step run stays under 20 KB: this run's console plus 60 - SHORT_STEPS more step lines (run.sh's set-up
    # prints nothing once the environment exists)
    console = len(proc.stdout) + len(proc.stderr)
    per_step = max(len(line) + 1 for line in steps)
    assert console + (60 - SHORT_STEPS) * per_step < 20_000, (console, per_step)
