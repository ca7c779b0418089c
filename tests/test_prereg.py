"""The preregistered experiment's parts (docs/preregistration.md; verl_eopd/math/prereg.py, prereg_run.py): the
held-out sets against the counts the preregistration states, the deciding token, distinct answers against
enumeration, the random gate, teacher-forced entropy against a float64 forward, the one-sided p, the budget
rule, provenance and resume refusals, and scripts/prereg.py end to end on a smoke shape."""

import itertools
import json
import math
import random
import subprocess
from fractions import Fraction
from pathlib import Path

import pytest
import torch

from verl_eopd.core.settings import EOPDSettings
from verl_eopd.cpu.embedded import MULTIPLE, Problem, task_problems
from verl_eopd.math import loop as L
from verl_eopd.math import prereg as P
from verl_eopd.math import prereg_run as R
from verl_eopd.math.stats import PairedTest

from tolerances import U32, U64, entropy_bound, fp32_logit_bound, log_softmax_bound


@pytest.fixture(scope="module")
def pair():
    from verl_eopd.cpu.embedded import embedded_pair
    from verl_eopd.math.repro import _Pair

    return _Pair(embedded_pair(task=MULTIPLE))


# -- sets ------------------------------------------------------------------------------------------------------------

@pytest.mark.unit
def test_heldout_sets_have_the_preregistrations_counts_and_never_meet_training():
    """Section 4: 148 of 150 (d, answer set) keys seen in training; H = the 22 novel-key problems + 378 others
    (400), disjoint from training by (d, a, b); X = 200 of the 2,317 problems with a in 90..129, 3 to 5 answers and
    an unseen key."""
    train, _ = task_problems(MULTIPLE)
    seen = {(p.d, tuple(p.answers())) for p in train}
    H, X, novel = P.heldout_sets()
    assert len(seen) == 148 and len(H) == 400 and len(novel) == 22 and len(X) == 200
    assert H[:22] == novel and len(set(H)) == 400 and len(set(X)) == 200
    assert {(p.d, tuple(p.answers())) for p in novel} == {(6, (42, 48, 54)), (8, (96, 104, 112, 120, 128))}
    assert all((p.d, tuple(p.answers())) in seen for p in H[22:])
    assert not {(p.d, p.a, p.b) for p in H} & {(p.d, p.a, p.b) for p in train}
    assert all(90 <= p.a <= 129 and 3 <= len(p.answers()) <= 5 and (p.d, tuple(p.answers())) not in seen for p in X)
    far = [(d, a, a + w) for d in (6, 7, 8, 9) for a in range(90, 130) for w in range(3 * d + 1, 5 * d + 1)
           if 3 <= sum(1 for n in range(a + 1, a + w) if n % d == 0) <= 5
           and (d, tuple(n for n in range(a + 1, a + w) if n % d == 0)) not in seen]
    assert len(far) == 2317
    assert P.heldout_sets() == (H, X, novel)  # fixed seeds: the same sets every call
    assert P.problems_sha256(H) != P.problems_sha256(H[::-1])


@pytest.mark.unit
def test_prompts_are_built_as_the_val_parquets(pair):
    _, val = task_problems(MULTIPLE)
    by_truth = {p.ground_truth(): p for p in val}
    assert len(pair.val) == len(val) == 120
    for ids, truth in zip(pair.val, pair.val_answers):
        assert P.chat_prompt_ids(pair.tok, by_truth[truth]) == ids


# -- the deciding token and distinct answers ------------------------------------------------------------------------

@pytest.mark.unit
def test_deciding_position_on_hand_cases(pair):
    def pieces(text):
        return [pair.tok.decode([t]) for t in pair.tok(text, add_special_tokens=False)["input_ids"]]

    assert pieces("The answer is 42.") == ["Th", "e", " answer", " is", " ", "4", "2", "."]
    assert P.deciding_position(pieces("The answer is 42.")) == 5
    assert P.deciding_position(pieces("It is 105.")) == 3
    assert P.deciding_position(pieces("7 x 12 = 84.")) == 3  # the quotient's first digit, not d's
    assert P.digit_run(pieces("7 x 12 = 84."), 3) == [3, 4]
    assert P.digit_run(pieces("It is 105."), 3) == [3, 4, 5]
    for text in ("The answer is 42", "It is 105. ", "7 x 12 = 84. It is 84.", "Seven x 12 = 84.", ""):
        assert P.deciding_position(pieces(text)) is None, text
    assert P.deciding_position(["The", " answer", " is", " 42", "."]) is None  # a digit inside a longer token


