"""Math evaluation: k samples per problem, Avg@k and unbiased Pass@k per benchmark, resumable.

The paper's protocol (Qwen2.5-Math pipeline): 8 samples per problem, temperature 1.0, top-p 0.8, up to
8192 new tokens, zero-shot; Avg@8 = mean accuracy over all samples, Pass@8 = share of problems with a
correct sample. `pass_at_k` is the unbiased estimator of Chen et al. (2021) for n >= k samples of which c
are correct:  pass@k = 1 - C(n - c, k) / C(n, k)  (with n = k it is 1[c > 0]).

`run_eval` generates with vLLM when it is importable (or `backend="vllm"`), else with Hugging Face
`generate` (`backend="hf"`, works on CPU); `build_generator` puts one engine on each GPU of the node when the
weights fit one GPU (data parallel: `DataParallelGenerator`, one spawned process per engine with its own
CUDA_VISIBLE_DEVICES), else tensor-parallel groups. It scores every sample with `verl_eopd.math.reward.compute_score`, and
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


def parse_pass_k(text: str, n: int, flag: str = "--pass-k") -> list[int]:
    """"1,8,16" -> [1, 8, 16] (sorted, unique); each k must be 1 <= k <= n (n samples per problem)."""
    try:
        ks = sorted({int(x) for x in str(text).replace(" ", "").split(",") if x})
    except ValueError:
        raise ValueError(f"{flag}={text!r}: expected comma-separated integers, e.g. {flag} 1,8,16") from None
    if not ks:
        raise ValueError(f"{flag}={text!r}: give at least one k, e.g. {flag} 1,{n}")
    bad = [k for k in ks if not 1 <= k <= n]
    if bad:
        raise ValueError(f"{flag}={text}: Pass@k needs 1 <= k <= n = {n} samples per problem, got k = "
                         f"{', '.join(map(str, bad))}. Fix: --n {max(ks)} (draw more samples) or drop those k")
    return ks


def markdown_table(summary: dict[str, dict[str, float]], ks: Optional[Sequence[int]] = None,
                   columns: Optional[Sequence[str]] = None) -> str:
    """The paper's layout: one row per benchmark then `mean`; columns Avg@n and Pass@k for each k in `ks`
    (default: k = n). `columns` picks the metrics explicitly instead."""
    benches = [b for b in summary if b != "mean"] + (["mean"] if "mean" in summary else [])
    if columns is None:
        first = summary[benches[0]]
        n = next(int(k.split("@")[1]) for k in first if k.startswith("avg@"))
        columns = [f"avg@{n}"] + [f"pass@{k}" for k in (ks or [n])]
    header = "| benchmark | problems | " + " | ".join(c.replace("avg", "Avg").replace("pass", "Pass") for c in columns) + " |"
    lines = [header, "|" + "---|" * (len(columns) + 2)]
    for b in benches:
        cells = [f"{summary[b][c]:.2f}" if c in summary[b] else "-" for c in columns]
        lines.append(f"| {b} | {int(summary[b]['problems'])} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------ the model


def has_weights(folder: Path) -> bool:
    """True when `folder` holds weights transformers / vLLM load (*.safetensors or pytorch_model*.bin)."""
    folder = Path(folder)
    return folder.is_dir() and (any(folder.glob("*.safetensors")) or any(folder.glob("pytorch_model*.bin")))


def merge_command(actor_dir: Path, target: Path) -> str:
    """verl 0.9.1's FSDP checkpoint -> Hugging Face folder command (verl/model_merger), ready to paste."""
    import shlex

    return (f"python -m verl.model_merger merge --backend fsdp --local_dir {shlex.quote(str(actor_dir))} "
            f"--target_dir {shlex.quote(str(target))}")


