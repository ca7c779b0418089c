"""The preregistered experiment of docs/preregistration.md (issue 25): what it measures and how it tests it.
scripts/prereg.py is its command line (runner, provenance, budget rule, report); this module holds the parts
a test can check one by one.

Sets (section 4): H, 400 multiples problems disjoint from training by (d, a, b), every problem whose
(d, answer set) never appears in training plus a fixed sample of the rest; X, 200 extrapolation problems
(a in 90..129, keys never seen in training).
Measures per trained student (sections 2 and 6):
  Pass@k     64 samples per problem (T = 1, top-p 0.8, torch.manual_seed(1000 + seed), chunks of 512 prompts),
             the unbiased pass@k of `eval.pass_at_k`, k = 1..64, mean over problems, in percent
  D_8        expected number of distinct correct answers among 8 of the 64 samples:
             D_8 = sum over correct answers a of pass_at_k(64, c_a, 8), c_a = samples whose last integer is a
  H_dec      the student's entropy at the deciding token of fixed teacher responses (teacher forcing)
"""

from __future__ import annotations

import hashlib
import json
import random
import re
from dataclasses import dataclass
from typing import Callable, Optional, Sequence

import torch

from ..cpu.embedded import DIVISORS, MULTIPLE, MULTIPLE_STARTS, Problem, compute_score, task_problems
from .eval import pass_at_k
from .loop import _response_logits, generate
from .stats import PairedTest, holm, paired_t

SAMPLES = 64  # samples per held-out problem
TOP_P = 0.8
K_PRIMARY = 4  # H1's k (off the ceiling: section 2's rule)
D_K = 8  # H3's D_k
CHUNK = 512  # prompts per generate call (the sampling stream depends on it; fixed)
TOKEN_SET_SEED, TOKEN_SET_SAMPLES = 3000, 4  # H2's teacher responses per problem
PHRASINGS = (r"The answer is (\d+)\.", r"It is (\d+)\.", r"(\d) x (\d+) = (\d+)\.")  # MULTIPLE_PHRASINGS
H_SIZE, X_SIZE, X_STARTS = 400, 200, range(90, 130)


def answer_key(p: Problem) -> tuple[int, tuple[int, ...]]:
    """(d, answer set): two problems with the same key have the same correct answers."""
    return p.d, tuple(p.answers())


def heldout_sets() -> tuple[list[Problem], list[Problem], list[Problem]]:
    """(H, X, novel): section 4's held-out set H (the novel-key problems first, then 378 sampled with
    random.Random(25)), the extrapolation set X (random.Random(26)) and H's novel-key problems."""
    train, _ = task_problems(MULTIPLE)
    seen = {answer_key(p) for p in train}
    universe = [Problem(MULTIPLE, a, a + w, d) for d in DIVISORS for a in MULTIPLE_STARTS
                for w in range(3 * d + 1, 5 * d + 1)]
    in_train = set(train)
    pool = [p for p in universe if p not in in_train]
    novel = [p for p in pool if answer_key(p) not in seen]
    H = novel + random.Random(25).sample([p for p in pool if answer_key(p) in seen], H_SIZE - len(novel))
    far = [Problem(MULTIPLE, a, a + w, d) for d in DIVISORS for a in X_STARTS for w in range(3 * d + 1, 5 * d + 1)]
    far = [p for p in far if 3 <= len(p.answers()) <= 5 and answer_key(p) not in seen]
    return H, random.Random(26).sample(far, X_SIZE), novel


def problems_sha256(problems: Sequence[Problem]) -> str:
    return hashlib.sha256(json.dumps([[p.d, p.a, p.b] for p in problems]).encode()).hexdigest()


def chat_prompt_ids(tok, p: Problem) -> list[int]:
    """The prompt ids of a problem, built as the val parquet's prompts are (one user turn, chat template)."""
    text = tok.apply_chat_template([{"role": "user", "content": p.question()}], tokenize=False,
                                   add_generation_prompt=True)
    return tok(text, add_special_tokens=False)["input_ids"]