@pytest.mark.unit
def test_expected_distinct_answers_equal_exact_enumeration():
    """D_k = sum_a pass_at_k(n, c_a, k) against the mean number of distinct answers over every k-subset (Fractions).
    Bound: each pass_at_k is 1 - a product of <= n factors (1 - k/i), each factor rounded twice and each product
    once (3u per factor), so |error| <= 3 n u per answer, summed over the answers."""
    for n, counts, k in ((10, [3, 2, 0, 1], 3), (9, [1, 1, 1, 1, 1], 4), (8, [8], 2), (12, [4, 4, 4], 5)):
        labels = [a for a, c in enumerate(counts) for _ in range(c)] + [None] * (n - sum(counts))
        subsets = list(itertools.combinations(range(n), k))
        exact = Fraction(sum(len({labels[i] for i in s} - {None}) for s in subsets), len(subsets))
        got = P.expected_distinct(n, counts, k)
        assert abs(got - float(exact)) <= len(counts) * 3 * n * U64 + U64, (n, counts, k, got, exact)


@pytest.mark.unit
def test_problem_measures_count_answers_by_the_reward_rule():
    p = Problem(MULTIPLE, 20, 50, 7)  # answers 21, 28, 35, 42, 49
    texts = ["The answer is 21.", "It is 28.", "7 x 3 = 21.", "The answer is 22.", "", "It is 70.", "It is 49.",
             "21 or 35"]
    m = P.problem_measures(p, texts)
    assert m["c"] == 5 and m["counts"] == [2, 1, 1, 0, 1] and m["distinct"] == 4 and m["answers"] == 5
    assert m["pass"][0] == pytest.approx(5 / 8, abs=4 * U64) and m["pass"][-1] == 1.0
    s = P.set_measures([m, P.problem_measures(p, [""] * 8)])
    assert s["distinct_hist"] == [1, 0, 0, 0, 1, 0] and s["distinct"] == 2.0 and s["distinct_solved"] == 4.0
    assert s["avg"] == pytest.approx(100 * 5 / 16, abs=1e-12) and s["coverage"] == pytest.approx(0.4, abs=1e-15)


# -- the random gate --------------------------------------------------------------------------------------------------

@pytest.mark.unit
def test_random_gate_opens_the_hard_gates_count_uniformly_on_valid_tokens():
    torch.manual_seed(0)
    mask = torch.rand(4, 6) > 0.3
    H = torch.rand(4, 6) * 2
    tau = 0.8
    n_hard = int(((H > tau) & mask).sum())
    assert 0 < n_hard < int(mask.sum())
    hits = torch.zeros(4, 6)
    draws = 4000
    for seed in range(draws):
        stand_in, n = L.random_gate_entropy(H, mask, tau, torch.Generator().manual_seed(seed))
        opened = stand_in > tau
        assert n == n_hard and int(opened.sum()) == n_hard and not (opened & ~mask).any()
        assert set(stand_in.unique().tolist()) <= {0.0, torch.tensor(tau + 1.0).item()}  # fp32 stand-in
        hits += opened
    again, _ = L.random_gate_entropy(H, mask, tau, torch.Generator().manual_seed(7))
    assert torch.equal(again, L.random_gate_entropy(H, mask, tau, torch.Generator().manual_seed(7))[0])
    # uniform: each valid position is opened with probability q = n / N; 5 binomial sds over 4000 draws
    q = n_hard / int(mask.sum())
    sd = math.sqrt(draws * q * (1 - q))
    assert ((hits[mask] - draws * q).abs() <= 5 * sd).all(), hits
    assert L.random_gate_seed(3, 60) != L.random_gate_seed(0, 60) != L.random_gate_seed(0, 59)