def _actor_dir(path: Path) -> Optional[Path]:
    """The verl FSDP actor checkpoint folder `path` points into (the checkpoint root, a global_step_N folder,
    its actor/ folder or actor/huggingface/), None when `path` is none of those."""
    tracker = path / "latest_checkpointed_iteration.txt"
    if tracker.is_file() and tracker.read_text().strip().isdigit():
        path = path / f"global_step_{tracker.read_text().strip()}"
    for candidate in (path / "actor", path, path.parent):
        if (candidate / "fsdp_config.json").is_file() or any(candidate.glob("model_world_size_*_rank_0.pt")):
            return candidate
    return None


def check_model(model: str, flag: str = "--model") -> None:
    """Refuse, before any engine starts, a model folder with no weights (verl's checkpoint folders hold FSDP
    shards: its huggingface/ subfolder has the config and tokenizer only), naming the merge command."""
    path = Path(os.path.expanduser(model))
    if not path.exists():
        if model.startswith((".", "/", "~")) or model.count("/") != 1:
            raise FileNotFoundError(f"{flag} {model}: no such folder (a Hugging Face id looks like org/name)")
        return  # a hub id
    if has_weights(path):
        return
    actor = _actor_dir(path)
    if actor is None:
        raise FileNotFoundError(f"{flag} {model}: no model weights (*.safetensors or pytorch_model*.bin) in this "
                                "folder. Fix: pass a Hugging Face model folder")
    step_dir = actor.parent
    target = step_dir.parent / "hf" / step_dir.name if step_dir.name.startswith("global_step_") else actor / "merged"
    raise FileNotFoundError(
        f"{flag} {model}: a verl FSDP checkpoint, not a Hugging Face model (no weights here: {actor} holds "
        f"per-rank shards, its huggingface/ folder only the config and tokenizer). Fix: merge it first,\n  "
        f"{merge_command(actor, target)}\nthen pass {flag} {target}")


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
            raise ValueError(f"--n={self.k}: need at least one sample per problem")
        if self.temperature < 0:
            raise ValueError(f"--temperature={self.temperature}: must be >= 0")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"--top-p={self.top_p}: must be in (0, 1]")
        if self.max_tokens < 1:
            raise ValueError(f"--max-tokens={self.max_tokens}: must be >= 1")
        if self.k > 1 and self.temperature == 0:
            raise ValueError(f"--n={self.k} with --temperature=0: greedy samples are identical. Fix: --n=1 or T > 0")


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
    """vLLM offline engine: k samples per prompt in one `generate` call (n = k); prompt i is seeded seed + i,
    so a prompt draws the same samples whichever engine (data-parallel shard) it lands on."""
    from vllm import LLM, SamplingParams

    llm = LLM(model=model_path, tensor_parallel_size=tensor_parallel_size, **llm_kwargs)
    tok = llm.get_tokenizer()

    def generate(prompts: list[list[dict]], s: EvalSettings, seed: int) -> list[list[str]]:
        texts = _chat_texts(tok, prompts, s)
        params = [SamplingParams(n=s.k, temperature=s.temperature, top_p=s.top_p, max_tokens=s.max_tokens,
                                 seed=seed + i) for i in range(len(texts))]
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


def shard_bounds(total: int, parts: int) -> list[tuple[int, int]]:
    """`parts` contiguous [start, end) ranges covering range(total), sizes differing by at most one."""
    base, extra = divmod(total, parts)
    bounds, start = [], 0
    for j in range(parts):
        end = start + base + (1 if j < extra else 0)
        bounds.append((start, end))
        start = end
    return bounds


def _serve(conn, factory: Callable[[], Generator], devices: Optional[str]) -> None:
    """One data-parallel engine process: sees only `devices` (CUDA_VISIBLE_DEVICES, set before anything
    touches CUDA), builds its generator, then answers (prompts, settings, seed) requests until None."""
    import traceback

    if devices is not None:
        os.environ["CUDA_VISIBLE_DEVICES"] = devices
    try:
        generate = factory()
        conn.send(("ready", None))
        while True:
            request = conn.recv()
            if request is None:
                break
            conn.send(("ok", generate(*request)))
    except Exception:  # reported to the parent, which raises it
        conn.send(("error", traceback.format_exc()))
    finally:
        conn.close()


