"""The embedded tasks: sums (one answer) and multiples (several answers, where the teacher is uncertain on the
tokens that decide correctness), their verifiable reward, and the pair built for each."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest

from verl_eopd.cpu import embedded
from verl_eopd.cpu.embedded import ADD, MULTIPLE, Problem, compute_score


@pytest.mark.unit
def test_multiple_reward_hand_cases():
    gt = Problem(MULTIPLE, 14, 40, 7).ground_truth()
    assert gt == "7 (14, 40)"
    cases = {"The answer is 21.": 1.0, "It is 35.": 1.0, "7 x 4 = 28.": 1.0,  # last integer is the answer
             "It is 14.": 0.0, "It is 40.": 0.0,  # the interval is open
             "It is 42.": 0.0, "It is 22.": 0.0, "It is -7.": 0.0, "7 x 3 = 22.": 0.0, "no number": 0.0, "": 0.0}
    for response, expected in cases.items():
        assert compute_score(MULTIPLE, response, gt) == expected, response
    # the data_source picks the rule: the same response under the sum rule compares with the ground truth
    assert compute_score(ADD, "It is 61.", "61") == 1.0 and compute_score(ADD, "It is 16.", "61") == 0.0


@pytest.mark.unit
def test_multiple_problems_have_three_to_five_answers_and_a_disjoint_split():
    train, val = embedded.task_problems(MULTIPLE)
    assert len(val) == embedded.N_MULTIPLE // 10 and len(train) + len(val) == embedded.N_MULTIPLE
    assert not set(train) & set(val)
    for p in train + val:
        answers = p.answers()
        assert 3 <= len(answers) <= 5 and all(n % p.d == 0 and p.a < n < p.b for n in answers), p
        assert all(compute_score(MULTIPLE, f"It is {n}.", p.ground_truth()) == 1.0 for n in answers)
    # every correct answer is taught: the responses of one problem cover all of them
    rng = random.Random(0)
    p = val[0]
    said = {int(p.response(rng).rstrip(".").split()[-1]) for _ in range(200)}
    assert said == set(p.answers())


@pytest.mark.unit
def test_the_sum_task_is_tiny_v4s():
    """The sum task is the calibrated tiny-v4's: same problems in the same order, the same SFT phrasing stream
    (one rng draw per response, as before the second task existed) and the same tokenizer text. The default
    run's pair, tiny-v5, is tiny-v4's teacher and data with a longer fine-tuned student; the plain-loop studies
    keep tiny-v4."""
    pairs = [(a, b) for a in range(embedded.MAX_OPERAND) for b in range(embedded.MAX_OPERAND)]
    random.Random(0).shuffle(pairs)
    train, val = embedded.task_problems(ADD)
    assert [(p.a, p.b) for p in val + train] == pairs and len(val) == 360
    rng, ref = random.Random(5), random.Random(5)
    for p in train[:50]:
        assert p.response(rng) == ref.choice(embedded.ADD_PHRASINGS).format(a=p.a, b=p.b, s=p.a + p.b)
    assert embedded.shipped_dir().name == "tiny-v5" and embedded.shipped_dir(studied=True).name == "tiny-v4"
    v5, v4 = embedded.embedded_pair(), embedded.embedded_pair(studied=True)
    assert all(v5[k] == v4[k] for k in ("teacher", "train", "val")) and v5["student"] != v4["student"]
    assert (v5["student_steps"], v4["student_steps"]) == (650, embedded.RECIPES[ADD].student_steps)
    assert len(embedded.tokenizer_corpus(ADD)) == 60 * 20 * 3


@pytest.mark.unit
def test_the_task_is_chosen_by_environment_and_a_bad_name_fails_naming_it(monkeypatch):
    monkeypatch.delenv(embedded.TASK_ENV, raising=False)
    assert embedded.selected_task() == ADD
    for value, task in (("multiple", MULTIPLE), (MULTIPLE, MULTIPLE), ("add", ADD), (" add ", ADD)):
        monkeypatch.setenv(embedded.TASK_ENV, value)
        assert embedded.selected_task() == task
    monkeypatch.setenv(embedded.TASK_ENV, "sums")
    with pytest.raises(ValueError, match=r"EOPD_EMBEDDED_TASK='sums'.*fix: EOPD_EMBEDDED_TASK=add"):
        embedded.selected_task()
    with pytest.raises(ValueError, match="names no embedded task|unknown embedded task"):
        embedded.embedded_pair(task="sums")
    info = {k: f"/x/{k}" for k in ("student", "teacher", "train", "val")}
    assert embedded.embedded_settings({**info, "task": MULTIPLE}, "opd")["trainer.experiment_name"] == "tiny_multiple_opd"
    settings = embedded.embedded_settings(info, "opd")
    assert settings["trainer.experiment_name"] == "tiny_opd"
    # the CPU-sized run replaces the presets' paper values (cosine lr 3e-6, 128 prompts, 4096 tokens)
    assert (settings["actor_rollout_ref.actor.optim.lr_scheduler_type"], settings["actor_rollout_ref.actor.optim.lr"],
            settings["data.train_batch_size"], settings["data.max_response_length"]) == ("constant", 1e-3, 512, 16)


@pytest.mark.integration
@pytest.mark.parametrize("task,studied", [(ADD, False), (ADD, True), (MULTIPLE, False)])
def test_the_shipped_pair_loads_and_scores_its_documented_held_out_accuracies(task, studied):
    """The pairs ship with the package (no SFT on the user's machine): the files load, the data splits are the
    task's, and greedy held-out accuracy is the one recorded in pair.json (the README's and docs' figures):
    student <= 30%, teacher >= 85%. Greedy decoding of the same weights can flip a near-tie between two
    tokens on another CPU's float reductions; 2 of 360 (add) or 120 (multiple) problems are allowed."""
    from verl_eopd.math.loop import held_out_accuracy

    info = embedded.embedded_pair(task, studied)
    assert info["root"] == str(embedded.shipped_dir(task, studied)) and info["task"] == task
    import pandas as pd

    train, val = embedded.task_problems(task)
    assert len(pd.read_parquet(info["train"])) == len(train) and len(pd.read_parquet(info["val"])) == len(val)
    recorded = info["held_out_greedy"]
    assert recorded["student"] <= 0.30 and recorded["teacher"] >= 0.85, recorded
    for who in ("student", "teacher"):
        measured = held_out_accuracy(info[who], info)
        assert abs(measured - recorded[who]) <= 2 / len(val) + 1e-9, (who, measured, recorded[who])


@pytest.mark.unit
def test_a_rebuilt_pair_is_chosen_by_environment_and_a_bad_folder_is_named(tmp_path, monkeypatch):
    shipped = embedded.shipped_dir()
    pair = tmp_path / "pair"
    pair.mkdir()
    record = json.loads((shipped / embedded.PAIR_FILE).read_text())
    record.update({k: v for k, v in embedded.load_pair(shipped).items() if k in ("student", "teacher", "train", "val")})
    (pair / embedded.PAIR_FILE).write_text(json.dumps(record))
    monkeypatch.setenv(embedded.PAIR_ENV, str(pair))
    assert embedded.embedded_pair()["root"] == str(pair) and embedded.embedded_pair()["student"] == record["student"]
    with pytest.raises(ValueError, match="EOPD_PAIR_DIR=.*eopd_tiny_add.*not 'eopd_tiny_multiple'"):
        embedded.embedded_pair(MULTIPLE)
    monkeypatch.setenv(embedded.PAIR_ENV, str(tmp_path / "empty"))
    with pytest.raises(FileNotFoundError, match=r"\(pair.json missing\). Fix: unset EOPD_PAIR_DIR"):
        embedded.embedded_pair()


@pytest.mark.unit
def test_a_student_built_beside_a_shipped_teacher_names_it_relative_to_its_folder(tmp_path):
    """`build_pair(teacher_from=...)` (how tiny-v5 was built from tiny-v4) fine-tunes only a student and names
    the reused teacher and data relative to the new folder (the package ships both folders side by side)."""
    root = tmp_path / "pairs" / "mine"
    info = embedded.build_pair(root, student_steps=2, teacher_from=embedded.shipped_dir(studied=True), verbose=False)
    record = json.loads((root / embedded.PAIR_FILE).read_text())
    assert record["version"] == "mine" and record["student_steps"] == 2 and not Path(record["teacher"]).is_absolute()
    v4 = embedded.embedded_pair(studied=True)
    assert all(info[k] == v4[k] for k in ("teacher", "train", "val")) and info["student"] == str(root / "student")
    assert (root / "student" / "model.safetensors").is_file()


def _teacher_digit_entropy(info: dict, n: int = 120) -> tuple[float, float, float]:
    """On the teacher's own greedy responses to n held-out prompts: its accuracy, and the fraction of problems
    where its entropy exceeds tau = 0.8 on some digit token (where correctness is decided); plus the mean
    number of distinct correct answers among 8 samples at T = 1."""
    import pandas as pd
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from verl_eopd.math.loop import generate, teacher_statistics

    tok = AutoTokenizer.from_pretrained(info["teacher"])
    teacher = AutoModelForCausalLM.from_pretrained(info["teacher"], dtype=torch.float32, attn_implementation="sdpa")
    rows = pd.read_parquet(info["val"]).to_dict("records")[:n]
    prompts = [tok(tok.apply_chat_template(list(r["prompt"]), tokenize=False, add_generation_prompt=True),
                   add_special_tokens=False)["input_ids"] for r in rows]
    eos, pad = tok.eos_token_id, tok.pad_token_id
    resp = generate(teacher, prompts, max_new_tokens=16, eos_id=eos, pad_id=pad, greedy=True)
    ts = teacher_statistics(teacher, prompts, resp, topk=16, student_eos=eos, teacher_eos=eos, pad_id=pad)
    digits = {i for i in range(len(tok)) if tok.decode([i]).strip().isdigit()}
    # the first response token is the phrasing choice (a digit in "a + b = s." and "d x q = n."): not a deciding token
    opened = sum(any(t in digits and ts["entropy"][b, j] > 0.8 for j, t in enumerate(r) if j > 0)
                 for b, r in enumerate(resp))
    acc = sum(compute_score(row["data_source"], tok.decode(r, skip_special_tokens=True), row["reward_model"]["ground_truth"])
              for row, r in zip(rows, resp)) / n
    torch.manual_seed(0)
    samples = generate(teacher, [p for p in prompts for _ in range(8)], max_new_tokens=16, eos_id=eos, pad_id=pad)
    distinct = []
    for i, row in enumerate(rows):
        texts = [tok.decode(s, skip_special_tokens=True) for s in samples[8 * i: 8 * i + 8]]
        good = {t.rstrip(".").split()[-1] for t in texts
                if compute_score(row["data_source"], t, row["reward_model"]["ground_truth"]) == 1.0}
        distinct.append(len(good))
    return acc, opened / n, sum(distinct) / n


@pytest.mark.e2e
def test_the_multiple_pair_has_an_uncertain_teacher_on_the_deciding_tokens_and_trains_through_verl(tmp_path):
    """The second task's pair: the teacher is right (>= 85% greedy on held-out problems) and spreads its mass
    over the correct answers (several distinct correct answers in 8 samples; entropy above tau on a digit of
    most of its own answers), unlike the sum pair, whose teacher is certain on every digit; the student
    starts low. Then `EOPD_EMBEDDED_TASK=multiple python -m verl_eopd.main algorithm=eopd` validates on it at
    both ends through verl's trainer, with the gate open on a real share of tokens."""
    from conftest import ONE_AGENT_WORKER, run_main

    info = embedded.embedded_pair(task=MULTIPLE)
    assert info["task"] == MULTIPLE
    acc, opened, distinct = _teacher_digit_entropy(info)
    assert acc >= 0.85 and opened >= 0.5 and distinct >= 2.0, (acc, opened, distinct)
    add_acc, add_opened, add_distinct = _teacher_digit_entropy(embedded.embedded_pair())
    # sums: a deciding digit above tau on 7.5% of the teacher's answers (multiples: 100%)
    assert add_acc >= 0.85 and add_opened <= 0.15 and add_distinct <= 1.0, (add_acc, add_opened, add_distinct)

    steps = 3
    proc = run_main(["algorithm=eopd", f"trainer.total_training_steps={steps}", f"trainer.test_freq={steps}",
                     "trainer.save_freq=-1", "actor_rollout_ref.actor.ppo_epochs=1", "data.train_batch_size=256",
                     "actor_rollout_ref.actor.ppo_mini_batch_size=256", ONE_AGENT_WORKER], cwd=tmp_path,
                    EOPD_EMBEDDED_TASK="multiple")
    path = tmp_path / "verl-eopd" / "tiny_multiple_eopd.jsonl"
    records = [json.loads(line) for line in path.read_text().splitlines()]
    key = f"val-core/{MULTIPLE}/acc/mean@1"
    val = [(r["step"], r["data"][key]) for r in records if key in r["data"]]
    assert [s for s, _ in val] == [0, steps] and val[0][1] <= 0.30, val
    train = [r["data"] for r in records if "actor/eopd/gate_frac" in r["data"]]
    assert len(train) == steps and all(0.05 < d["actor/eopd/gate_frac"] < 0.4 for d in train), train
    assert "teacher " in proc.stdout and key in proc.stdout