@pytest.mark.integration
def test_the_loop_trains_the_random_arm_on_the_matched_random_tokens(pair, monkeypatch):
    """distill(random_gate=True): every PPO epoch of a step gets the same stand-in entropy; it opens exactly as many
    valid tokens as the teacher's entropy exceeds tau on, not those tokens; the record's gate_frac (the gate's own
    mean) equals hard_gate_frac."""
    seen, real = [], []
    orig_loss, orig_stats = L.eopd_loss, L.teacher_statistics

    def loss(*a, **kw):
        seen.append((kw["teacher_entropy"].clone(), a[5].clone()))
        return orig_loss(*a, **kw)

    def stats(*a, **kw):
        ts = orig_stats(*a, **kw)
        real.append(ts["entropy"].clone())
        return ts

    monkeypatch.setattr(L, "eopd_loss", loss)
    monkeypatch.setattr(L, "teacher_statistics", stats)
    student = pair.load(pair.info["student"])
    cfg = L.LoopConfig(steps=2, batch=32, ppo_epochs=2, seed=5, random_gate=True)
    hist = L.distill(student, pair.teacher, pair.train[:64], cfg, student_eos=pair.student_eos,
                     teacher_eos=pair.teacher_eos, pad_id=pair.pad, log=lambda m: None)
    assert len(seen) == 4 and len(real) == 2
    for step in range(2):
        (e1, m1), (e2, m2) = seen[2 * step], seen[2 * step + 1]
        assert torch.equal(e1, e2) and torch.equal(m1, m2)
        n_hard = int(((real[step] > 0.8) & m1).sum())
        opened = e1 > 0.8
        assert 0 < n_hard < int(m1.sum()) and int(opened.sum()) == n_hard and not (opened & ~m1).any()
        assert not torch.equal(opened, (real[step] > 0.8) & m1)
        rec = hist[step]
        assert rec["hard_gate_frac"] == pytest.approx(n_hard / int(m1.sum()), abs=1e-15)
        assert rec["gate_frac"] == pytest.approx(rec["hard_gate_frac"], abs=4 * U32)
    with pytest.raises(ValueError, match="random_gate"):
        L.distill(student, pair.teacher, pair.train[:64],
                  L.LoopConfig(steps=1, batch=32, random_gate=True, settings=EOPDSettings(gate="quantile")),
                  student_eos=pair.student_eos, teacher_eos=pair.teacher_eos, pad_id=pair.pad)


# -- teacher-forced entropy ------------------------------------------------------------------------------------------

@pytest.mark.integration
def test_forced_entropies_equal_a_float64_forward_per_sequence(pair):
    """Batched, left-padded fp32 against one unpadded float64 forward per sequence. Bound: logits within
    fp32_logit_bound (one fp32 side), log-softmax then entropy bounds with one fp32 side."""
    student = pair.load(pair.info["student"])
    prompts = pair.val[:6]
    responses = [pair.tok(t, add_special_tokens=False)["input_ids"] for t in
                 ("The answer is 42.", "It is 105.", "7 x 12 = 84.", "It is 7.", "9 x 3 = 27.", "The answer is 1.")]
    got = P.forced_entropies(student, prompts, responses, pair.pad, chunk=4)
    ref_model = pair.load(pair.info["student"]).double()
    V = student.config.vocab_size
    worst = 0.0
    with torch.no_grad():
        for q, r, g in zip(prompts, responses, got):
            logits = ref_model(input_ids=torch.tensor([q + r])).logits[0, len(q) - 1:-1]  # row j predicts r[j]
            logp = torch.log_softmax(logits, -1)
            ref = -(logp.exp() * logp).sum(-1)
            eps = log_softmax_bound(float(logits.abs().max()), V, fp32_logit_bound(student, len(q) + len(r)) / 2,
                                    sides=1)
            for a, b in zip(g, ref.tolist()):
                assert abs(a - b) <= entropy_bound(eps, math.log(V), V, sides=1), (a, b)
                worst = max(worst, abs(a - b))
    assert len(got) == 6 and [len(g) for g in got] == [len(r) for r in responses] and worst < 1e-4


# -- statistics and the budget rule ----------------------------------------------------------------------------------