class DataParallelGenerator:
    """Several engines, one process each (spawned, each with its own CUDA_VISIBLE_DEVICES group), behind the
    `Generator` interface: a call cuts the prompts into contiguous shards, one per engine, runs them at once
    and returns the responses in prompt order. Shard j gets seed + its first prompt's offset, so with
    per-prompt seeds (the vLLM generator) a prompt draws the same samples on any number of engines.

    factory: a picklable zero-argument callable returning a Generator (e.g. functools.partial(make_generator,
    model, "vllm", tensor_parallel_size=tp)); device_groups: one CUDA_VISIBLE_DEVICES string per engine
    ("0", "1", ... or "0,1" for tensor parallel 2; None leaves the variable alone, e.g. CPU engines).
    """

    def __init__(self, factory: Callable[[], Generator], device_groups: Sequence[Optional[str]]):
        import multiprocessing as mp

        ctx = mp.get_context("spawn")  # a fresh interpreter: no CUDA state inherited from this process
        self.workers = []
        for devices in device_groups:
            parent, child = ctx.Pipe()
            # not daemonic: vLLM starts processes of its own (engine core, tensor-parallel workers)
            proc = ctx.Process(target=_serve, args=(child, factory, devices), daemon=False)
            proc.start()
            child.close()
            self.workers.append((proc, parent, devices))
        try:
            for worker in self.workers:
                self._receive(worker)  # "ready": every engine loaded before the first request
        except Exception:
            self.close()
            raise

    @staticmethod
    def _receive(worker) -> Any:
        proc, conn, devices = worker
        while not conn.poll(1.0):
            if not proc.is_alive():
                raise RuntimeError(f"evaluation engine on devices {devices!r} exited with code {proc.exitcode} "
                                   "(out of memory? its output is above)")
        try:
            status, payload = conn.recv()
        except EOFError:
            proc.join()
            raise RuntimeError(f"evaluation engine on devices {devices!r} exited with code {proc.exitcode}") from None
        if status == "error":
            raise RuntimeError(f"evaluation engine on devices {devices!r} failed:\n{payload}")
        return payload

    @property
    def engines(self) -> int:
        return len(self.workers)

    def __call__(self, prompts: list[list[dict]], s: EvalSettings, seed: int) -> list[list[str]]:
        bounds = shard_bounds(len(prompts), len(self.workers))
        busy = []
        for (start, end), worker in zip(bounds, self.workers):
            if end > start:
                worker[1].send((prompts[start:end], s, seed + start))
                busy.append(worker)
        out: list[list[str]] = []
        for worker in busy:
            out.extend(self._receive(worker))
        if len(out) != len(prompts):
            raise RuntimeError(f"data-parallel engines returned {len(out)} responses for {len(prompts)} prompts")
        return out

    def close(self) -> None:
        for proc, conn, _ in self.workers:
            try:
                conn.send(None)
            except (BrokenPipeError, OSError):
                pass
        for proc, conn, _ in self.workers:
            proc.join(timeout=60)
            if proc.is_alive():
                proc.terminate()
                proc.join()
            conn.close()
        self.workers = []


WEIGHT_SHARE = 0.5  # the weights may take this share of one GPU's memory; the rest is KV cache for k long samples


def model_bytes(model: str) -> int:
    """Bytes of a local model folder's weight files (0 for a hub id: unknown)."""
    path = Path(os.path.expanduser(model))
    if not path.is_dir():
        return 0
    return sum(f.stat().st_size for pattern in ("*.safetensors", "pytorch_model*.bin") for f in path.glob(pattern))