def final_integer(text: str) -> Optional[int]:
    """The response's last integer (`compute_score`'s answer rule), None when it has none."""
    numbers = re.findall(r"-?\d+", text or "")
    return int(numbers[-1]) if numbers else None


# -- sampled measures: Pass@k and distinct answers ------------------------------------------------------------

def expected_distinct(n: int, counts: Sequence[int], k: int) -> float:
    """E[# distinct answers among k of n samples drawn without replacement] = sum_a P(a drawn at least once)
    = sum_a pass_at_k(n, c_a, k), c_a = the samples with answer a (linearity of expectation)."""
    return sum(pass_at_k(n, int(c), k) for c in counts)


def problem_measures(p: Problem, texts: Sequence[str]) -> dict:
    """One problem's sampled measures from its n response texts: c (correct samples), the per-answer counts,
    pass@k for k = 1..n, D_8, and the raw distinct correct answers among all n."""
    n = len(texts)
    correct = [compute_score(MULTIPLE, t, p.ground_truth()) == 1.0 for t in texts]
    finals = [final_integer(t) for t in texts]
    counts = {a: sum(1 for ok, f in zip(correct, finals) if ok and f == a) for a in p.answers()}
    c = sum(correct)
    if c != sum(counts.values()):
        raise AssertionError(f"{p}: {c} correct samples but {sum(counts.values())} with a correct final integer")
    return {"c": c, "counts": [counts[a] for a in p.answers()],
            "pass": [pass_at_k(n, c, k) for k in range(1, n + 1)],
            "d8": expected_distinct(n, list(counts.values()), D_K),
            "distinct": sum(1 for v in counts.values() if v), "answers": len(p.answers())}


def set_measures(per_problem: Sequence[dict]) -> dict:
    """Means over a set's problems (percent for Pass@k), and the histogram of raw distinct correct answers."""
    m = len(per_problem)
    n = len(per_problem[0]["pass"])
    solved = [r for r in per_problem if r["c"]]
    hist = [0] * 6
    for r in per_problem:
        hist[r["distinct"]] += 1
    return {"pass": [100 * sum(r["pass"][k] for r in per_problem) / m for k in range(n)],
            "avg": 100 * sum(r["c"] for r in per_problem) / (n * m),
            "d8": sum(r["d8"] for r in per_problem) / m,
            "distinct": sum(r["distinct"] for r in per_problem) / m,
            "coverage": sum(r["distinct"] / r["answers"] for r in per_problem) / m,
            "distinct_solved": sum(r["distinct"] for r in solved) / len(solved) if solved else float("nan"),
            "distinct_hist": hist, "problems": m}


def sample_responses(model, prompts: Sequence[list[int]], *, n: int, seed: int, eos_id: int, pad_id: int,
                     top_p: float = TOP_P) -> list[list[list[int]]]:
    """n sampled responses (ids) per prompt: T = 1, top-p, 16 new tokens, torch.manual_seed(seed), the prompts
    repeated n times in order and generated CHUNK at a time (the stream depends on the chunking, fixed)."""
    torch.manual_seed(seed)
    reps = [q for q in prompts for _ in range(n)]
    out = generate(model, reps, max_new_tokens=16, eos_id=eos_id, pad_id=pad_id, top_p=top_p, chunk=CHUNK)
    return [out[i * n:(i + 1) * n] for i in range(len(prompts))]


# -- H2: the deciding token -----------------------------------------------------------------------------------