@pytest.mark.unit
def test_one_sided_p_against_t_tables():
    """t_{0.95, 5} = 2.015048373 and t_{0.975, 10} = 2.228138852 (standard tables, 9 digits)."""
    def test(t, df, p2):
        return PairedTest(df + 1, df, 1.0, (0.0, 2.0), t, p2)

    from verl_eopd.math.stats import t_two_sided_p
    assert P.one_sided_p(test(2.015048373, 5, t_two_sided_p(2.015048373, 5))) == pytest.approx(0.05, abs=1e-8)
    assert P.one_sided_p(test(-2.228138852, 10, t_two_sided_p(2.228138852, 10))) == pytest.approx(0.975, abs=1e-8)
    assert P.one_sided_p(test(0.0, 7, 1.0)) == 0.5
    rows = P.family([{"p": 0.01}, {"p": 0.04}, {"p": 0.5}])
    assert [r["p_holm"] for r in rows] == pytest.approx([0.03, 0.08, 0.5], abs=1e-15)
    assert [r["passed"] for r in rows] == [True, False, False]
    c = P.contrast("x", [3.0, 5.0, 4.0, 6.0], [1.0, 2.0, 2.0, 2.0], "one")
    d = [2.0, 3.0, 2.0, 4.0]
    sd = math.sqrt(sum((v - 2.75) ** 2 for v in d) / 3)
    assert c["mean_diff"] == 2.75 and c["df"] == 3 and c["t"] == pytest.approx(2.75 / (sd / 2), rel=4 * U64)


@pytest.mark.unit
def test_budget_rule_on_hand_cases():
    """n3 = min(26, floor((7200 - T0 - 78 t_m - 36 t_s) / (3 t_m))), 0 below 10 (section 7)."""
    assert P.budget_n3(50, 25, 100) == 15  # (7200 - 100 - 3900 - 900) / 150 = 15.3
    assert P.budget_n3(40, 20, 100) == 26  # 27.2, capped
    assert P.budget_n3(70, 40, 300) == 0  # 0 / 210
    assert P.budget_n3(60, 30, 0) == 0  # (7200 - 4680 - 1080) / 180 = 8 < 10: tier 3 not run
    assert P.budget_n3(55, 30, 0) == 11  # (7200 - 4290 - 1080) / 165 = 11.1
    assert P.budget_n3(10, 5, 0, cap=2, floor=1, budget_s=1e9, tier1=6, tier2=4) == 2


# -- provenance, resume and the runner ------------------------------------------------------------------------------

def _git(root, *args):
    return subprocess.run(["git", *args], cwd=root, capture_output=True, text=True, check=True).stdout