def plan_devices(visible: Sequence[str], weights: int, gpu_memory: int, tensor_parallel: Optional[int] = None,
                 data_parallel: Optional[int] = None) -> tuple[int, int]:
    """(engines, tensor_parallel) for the visible GPUs: data-parallel (one engine per GPU) when the weights fit
    one GPU (weights <= WEIGHT_SHARE x its memory), else the smallest power-of-two tensor parallel size that
    fits, with GPUs // tp engines. An explicit tensor_parallel / data_parallel wins; they must fit the GPUs."""
    n = len(visible)
    if n == 0:
        return (data_parallel or 1), 1
    if tensor_parallel is None:
        tensor_parallel = 1
        while gpu_memory and weights / tensor_parallel > WEIGHT_SHARE * gpu_memory and tensor_parallel * 2 <= n:
            tensor_parallel *= 2
    if tensor_parallel < 1 or tensor_parallel > n:
        raise ValueError(f"--tensor-parallel-size={tensor_parallel}: {n} GPUs are visible (CUDA_VISIBLE_DEVICES)")
    engines = data_parallel or n // tensor_parallel
    if engines < 1 or engines * tensor_parallel > n:
        raise ValueError(f"--data-parallel-size={engines} x --tensor-parallel-size={tensor_parallel} needs "
                         f"{engines * tensor_parallel} GPUs, {n} are visible. Fix: lower one of them")
    return engines, tensor_parallel


def visible_gpus() -> list[str]:
    """The GPU ids this process may use (CUDA_VISIBLE_DEVICES, else every GPU torch sees)."""
    env = os.environ.get("CUDA_VISIBLE_DEVICES")
    if env is not None:
        return [d for d in env.split(",") if d.strip() and d.strip() != "-1"]
    import torch

    return [str(i) for i in range(torch.cuda.device_count())] if torch.cuda.is_available() else []


def build_generator(model: str, backend: str = "auto", *, tensor_parallel_size: Optional[int] = None,
                    data_parallel_size: Optional[int] = None, batch_size: int = 64,
                    log: Callable[[str], None] = lambda m: print(m, file=sys.stderr, flush=True)) -> Generator:
    """The evaluation's engines on this node: plan_devices over the visible GPUs, then one engine in this
    process, or a DataParallelGenerator of engines (each on its own GPU group; CPU: HF engines, no group)."""
    from functools import partial

    gpus = visible_gpus()
    memory = 0
    if gpus:
        import torch

        memory = torch.cuda.get_device_properties(0).total_memory
    weights = model_bytes(model)
    engines, tp = plan_devices(gpus, weights, memory, tensor_parallel_size, data_parallel_size)
    why = (f"weights {weights / 2**30:.1f} GiB, one GPU {memory / 2**30:.0f} GiB" if gpus and weights
           else "CPU" if not gpus else "model size unknown")
    log(f"[eval] {engines} engine{'s' if engines > 1 else ''} x tensor-parallel {tp} on "
        f"{len(gpus) or 'no'} GPU{'s' if len(gpus) != 1 else ''} ({why})")
    factory = partial(make_generator, model, backend, tensor_parallel_size=tp, batch_size=batch_size)
    if engines == 1:
        return factory()
    groups = [",".join(gpus[j * tp:(j + 1) * tp]) for j in range(engines)] if gpus else [None] * engines
    return DataParallelGenerator(factory, groups)


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
    """Evaluate every benchmark (name -> prepared parquet); returns and writes the summary (Avg@n and
    Pass@1..n per benchmark and `mean`); `ks`: the Pass@k columns of results.md (default k = n).

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
    table_ks = list(ks) if ks else [settings.k]  # the columns of results.md (summary.json has every Pass@1..n)
    if any(not 1 <= k <= settings.k for k in table_ks):
        raise ValueError(f"--pass-k={','.join(map(str, table_ks))}: every k must be in 1..n = {settings.k} samples. "
                         f"Fix: --n {max(table_ks)} or smaller k")
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
    summary = summarize(scores, range(1, settings.k + 1))
    (out / "summary.json").write_text(json.dumps(summary, indent=1))
    (out / "results.md").write_text(markdown_table(summary, table_ks) + "\n")
    return summary


def hash_name(name: str) -> int:
    """A stable (not per-process salted) hash of a benchmark name, for seeds."""
    return sum((i + 1) * ord(ch) for i, ch in enumerate(name))
