"""The math reward (math-verify, timeouts, threads) and the Pass@k / Avg@k arithmetic."""

import itertools
import math
import threading
from fractions import Fraction

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from verl_eopd.math.eval import markdown_table, parse_pass_k, pass_at_k, summarize
from verl_eopd.math.reward import compute_score, extract_answer, gold_answers, last_boxed

pytestmark = pytest.mark.unit

# (response, ground truth, expected score)
CASES = [
    ("so \\boxed{0.5}", "\\frac{1}{2}", 1.0),  # fraction vs decimal
    ("\\boxed{\\dfrac12}", "0.5", 1.0),
    ("\\boxed{\\sqrt 2}", "\\sqrt{2}", 1.0),  # roots
    ("\\boxed{\\frac{\\sqrt{3}}{2}}", "$\\frac{\\sqrt3}{2}$", 1.0),  # gold with $...$
    ("\\boxed{(1,2]}", "(1,2]", 1.0),  # intervals
    ("\\boxed{[1,2)}", "(1,2]", 0.0),
    ("\\boxed{50\\%}", "50", 1.0),  # percents, both ways
    ("\\boxed{50}", "50\\%", 1.0),
    ("\\boxed{5\\text{ cm}}", "5", 1.0),  # units
    ("\\boxed{1,000}", "1000", 1.0),  # thousands separators
    ("\\boxed{1{,}000}", "1000", 1.0),
    ("\\boxed{x^2+2x+1}", "(x+1)^2", 1.0),  # algebraic equivalence
    ("\\boxed{\\{1,2\\}}", "\\{2,1\\}", 1.0),  # sets
    ("\\boxed{2} no wait \\boxed{1}", "1", 1.0),  # the last box counts
    ("\\boxed{1} or \\boxed{2}", "1", 0.0),  # hedging earns nothing
    ("\\fbox{12}", "12", 1.0),
    ("\\boxed 7.", "7", 1.0),
    ("The answer is 7.", "7", 0.0),  # no box: 0 when a box is required (training default)
    ("\\boxed{-3}", "3", 0.0),
    ("\\boxed{\\pi}", "3.14159", 0.0),
    ("\\boxed{3}", ["4", "3"], 1.0),  # several acceptable answers
    ("\\boxed{3}", 3, 1.0),  # numeric ground truth
    ("\\boxed{3}", "\\boxed{3}", 1.0),  # boxed ground truth
    # garbage never raises
    (None, "1", 0.0), (12, "12", 0.0), (b"\\boxed{1}", "1", 1.0), ("\\boxed{\\frac{1}{", "1", 0.0),
    ("\\boxed{", "1", 0.0), ("\\boxed{3}", None, 0.0), ("\\boxed{3}", "", 0.0), ("", "1", 0.0),
    ("\\boxed{" + "1+" * 600 + "1}", "1201", 0.0),  # over MAX_ANSWER_CHARS
    ("x" * 200_000 + "\\boxed{3}", "3", 1.0),
]


@pytest.mark.parametrize("response,truth,expected", CASES)
def test_reward_cases(response, truth, expected):
    assert compute_score("math", response, truth) == expected


def test_reward_is_the_same_off_the_main_thread():
    """verl calls the reward from a thread pool, where math-verify's signal timeouts cannot work: there the
    check runs in scorer subprocesses and must give the same scores."""
    results = {}

    def work():
        results["thread"] = [compute_score("math", r, t) for r, t, _ in CASES]

    th = threading.Thread(target=work)
    th.start()
    th.join(timeout=300)
    assert not th.is_alive()
    assert results["thread"] == [e for _, _, e in CASES]