@pytest.mark.unit
def test_provenance_sees_a_dirty_tree_but_not_its_own_output(tmp_path, monkeypatch):
    root = tmp_path / "repo"
    (root / "docs").mkdir(parents=True)
    _git(root, "init", "-q")
    (root / "a.py").write_text("x = 1\n")
    _git(root, "add", "a.py")
    _git(root, "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "one")
    monkeypatch.setattr(R, "ROOT", root)
    out = root / "docs" / "run"
    out.mkdir()
    (out / "partial.json").write_text("{}")
    prov = R.provenance(out)
    assert prov["clean"] and prov["commit"] == _git(root, "rev-parse", "HEAD").strip()
    R.refuse_dirty_docs(out, prov)
    (root / "a.py").write_text("x = 2\n")
    prov = R.provenance(out)
    assert not prov["clean"] and prov["dirty_files"] == [" M a.py"]
    with pytest.raises(SystemExit, match="dirty tree"):
        R.refuse_dirty_docs(out, prov)
    R.refuse_dirty_docs(tmp_path / "elsewhere", prov)  # outside docs/: allowed, the flag is recorded


@pytest.mark.unit
def test_resume_keeps_matching_runs_and_refuses_others(tmp_path):
    cfg = {"arm": "eopd", "seed": 3}
    path = tmp_path / "runs" / "t" / "eopd" / "seed03.json"
    assert R.existing(path, "abc", cfg) is None
    R.write_json(path, {"provenance": {"commit": "abc"}, "config": cfg, "config_sha256": R.sha(cfg),
                        "result": {"x": 1}})
    assert R.existing(path, "abc", cfg) == {"x": 1}
    with pytest.raises(SystemExit, match="seed03.json.*commit abc"):
        R.existing(path, "def", cfg)
    with pytest.raises(SystemExit, match="refusing to resume"):
        R.existing(path, "abc", {**cfg, "seed": 4})
    assert [p.name for p in path.parent.iterdir()] == ["seed03.json"]  # atomic writes leave no temporary files


@pytest.mark.unit
def test_forcing_the_cpu_isa_sets_the_kernel_variables_before_the_workers_spawn(monkeypatch):
    for key in R.ISA_ENV_KEYS:
        monkeypatch.delenv(key, raising=False)
    R.force_cpu_isa(None)
    assert not any(k in R.os.environ for k in R.ISA_ENV_KEYS)
    R.force_cpu_isa("avx2")
    assert {k: R.os.environ[k] for k in R.ISA_ENV_KEYS} == {"ATEN_CPU_CAPABILITY": "avx2",
                                                             "MKL_ENABLE_INSTRUCTIONS": "AVX2",
                                                             "ONEDNN_MAX_CPU_ISA": "AVX2"}
    assert R.provenance(R.ROOT / "docs" / "prereg_run")["cpu_isa_forced"]["ATEN_CPU_CAPABILITY"] == "avx2"
    with pytest.raises(SystemExit, match="--cpu-isa 'sse'"):
        R.force_cpu_isa("sse")


def _pass_at(n, c, k):
    """1 - C(n - c, k) / C(n, k), exactly (math.comb), as an independent reference."""
    return 1 - Fraction(math.comb(n - c, k), math.comb(n, k))


@pytest.mark.e2e
def test_the_runner_end_to_end_on_the_smoke_shape_resumes_and_recomputes(tmp_path):
    """scripts/prereg.py --quick: every tier's run file, the measures recomputed from the stored per-problem counts,
    the primaries' differences from the run files, then a rerun that trains nothing and a tampered file refused."""
    out = tmp_path / "p"
    cmd = [R.sys.executable, str(R.ROOT / "scripts" / "prereg.py"), "--quick", "--threads", "1", "--out", str(out)]
    first = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert first.returncode == 0, first.stderr[-3000:]
    d = R.Design.quick()
    files = sorted((out / "runs").glob("*/*/seed*.json"))
    assert len(files) == 3 * 2 + 2 * 2 + 3 * 2 and first.stdout.count("[prereg] eopd_tiny") == 16
    budget = json.loads((out / "budget.json").read_text())
    assert budget["n3"] == 2 and budget["workers"] == 1 and budget["threads_per_worker"] == 1
    refs = json.loads((out / "references.json").read_text())
    assert refs["token_set_kept"] == len(refs["token_set"]["j"]) > 0
    runs = R.load_runs(out)
    for r in runs[MULTIPLE]["opd"] + runs[MULTIPLE]["eopd"] + runs[MULTIPLE]["random"]:
        m, n = r["measures"], d.samples
        H = r["measures"]["per_problem"][:d.h_size]
        assert len(r["measures"]["per_problem"]) == d.h_size + d.x_size
        assert m["H"]["pass"][3] == pytest.approx(100 * float(sum(_pass_at(n, c, 4) for c, *_ in H)) / len(H), abs=1e-12)
        d8 = sum(sum(_pass_at(n, ca, 8) for ca in counts) for _, *counts in H) / len(H)
        assert m["H"]["d8"] == pytest.approx(float(d8), abs=1e-12)
    summary = json.loads((out / "summary.json").read_text())
    h1 = summary["primary"][0]
    diffs = [e["measures"]["H"]["pass"][3] - o["measures"]["H"]["pass"][3]
             for e, o in zip(runs[MULTIPLE]["eopd"], runs[MULTIPLE]["opd"])]
    assert h1["n"] == 2 and h1["mean_diff"] == pytest.approx(sum(diffs) / 2, abs=1e-12)
    assert [r["name"][:2] for r in summary["secondary"]] == ["S1", "S2", "S3", "S4", "S5", "S6", "S7"]
    assert all(p["verdict"] in ("holds", "not shown") and (p["verdict"] == "holds") == (p["p_holm"] < 0.05)
               for p in summary["primary"])
    assert {Path(f).name for f in summary["figures"]} == {"pass_at_k.png", "distinct_answers.png",
                                                          "deciding_entropy.png"}
    again = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0 and "16 runs: 16 already done, 0 to run" in again.stdout, again.stdout[-2000:]
    assert json.loads((out / "summary.json").read_text())["primary"] == summary["primary"]
    other = subprocess.run(cmd[:-4] + ["--threads", "2", "--out", str(out)], capture_output=True, text=True,
                           timeout=600)
    assert other.returncode != 0 and "resume with --workers 1 --threads 1" in other.stderr
    _addendum_beside(out, tmp_path, summary)
    rec = json.loads(files[0].read_text())
    rec["config_sha256"] = "0" * 64
    files[0].write_text(json.dumps(rec))
    bad = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert bad.returncode != 0 and f"refusing to resume over {files[0]}" in bad.stderr


def _addendum_beside(full, tmp_path, full_summary):
    """--addendum (section 11) beside a copy of the smoke run whose budget rule had given n3 = 0: it re-runs the
    base's opd and eopd seed 0 (equal float for float), runs tier 3, and the merged analysis equals the analysis of
    the run that ran every tier itself; a base whose opd seed 0 was altered is refused before tier 3."""
    import shutil

    base = tmp_path / "base"
    shutil.copytree(full, base, ignore=shutil.ignore_patterns(*R.TIER3, "summary.json", "results.md", "*.png"))
    budget = json.loads((base / "budget.json").read_text())
    R.write_json(base / "budget.json", {**budget, "n3": 0})
    add = tmp_path / "add"
    cmd = [R.sys.executable, str(R.ROOT / "scripts" / "prereg.py"), "--quick", "--addendum", "--threads", "1",
           "--base", str(base), "--out", str(add)]
    first = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert first.returncode == 0, first.stderr[-3000:]
    meta = json.loads((add / "addendum.json").read_text())
    assert [(r["arm"], r["seed"], r["equal"]) for r in meta["reproduction"]] == [("opd", 0, True), ("eopd", 0, True)]
    assert meta["budget"]["n3"] == R.Design.quick().cap3 and "6 runs: 0 already done, 6 to run" in first.stdout
    for arm in R.TIER3:
        for s in range(R.Design.quick().cap3):
            mine, theirs = (json.loads(R.run_path(d, MULTIPLE, arm, s).read_text())["result"] for d in (add, full))
            assert R._canonical(mine["measures"]) == R._canonical(theirs["measures"])
            assert mine["cpu_capability"] == theirs["cpu_capability"] != ""
    merged = json.loads((add / "summary.json").read_text())
    assert merged["secondary"] == full_summary["secondary"] and merged["primary"] == full_summary["primary"]
    assert "Reproduction of the base's opd seed 0: equal, eopd seed 0: equal" in (add / "results.md").read_text()
    again = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0 and "6 runs: 6 already done, 0 to run" in again.stdout, again.stdout[-2000:]
    summary_text = (full / "summary.json").read_text()
    cmp = [R.sys.executable, str(R.ROOT / "scripts" / "prereg.py"), "--out", str(full), "--compare", str(base),
           str(add)]
    same = subprocess.run(cmp, capture_output=True, text=True, timeout=600)
    assert same.returncode == 0 and "16 of 16 runs equal float for float" in same.stdout, same.stdout[-2000:]
    assert (full / "summary.json").read_text() == summary_text  # --compare reports nothing anew
    rep = json.loads((full / "reproduction.json").read_text())
    assert rep["references_equal"] is True and rep["not_in_others"] == rep["not_in_out"] == rep["different"] == []
    path = R.run_path(base, MULTIPLE, "opd", 0)
    rec = json.loads(path.read_text())
    rec["result"]["measures"]["H"]["d8"] += 1e-9
    R.write_json(path, rec)
    rep = R.compare_runs(full, [base, add])
    assert (rep["compared"], rep["equal"], rep["different"]) == (16, 15, ["eopd_tiny_multiple/opd/seed00.json"])
    assert subprocess.run(cmp, capture_output=True, text=True, timeout=600).returncode == 1
    rep = R.compare_runs(add, [base])  # tier 3 is not in the base: listed, not compared
    assert rep["compared"] == 0 and len(rep["not_in_others"]) == 6 and len(rep["not_in_out"]) == 10
    bad = subprocess.run(cmd[:-1] + [str(tmp_path / "add2")], capture_output=True, text=True, timeout=600)
    assert bad.returncode != 0 and "the base's runs do not reproduce" in bad.stderr, bad.stderr[-2000:]
    assert "DIFFERENT" in bad.stdout and not (tmp_path / "add2" / "runs").exists()
