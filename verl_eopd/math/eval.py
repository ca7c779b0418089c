"""Math evaluation: k samples per problem, Avg@k and unbiased Pass@k per benchmark, resumable.

The paper's protocol (Qwen2.5-Math pipeline): 8 samples per problem, temperature 1.0, top-p 0.8, up to
8192 new tokens, zero-shot; Avg@8 = mean accuracy over all samples, Pass@8 = share of problems with a
correct sample. `pass_at_k` is the unbiased estimator of Chen et al. (2021) for n >= k samples of which c
are correct:  pass@k = 1 - C(n - c, k) / C(n, k)  (with n = k it is 1[c > 0]).

`run_eval` generates with vLLM when it is importable (or `backend="vllm"`), else with Hugging Face
`generate` (`backend="hf"`, works on CPU), scores every sample with `verl_eopd.math.reward.compute_score`, and
appends one JSON line per problem to `<out>/samples.jsonl` as it goes, so an interrupted evaluation resumes
where it stopped (the settings are stored in `<out>/settings.json`; resuming with different ones is an
error). `scripts/evaluate.py` is its command line.
"""

from __future__ import annotations

import json
import os
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

# the paper's six benchmarks, in its table order (names as written by scripts/prepare_data.py)
PAPER_BENCHMARKS = ("math500", "amc23", "minerva", "olympiadbench", "aime24", "aime25")


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k from n samples with c correct: 1 - C(n-c, k) / C(n, k), as a stable product."""
    for name, value in (("n", n), ("c", c), ("k", k)):
        if isinstance(value, bool) or not isinstance(value, int):
            raise TypeError(f"pass_at_k: {name} must be an int, got {value!r}")
    if not 1 <= k <= n:
        raise ValueError(f"pass_at_k: need 1 <= k <= n, got n={n}, k={k}. Fix: draw at least k samples per problem")
    if not 0 <= c <= n:
        raise ValueError(f"pass_at_k: need 0 <= c <= n, got n={n}, c={c}")
    if n - c < k:
        return 1.0
    # C(n-c, k) / C(n, k) = prod_{i = n-c+1}^{n} (1 - k / i)
    prob_all_wrong = 1.0
    for i in range(n - c + 1, n + 1):
        prob_all_wrong *= 1.0 - k / i
    return 1.0 - prob_all_wrong


def summarize(scores: dict[str, list[list[float]]], ks: Sequence[int]) -> dict[str, dict[str, float]]:
    """Per benchmark (and `mean` over benchmarks): `avg@n` (n = samples per problem), `pass@k` for each k, `n`.

    `scores[bench][i]` are the 0/1 scores of problem i's samples (all problems must have the same count).
    Figures are percentages, as in the paper's tables.
    """
    out: dict[str, dict[str, float]] = {}
    for bench, rows in scores.items():
        if not rows:
            continue
        n = len(rows[0])
        if any(len(r) != n for r in rows):
            raise ValueError(f"summarize: benchmark {bench!r} has problems with different sample counts")
        correct = [sum(1 for s in r if s > 0.5) for r in rows]
        stats = {f"avg@{n}": 100.0 * sum(correct) / (n * len(rows)), "problems": float(len(rows))}
        for k in ks:
            if k <= n:
                stats[f"pass@{k}"] = 100.0 * sum(pass_at_k(n, c, k) for c in correct) / len(rows)
        out[bench] = stats
    if out:
        keys = set.intersection(*(set(v) for v in out.values())) - {"problems"}
        out["mean"] = {key: sum(v[key] for v in out.values()) / len(out) for key in sorted(keys)}
        out["mean"]["problems"] = float(sum(v["problems"] for b, v in out.items() if b != "mean"))
    return out


def markdown_table(summary: dict[str, dict[str, float]], columns: Optional[Sequence[str]] = None) -> str:
    """The paper's layout: one row per benchmark, `Avg@n / Pass@n` cells; `columns` picks the metrics."""
    benches = [b for b in summary if b != "mean"] + (["mean"] if "mean" in summary else [])
    if columns is None:
        first = summary[benches[0]]
        n = next(int(k.split("@")[1]) for k in first if k.startswith("avg@"))
        columns = [f"avg@{n}", f"pass@{n}"]
    header = "| benchmark | problems | " + " | ".join(c.replace("avg", "Avg").replace("pass", "Pass") for c in columns) + " |"
    lines = [header, "|" + "---|" * (len(columns) + 2)]
    for b in benches:
        cells = [f"{summary[b][c]:.2f}" if c in summary[b] else "-" for c in columns]
        lines.append(f"| {b} | {int(summary[b]['problems'])} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------ generation


@dataclass
class EvalSettings:
    """Everything that changes the samples; stored beside them and compared on resume."""

    model: str
    k: int = 8
    temperature: float = 1.0
    top_p: float = 0.8
    max_tokens: int = 8192
    seed: int = 0
    box_required: bool = False
    chat_template_kwargs: dict = field(default_factory=dict)

    def check(self) -> None:
        if self.k < 1:
            raise ValueError(f"--k={self.k}: need at least one sample per problem")
        if self.temperature < 0:
            raise ValueError(f"--temperature={self.temperature}: must be >= 0")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"--top-p={self.top_p}: must be in (0, 1]")
        if self.max_tokens < 1:
            raise ValueError(f"--max-tokens={self.max_tokens}: must be >= 1")
        if self.k > 1 and self.temperature == 0:
            raise ValueError(f"--k={self.k} with --temperature=0: greedy samples are identical. Fix: --k=1 or T > 0")