def deciding_position(pieces: Sequence[str]) -> Optional[int]:
    """j*, the index of the deciding token in a response given as its decoded tokens, or None when the
    response is not exactly one of the three phrasings. A number is a maximal run of single-digit tokens;
    "The answer is n." / "It is n.": the first digit of n (the first run); "d x q = n.": the first digit of q
    (the second run; the first, d, picks the phrasing)."""
    text = "".join(pieces)
    which = next((i for i, pat in enumerate(PHRASINGS) if re.fullmatch(pat, text)), None)
    if which is None:
        return None
    digit = [len(s) == 1 and s.isdigit() for s in pieces]
    if any(any(ch.isdigit() for ch in s) and not d for s, d in zip(pieces, digit)):
        return None  # a token that holds a digit and more: not the task's one-digit-per-token tokenization
    starts = [j for j, d in enumerate(digit) if d and not (j and digit[j - 1])]
    j = starts[1] if which == 2 else starts[0]
    number = re.fullmatch(PHRASINGS[which], text).group(2 if which == 2 else 1)
    if pieces[j] != number[0]:  # the measurement's check: the token at j* is the deciding number's first digit
        raise AssertionError(f"deciding token {pieces[j]!r} at {j} is not the first digit of {number} in {text!r}")
    return j


def digit_run(pieces: Sequence[str], j: int) -> list[int]:
    """The positions of the digit run that starts at j (the deciding number's digits)."""
    out = [j]
    while out[-1] + 1 < len(pieces) and pieces[out[-1] + 1].isdigit() and len(pieces[out[-1] + 1]) == 1:
        out.append(out[-1] + 1)
    return out


@dataclass
class TokenSet:
    """H2's fixed teacher responses: problem index in H, response ids (no end token), j*."""
    problem: list[int]
    response: list[list[int]]
    j: list[int]
    drawn: int  # teacher responses drawn (problems x TOKEN_SET_SAMPLES)

    def sha256(self) -> str:
        return hashlib.sha256(json.dumps([self.problem, self.response, self.j]).encode()).hexdigest()