def test_concurrent_threads_share_the_scorer_pool():
    cases = [("\\boxed{0.5}", "\\frac12", 1.0), ("\\boxed{x^2}", "x\\cdot x", 1.0), ("\\boxed{2}", "3", 0.0)] * 6
    out = [None] * len(cases)

    def work(i):
        out[i] = compute_score("math", cases[i][0], cases[i][1])

    threads = [threading.Thread(target=work, args=(i,)) for i in range(len(cases))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    assert out == [c[2] for c in cases]


@pytest.mark.parametrize("where", ["main", "thread"])
def test_pathological_answers_are_cut_by_the_timeout(where, fresh_python):
    """A tower of powers sends sympy into a computation that does not end in any useful time: with timeout_s=1
    the score is 0.0 and the call returns (main thread: math-verify's signal timeouts, here in a fresh process
    whose main thread scores; off the main thread: the scorer subprocess is killed after 4 x timeout_s). The
    120 s limits only turn a hang into a failure; no speed is asserted."""
    response, truth = "\\boxed{9^{9^{9^{9}}}}", "3"
    if where == "main":
        code = ("from verl_eopd.math.reward import compute_score; import threading; "
                "assert threading.current_thread() is threading.main_thread(); "
                f"print(compute_score('math', {response!r}, {truth!r}, timeout_s=1))")
        out = fresh_python(["-c", code], timeout=120)
        assert out.returncode == 0, out.stderr[-2000:]
        assert out.stdout.strip().splitlines()[-1] == "0.0"
        return
    box = {}
    th = threading.Thread(target=lambda: box.update(score=compute_score("math", response, truth, timeout_s=1)))
    th.start()
    th.join(timeout=120)
    assert not th.is_alive() and box["score"] == 0.0


def test_unboxed_fallback_for_evaluation():
    assert compute_score("m", "The answer is 7.", "7", box_required=False) == 1.0
    assert compute_score("m", "Final Answer: $\\frac{1}{2}$", "0.5", box_required=False) == 1.0
    assert compute_score("m", "so we get 3 apples, then 1,024", "1024", box_required=False) == 1.0
    assert compute_score("m", "no numbers here", "1", box_required=False) == 0.0
    assert compute_score("m", "\\boxed{2}. The answer is 7", "7", box_required=False) == 0.0  # a box wins


def test_extraction_helpers():
    assert last_boxed("a \\boxed{\\frac{1}{2}} b \\boxed{x_{1}}") == "x_{1}"
    assert last_boxed("\\boxed{ {a}{b} }") == " {a}{b} "
    assert last_boxed("none") is None
    assert last_boxed("\\boxed{unclosed") is None
    assert extract_answer("The answer is 5.", box_required=True) is None
    assert gold_answers(["$1$", 2, None]) == ["1", "2"]
    assert gold_answers("\\boxed{4}") == ["4"]


@settings(max_examples=150, deadline=None)
@given(st.text(alphabet=st.sampled_from(list("\\boxed{}frac0123456789^_ $%.,-+()[]xy \n")), max_size=80),
       st.one_of(st.text(max_size=10), st.integers(), st.none(), st.lists(st.text(max_size=5), max_size=3)))
def test_reward_never_raises_and_is_binary(response, truth):
    assert compute_score("math", response, truth, timeout_s=1) in (0.0, 1.0)


# ------------------------------------------------------------------------------------------- pass@k


def _pass_at_k_by_enumeration(n, c, k):
    """Share of the k-subsets of n samples (c of them correct) that contain a correct one: exact rational."""
    samples = [1] * c + [0] * (n - c)
    subsets = list(itertools.combinations(range(n), k))
    return Fraction(sum(1 for s in subsets if any(samples[i] for i in s)), len(subsets))


@pytest.mark.parametrize("n", range(1, 10))
def test_pass_at_k_equals_exact_combinatorics(n):
    for k in range(1, n + 1):
        for c in range(0, n + 1):
            exact = _pass_at_k_by_enumeration(n, c, k)
            assert pass_at_k(n, c, k) == pytest.approx(float(exact), abs=1e-12)
            assert float(exact) == pytest.approx(1 - math.comb(n - c, k) / math.comb(n, k), abs=1e-12)


def test_pass_at_k_large_n_is_stable_and_monotone():
    values = [pass_at_k(200, 3, k) for k in range(1, 201)]
    assert values[0] == pytest.approx(3 / 200)
    assert all(b >= a for a, b in zip(values, values[1:]))
    assert values[-1] == 1.0
    assert pass_at_k(200, 3, 50) == pytest.approx(1 - math.comb(197, 50) / math.comb(200, 50), rel=1e-12)


@pytest.mark.parametrize("args,match", [((4, 1, 5), "k <= n"), ((4, 5, 2), "c <= n"), ((4, -1, 2), "c <= n"),
                                        ((4, 1, 0), "k <= n"), ((4.0, 1, 2), "int")])
def test_pass_at_k_rejects_bad_arguments(args, match):
    with pytest.raises((ValueError, TypeError), match=match):
        pass_at_k(*args)


def test_summarize_by_hand():
    scores = {"a": [[1, 0, 0, 0], [0, 0, 0, 0]], "b": [[1, 1, 1, 1], [0, 1, 0, 0], [0, 0, 0, 0]]}
    s = summarize(scores, ks=[1, 2, 4])
    assert s["a"]["avg@4"] == pytest.approx(100 * 1 / 8)
    assert s["a"]["pass@4"] == pytest.approx(50.0)
    assert s["a"]["pass@2"] == pytest.approx(100 * (0.5 + 0) / 2)  # 1 - C(3,2)/C(4,2) = 0.5
    assert s["b"]["avg@4"] == pytest.approx(100 * 5 / 12)
    assert s["b"]["pass@4"] == pytest.approx(100 * 2 / 3)
    assert s["b"]["pass@1"] == pytest.approx(s["b"]["avg@4"])  # pass@1 is the mean accuracy
    assert s["mean"]["avg@4"] == pytest.approx((s["a"]["avg@4"] + s["b"]["avg@4"]) / 2)
    assert s["mean"]["problems"] == 5
    table = markdown_table(s)
    assert table.splitlines()[0] == "| benchmark | problems | Avg@4 | Pass@4 |"
    assert "| b | 3 | 41.67 | 66.67 |" in table
    assert table.splitlines()[-1].startswith("| mean | 5 |")
    with pytest.raises(ValueError, match="different sample counts"):
        summarize({"a": [[1, 0], [1]]}, ks=[1])


def test_table_has_avg_at_n_and_every_requested_pass_at_k_by_hand():
    """The paper's layout with --pass-k 1,2,4 on n = 4: the figures worked out by hand from 1 - C(n-c,k)/C(n,k)."""
    scores = {"a": [[1, 0, 0, 0], [0, 0, 0, 0]], "b": [[1, 1, 1, 1], [0, 1, 0, 0], [0, 0, 0, 0]]}
    table = markdown_table(summarize(scores, ks=range(1, 5)), ks=[1, 2, 4]).splitlines()
    assert table[0] == "| benchmark | problems | Avg@4 | Pass@1 | Pass@2 | Pass@4 |"
    # a: c = 1, 0 -> Avg 1/8; Pass@2 (1 - 3/6 + 0) / 2; Pass@4 1/2
    assert table[2] == "| a | 2 | 12.50 | 12.50 | 25.00 | 50.00 |"
    # b: c = 4, 1, 0 -> Avg 5/12; Pass@2 (1 + 1/2 + 0) / 3; Pass@4 2/3
    assert table[3] == "| b | 3 | 41.67 | 41.67 | 50.00 | 66.67 |"
    # mean of the two rows (not pooled over problems), as the paper averages benchmarks
    assert table[4] == "| mean | 5 | 27.08 | 27.08 | 37.50 | 58.33 |"


@pytest.mark.parametrize("text,n,expected", [("1,8,16", 16, [1, 8, 16]), ("8, 1,8", 8, [1, 8]), ("4", 4, [4])])
def test_parse_pass_k(text, n, expected):
    assert parse_pass_k(text, n) == expected


@pytest.mark.parametrize("text,n,match", [("1,8,16", 8, r"--pass-k=1,8,16: .*n = 8 .*got k = 16\. Fix: --n 16"),
                                          ("0", 4, "got k = 0"), ("a", 4, "comma-separated"), (",", 4, "at least one")])
def test_parse_pass_k_refuses_k_above_n_naming_the_flags(text, n, match):
    with pytest.raises(ValueError, match=match):
        parse_pass_k(text, n)