Generator = Callable[[list[list[dict]], EvalSettings, int], list[list[str]]]


def _chat_texts(tok, prompts: list[list[dict]], s: EvalSettings) -> list[str]:
    """Chat prompts rendered with the model's template and a generation prompt (both backends)."""
    return [tok.apply_chat_template(p, add_generation_prompt=True, tokenize=False, **s.chat_template_kwargs)
            for p in prompts]


def hf_generator(model_path: str, batch_size: int = 16, device: Optional[str] = None) -> Generator:
    """Hugging Face `generate` (CPU or one GPU): k sampled responses per chat prompt, left-padded batches."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    tok = AutoTokenizer.from_pretrained(model_path)
    tok.padding_side = "left"
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=dtype).to(device).eval()

    def generate(prompts: list[list[dict]], s: EvalSettings, seed: int) -> list[list[str]]:
        texts = _chat_texts(tok, prompts, s)
        out: list[list[str]] = []
        per_batch = max(1, batch_size // s.k)
        for start in range(0, len(texts), per_batch):
            torch.manual_seed(seed + start)
            enc = tok(texts[start:start + per_batch], return_tensors="pt", padding=True, add_special_tokens=False)
            enc = {k: v.to(device) for k, v in enc.items()}
            sample = s.temperature > 0
            with torch.no_grad():
                ids = model.generate(
                    **enc, do_sample=sample, temperature=s.temperature if sample else None,
                    top_p=s.top_p if sample else None, top_k=0 if sample else None, max_new_tokens=s.max_tokens,
                    num_return_sequences=s.k, pad_token_id=tok.pad_token_id,
                )
            responses = tok.batch_decode(ids[:, enc["input_ids"].shape[1]:], skip_special_tokens=True)
            out.extend(responses[i * s.k:(i + 1) * s.k] for i in range(len(responses) // s.k))
        return out

    return generate


def vllm_generator(model_path: str, tensor_parallel_size: int = 1, **llm_kwargs: Any) -> Generator:
    """vLLM offline engine: k samples per prompt in one `generate` call (n = k)."""
    from vllm import LLM, SamplingParams

    llm = LLM(model=model_path, tensor_parallel_size=tensor_parallel_size, **llm_kwargs)
    tok = llm.get_tokenizer()

    def generate(prompts: list[list[dict]], s: EvalSettings, seed: int) -> list[list[str]]:
        texts = _chat_texts(tok, prompts, s)
        params = SamplingParams(n=s.k, temperature=s.temperature, top_p=s.top_p, max_tokens=s.max_tokens, seed=seed)
        results = llm.generate(texts, params)
        return [[o.text for o in r.outputs] for r in results]

    return generate


def make_generator(model_path: str, backend: str = "auto", **kwargs: Any) -> Generator:
    """`auto`: vLLM when importable, else Hugging Face."""
    if backend not in ("auto", "vllm", "hf"):
        raise ValueError(f"--backend={backend!r}: choose auto, vllm or hf")
    if backend == "auto":
        try:
            import vllm  # noqa: F401

            backend = "vllm"
        except ImportError:
            backend = "hf"
    if backend == "vllm":
        return vllm_generator(model_path, **{k: v for k, v in kwargs.items() if k == "tensor_parallel_size"})
    return hf_generator(model_path, **{k: v for k, v in kwargs.items() if k in ("batch_size", "device")})


# ------------------------------------------------------------------------------------------- the loop


def load_benchmark(path: str) -> list[dict]:
    """Rows of a prepared parquet (scripts/prepare_data.py format): prompt messages + ground truth."""
    import pandas as pd

    df = pd.read_parquet(path)
    for col in ("prompt", "reward_model"):
        if col not in df.columns:
            raise ValueError(f"{path}: no `{col}` column; expected scripts/prepare_data.py output (verl RL parquet)")
    rows = []
    for i, r in enumerate(df.to_dict("records")):
        prompt = [dict(m) for m in r["prompt"]]
        rows.append({"index": i, "prompt": prompt, "ground_truth": r["reward_model"]["ground_truth"],
                     "data_source": r.get("data_source", "")})
    return rows


def check_resume(out_dir: str, settings: EvalSettings) -> None:
    """Create `out_dir` with settings.json, or check that the stored settings equal `settings` (resume)."""
    out = Path(out_dir)
    path = out / "settings.json"
    mine = asdict(settings)
    if path.exists():
        stored = json.loads(path.read_text())
        diff = {k: (stored.get(k), v) for k, v in mine.items() if stored.get(k) != v}
        if diff:
            keys = ", ".join(f"{k}: stored {a!r} vs now {b!r}" for k, (a, b) in diff.items())
            raise ValueError(f"{out} holds samples drawn with other settings ({keys}). "
                             "Fix: pass the same settings to resume, or a new --output-dir")
    else:
        out.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(mine, indent=1))


def _read_done(samples: Path) -> dict[tuple[str, int], list[float]]:
    done = {}
    if samples.exists():
        with samples.open() as f:
            for line in f:
                try:
                    rec = json.loads(line)
                except json.JSONDecodeError:
                    continue  # a line cut by an interruption: that problem is redone
                done[(rec["benchmark"], rec["index"])] = rec["scores"]
    return done


def run_eval(benchmarks: dict[str, str], out_dir: str, settings: EvalSettings, generator: Generator, *,
             chunk: int = 64, max_problems: Optional[int] = None, ks: Optional[Sequence[int]] = None,
             score_fn: Optional[Callable[..., float]] = None,
             log: Callable[[str], None] = lambda m: print(m, file=sys.stderr, flush=True)) -> dict:
    """Evaluate every benchmark (name -> prepared parquet); returns and writes the summary.

    Writes `<out_dir>/samples.jsonl` (one line per problem: responses, extracted answers, scores),
    `summary.json`, `results.md`. Problems already in samples.jsonl are not generated again. `score_fn`
    (verl's custom-reward signature) defaults to verl_eopd.math.reward.compute_score with `box_required`.
    """
    from .reward import compute_score, extract_answer

    if score_fn is None:
        def score_fn(data_source, solution_str, ground_truth, extra_info=None):
            return compute_score(data_source, solution_str, ground_truth, extra_info,
                                 box_required=settings.box_required)

    settings.check()
    out = Path(out_dir)
    check_resume(out_dir, settings)
    samples = out / "samples.jsonl"
    done = _read_done(samples)
    ks = list(ks or range(1, settings.k + 1))
    data = {name: load_benchmark(path)[:max_problems] for name, path in benchmarks.items()}
    todo = sum(1 for name, rows in data.items() for r in rows if (name, r["index"]) not in done)
    log(f"[eval] {sum(len(r) for r in data.values())} problems in {len(data)} benchmarks, "
        f"{len(done)} already done, {todo} to go, k={settings.k}")
    t0, finished = time.time(), 0
    with samples.open("a") as f:
        for name, rows in data.items():
            pending = [r for r in rows if (name, r["index"]) not in done]
            for start in range(0, len(pending), chunk):
                part = pending[start:start + chunk]
                seed = settings.seed + 1_000_003 * (hash_name(name) % 1000) + part[0]["index"]
                responses = generator([r["prompt"] for r in part], settings, seed)
                for r, resp in zip(part, responses):
                    scores = [float(score_fn(r["data_source"], x, r["ground_truth"])) for x in resp]
                    rec = {"benchmark": name, "index": r["index"], "ground_truth": str(r["ground_truth"]),
                           "answers": [extract_answer(x, settings.box_required) for x in resp],
                           "scores": scores, "responses": resp}
                    f.write(json.dumps(rec) + "\n")
                    done[(name, r["index"])] = scores
                f.flush()
                os.fsync(f.fileno())
                finished += len(part)
                rate = finished / max(time.time() - t0, 1e-9)
                log(f"[eval] {name}: {start + len(part)}/{len(pending)} new problems; overall {finished}/{todo}, "
                    f"ETA {(todo - finished) / rate:.0f} s")
    scores = {name: [done[(name, r["index"])] for r in rows] for name, rows in data.items()}
    summary = summarize(scores, ks)
    (out / "summary.json").write_text(json.dumps(summary, indent=1))
    (out / "results.md").write_text(markdown_table(summary) + "\n")
    return summary


def hash_name(name: str) -> int:
    """A stable (not per-process salted) hash of a benchmark name, for seeds."""
    return sum((i + 1) * ord(ch) for i, ch in enumerate(name))