@torch.no_grad()
def teacher_token_set(teacher, tok, H: Sequence[Problem], prompts: Sequence[list[int]], *, teacher_eos: int,
                      pad_id: int, seed: int = TOKEN_SET_SEED) -> TokenSet:
    """The teacher samples TOKEN_SET_SAMPLES responses per problem of H (T = 1, top-p 1.0, torch.manual_seed(seed),
    16 new tokens); kept: the correct ones that are exactly one of the phrasings, with their deciding position."""
    torch.manual_seed(seed)
    reps = [q for q in prompts for _ in range(TOKEN_SET_SAMPLES)]
    out = generate(teacher, reps, max_new_tokens=16, eos_id=teacher_eos, pad_id=pad_id, top_p=1.0, chunk=CHUNK)
    keep = TokenSet([], [], [], len(reps))
    for i, r in enumerate(out):
        p = H[i // TOKEN_SET_SAMPLES]
        ids = r[:-1] if r and r[-1] == teacher_eos else r
        pieces = [tok.decode([t]) for t in ids]
        if compute_score(MULTIPLE, "".join(pieces), p.ground_truth()) != 1.0:
            continue
        j = deciding_position(pieces)
        if j is not None:
            keep.problem.append(i // TOKEN_SET_SAMPLES)
            keep.response.append(list(ids))
            keep.j.append(j)
    return keep


def token_entropy(logits: torch.Tensor) -> torch.Tensor:
    """H = -sum_v p_v log p_v (nats) of softmax(logits) over the last dim, from a float32 log-softmax. [..., V] -> [...]"""
    logp = torch.log_softmax(logits.float(), -1)
    return -(logp.exp() * logp).sum(-1)


@torch.no_grad()
def forced_entropies(model, prompts: Sequence[list[int]], responses: Sequence[list[int]], pad_id: int,
                     chunk: int = CHUNK) -> list[list[float]]:
    """The model's next-token entropy at every response position under teacher forcing: row j is the entropy
    of its distribution given prompt + response[:j]. One list per response."""
    out: list[list[float]] = []
    for s in range(0, len(responses), chunk):
        logits, _, mask = _response_logits(model, list(prompts[s:s + chunk]), list(responses[s:s + chunk]), pad_id)
        ent = token_entropy(logits)
        out += [ent[b, :int(mask[b].sum())].tolist() for b in range(ent.shape[0])]
    return out


def deciding_entropies(model, tok, prompts_of: Callable[[int], list[int]], ts: TokenSet, pad_id: int,
                       novel: int = 0) -> dict:
    """H2 (the mean entropy at j* over the token set) and E3's: the mean over all digits of the deciding number
    and the phrasing-token entropy (response position 0), all on the same teacher-forced pass; with `novel`, E2's
    mean at j* over the token set's problems with index < novel (H's novel-key problems come first)."""
    ents = forced_entropies(model, [prompts_of(i) for i in ts.problem], ts.response, pad_id)
    dec, digits, first = [], [], []
    for e, r, j in zip(ents, ts.response, ts.j):
        run = digit_run([tok.decode([t]) for t in r], j)
        dec.append(e[j])
        digits.append(sum(e[q] for q in run) / len(run))
        first.append(e[0])
    mean = lambda v: sum(v) / len(v) if v else float("nan")
    out = {"deciding_entropy": mean(dec), "deciding_digits_entropy": mean(digits), "phrasing_entropy": mean(first)}
    if novel:
        out["deciding_entropy_novel"] = mean([v for v, i in zip(dec, ts.problem) if i < novel])
    return out


def own_deciding_entropy(model, tok, prompts: Sequence[list[int]], samples: Sequence[Sequence[list[int]]],
                         pad_id: int, eos_id: int) -> tuple[float, int]:
    """E3: the mean entropy at j* over the model's own samples that are exactly one of the phrasings (correct or
    not), and how many there were."""
    rows, resp, js = [], [], []
    for i, per in enumerate(samples):
        for r in per:
            ids = r[:-1] if r and r[-1] == eos_id else r
            j = deciding_position([tok.decode([t]) for t in ids])
            if j is not None:
                rows.append(i)
                resp.append(list(ids))
                js.append(j)
    if not resp:
        return float("nan"), 0
    ents = forced_entropies(model, [prompts[i] for i in rows], resp, pad_id)
    return sum(e[j] for e, j in zip(ents, js)) / len(js), len(js)


# -- statistics --------------------------------------------------------------------------------------------------

def one_sided_p(test: PairedTest) -> float:
    """P(T_df >= t) for the paired test's t (H_1: mean difference > 0), from its two-sided p."""
    return test.p / 2 if test.t >= 0 else 1 - test.p / 2


def family(rows: list[dict]) -> list[dict]:
    """Holm over the rows' p (one-sided or two-sided as each row says); adds p_holm and passed (p_holm < 0.05)."""
    for row, ph in zip(rows, holm([r["p"] for r in rows])):
        row["p_holm"], row["passed"] = ph, ph < 0.05
    return rows


def contrast(name: str, x: Sequence[float], y: Sequence[float], sided: str) -> dict:
    """A seed-paired contrast x - y: paired t (df = n - 1), its 95% interval, and p one-sided (> 0) or two-sided."""
    test = paired_t(list(x), list(y))
    p = one_sided_p(test) if sided == "one" else test.p
    return {"name": name, "n": test.n, "df": test.df, "mean_diff": test.mean_diff, "ci95": list(test.ci95),
            "t": test.t, "p": p, "sided": sided}


def budget_n3(t_m: float, t_s: float, t0: float, cap: int = 26, floor: int = 10, budget_s: float = 7200.0,
              tier1: int = 78, tier2: int = 36) -> int:
    """Section 7's outcome-blind rule: n3 = min(cap, floor((budget - T0 - 78 t_m - 36 t_s) / (3 t_m))), and 0
    (tier 3 not run) when that is below `floor`."""
    n3 = min(cap, int((budget_s - t0 - tier1 * t_m - tier2 * t_s) // (3 * t_m)))
    return n3 if n3 >= floor else 0

