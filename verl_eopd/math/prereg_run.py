"""The runner of docs/preregistration.md (scripts/prereg.py is its command line): references, the timing runs and
budget rule (section 7), the tiers of per-run jobs on one or more worker processes, resumable per-run files
with provenance (section 9), then the tests (sections 2 and 5), the exploratory contrasts (section 6), plots
and a report.

Layout of the output folder:
    references.json   token set (H2), teacher and untrained-student measures, set hashes
    budget.json       t_m, t_s, T0, n3 and the worker configuration (fixed before any analysed run)
    runs/<task>/<arm>/seed<NN>.json   one per run, written atomically: provenance, config and measures
    summary.json, results.md, *.png   the analysis (redone from the run files by --analyse)
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import platform
import random
import subprocess
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass, field, replace
from multiprocessing import get_context
from pathlib import Path
from typing import Callable, Optional

import torch

from ..core.settings import EOPDSettings
from ..cpu.embedded import ADD, MULTIPLE
from . import prereg as P
from .curves import save_figure
from .loop import LoopConfig, distill
from .stats import t_quantile

ROOT = Path(__file__).resolve().parents[2]
ARMS: dict[str, tuple[EOPDSettings, bool]] = {  # arm -> (settings, random gate); section 1
    "opd": (EOPDSettings(fkl_coef=0.0), False),
    "eopd": (EOPDSettings(), False),
    "random": (EOPDSettings(), True),
    "quantile": (EOPDSettings(gate="quantile", gate_quantile=0.25), False),
    "eopd_tau0.4": (EOPDSettings(entropy_threshold=0.4), False),
    "eopd_tau1.2": (EOPDSettings(entropy_threshold=1.2), False),
}
TIER1, TIER2, TIER3 = ("opd", "eopd", "random"), ("opd", "eopd"), ("quantile", "eopd_tau0.4", "eopd_tau1.2")
TIMING_SEED = 1000  # never analysed
SET_HASHES = ("H_sha256", "X_sha256", "token_set_sha256", "token_set_x_sha256")  # in every run config


@dataclass(frozen=True)
class Design:
    """Everything a run's result depends on (hashed into every run file). The defaults are the preregistration's;
    `quick()` is a smoke-test shape."""
    steps: int = 60
    batch: int = 512
    ppo_epochs: int = 4
    samples: int = P.SAMPLES
    h_size: int = P.H_SIZE  # a prefix of H (the novel-key problems come first)
    x_size: int = P.X_SIZE
    ab_prompts: int = 200  # fixed prompts of H for the all-token entropy and FKL(H > 0.8) (E3, E5)
    seeds1: int = 26
    seeds2: int = 18
    cap3: int = 26
    floor3: int = 10
    budget_s: float = 7200.0

    def loop(self, seed: int, arm: str) -> LoopConfig:
        settings, rg = ARMS[arm]
        return LoopConfig(steps=self.steps, batch=self.batch, ppo_epochs=self.ppo_epochs, lr=1e-3, weight_decay=0.01,
                          grad_clip=1.0, topk=16, max_new_tokens=16, seed=seed, settings=settings, random_gate=rg)

    @staticmethod
    def quick() -> "Design":
        return Design(steps=2, batch=32, ppo_epochs=1, samples=8, h_size=30, x_size=10, ab_prompts=16, seeds1=2,
                      seeds2=2, cap3=2, floor3=1, budget_s=1e9)


# -- provenance ----------------------------------------------------------------------------------------------------

def git(*args: str) -> str:
    return subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True, check=True).stdout


def provenance(out: Path) -> dict:
    """Commit, clean-tree flag (ignoring the run's own output folder), command, versions, CPUs and threads."""
    import transformers

    spec = ["."]
    if out.resolve().is_relative_to(ROOT):
        spec.append(f":(exclude){out.resolve().relative_to(ROOT)}")
    dirty = git("status", "--porcelain", "--untracked-files=all", "--", *spec).rstrip("\n")
    return {"commit": git("rev-parse", "HEAD").strip(), "clean": not dirty, "dirty_files": dirty.splitlines()[:20],
            "command": [Path(sys.executable).name, *sys.argv], "torch": torch.__version__,
            "transformers": transformers.__version__, "python": platform.python_version(),
            "cpus": os.cpu_count(), "threads": torch.get_num_threads(),
            "cpu_isa_forced": {k: os.environ[k] for k in ISA_ENV_KEYS if k in os.environ}}


# The kernel paths of torch (ATen), MKL and oneDNN, by instruction set: a run's floats depend on them, so a run made
# on an AVX2 host reproduces on an AVX-512 host only with these forced to AVX2 (measured: bit for bit, with the
# same torch and thread count). The variables are read when torch loads, so they are set before the workers spawn.
ISA_ENV = {"avx2": {"ATEN_CPU_CAPABILITY": "avx2", "MKL_ENABLE_INSTRUCTIONS": "AVX2", "ONEDNN_MAX_CPU_ISA": "AVX2"}}
ISA_ENV_KEYS = ("ATEN_CPU_CAPABILITY", "MKL_ENABLE_INSTRUCTIONS", "ONEDNN_MAX_CPU_ISA")


def force_cpu_isa(isa: Optional[str]) -> None:
    """Make the worker processes (spawned later) use `isa`'s kernel paths; None leaves the host's own."""
    if isa is None:
        return
    if isa not in ISA_ENV:
        raise SystemExit(f"--cpu-isa {isa!r} is not one of {sorted(ISA_ENV)}")
    os.environ.update(ISA_ENV[isa])


def refuse_dirty_docs(out: Path, prov: dict) -> None:
    if out.resolve().is_relative_to(ROOT / "docs") and not prov["clean"]:
        raise SystemExit(f"refusing to write results into {out} from a dirty tree ({len(prov['dirty_files'])}+ "
                         f"changed files, e.g. {prov['dirty_files'][:3]}). Fix: commit first, or pass --out outside docs/")


def write_json(path: Path, obj) -> None:
    """Atomic: a crash leaves the old file or none, never half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + f".tmp{os.getpid()}")
    tmp.write_text(json.dumps(obj, indent=1, default=str))
    os.replace(tmp, path)


def sha(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()


def run_config(design: Design, refs_key: dict, task: str, arm: str, seed: int) -> dict:
    """A run's whole config: the loop's fields (with the arm's settings), the design, and the sets' hashes."""
    return {"task": task, "arm": arm, "seed": seed, "loop": asdict(design.loop(seed, arm)), "design": asdict(design),
            "sampling": {"temperature": 1.0, "top_p": P.TOP_P, "max_new_tokens": 16, "chunk": P.CHUNK,
                         "seed": 1000 + seed}, **refs_key}


def run_path(out: Path, task: str, arm: str, seed: int) -> Path:
    return out / "runs" / task / arm / f"seed{seed:02d}.json"


def existing(path: Path, commit: str, config: dict) -> Optional[dict]:
    """The run file's result when it names this commit and config; None when absent; refuses a mismatch."""
    if not path.exists():
        return None
    rec = json.loads(path.read_text())
    if rec.get("provenance", {}).get("commit") != commit or rec.get("config_sha256") != sha(config):
        raise SystemExit(f"refusing to resume over {path}: it was written by commit "
                         f"{rec.get('provenance', {}).get('commit')} with config {rec.get('config_sha256')}, this is "
                         f"{commit} with {sha(config)}. Fix: pass a new --out (or move that folder away)")
    return rec["result"]


# -- the work of one process ---------------------------------------------------------------------------------------

class Context:
    """Both embedded pairs, the sets and H2's token set, loaded once per process."""

    def __init__(self, design: Design, token_set: Optional[dict] = None, token_set_x: Optional[dict] = None):
        from .repro import _Pair
        from ..cpu.embedded import embedded_pair

        self.design = design
        self.mult, self.sums = (_Pair(embedded_pair(task=t, studied=True)) for t in (MULTIPLE, ADD))
        H, X, novel = P.heldout_sets()
        self.H, self.X, self.n_novel = H[:design.h_size], X[:design.x_size], min(len(novel), design.h_size)
        tok = self.mult.tok
        self.h_prompts = [P.chat_prompt_ids(tok, p) for p in self.H]
        self.x_prompts = [P.chat_prompt_ids(tok, p) for p in self.X]
        self.ab_prompts = random.Random(0).sample(self.h_prompts, min(design.ab_prompts, len(self.h_prompts)))
        self.token_set = P.TokenSet(**token_set) if token_set else None
        self.token_set_x = P.TokenSet(**token_set_x) if token_set_x else None

    def decode(self, ids: list[int]) -> str:
        return self.mult.tok.decode(ids, skip_special_tokens=True)

    def sampled(self, model, seed: int, eos_id: int) -> tuple[dict, list]:
        """Pass@k, D_8 and the distinct-answer measures on H, its novel-key part and X (one stream: H, then X)."""
        samples = P.sample_responses(model, self.h_prompts + self.x_prompts, n=self.design.samples, seed=seed,
                                     eos_id=eos_id, pad_id=self.mult.pad)
        per = [P.problem_measures(p, [self.decode(r) for r in rs]) for p, rs in zip(self.H + self.X, samples)]
        nh = len(self.H)
        out = {"H": P.set_measures(per[:nh]), "novel": P.set_measures(per[:self.n_novel]),
               "X": P.set_measures(per[nh:]),
               "per_problem": [[r["c"], *r["counts"]] for r in per]}  # H then X: c, then c_a per correct answer
        return out, samples[:nh]

    def multiples_measures(self, student, seed: int) -> dict:
        pair = self.mult
        out, h_samples = self.sampled(student, 1000 + seed, pair.student_eos)
        out.update(P.deciding_entropies(student, pair.tok, lambda i: self.h_prompts[i], self.token_set, pair.pad,
                                        novel=self.n_novel))
        out["deciding_entropy_X"] = P.deciding_entropies(student, pair.tok, lambda i: self.x_prompts[i],
                                                         self.token_set_x, pair.pad)["deciding_entropy"]
        out["own_deciding_entropy"], out["own_deciding_n"] = P.own_deciding_entropy(
            student, pair.tok, self.h_prompts, h_samples, pair.pad, pair.student_eos)
        out.update(pair.claims_ab(student, self.ab_prompts, seed=2000))  # all-token entropy, FKL on H > 0.8
        return out

    def run(self, task: str, arm: str, seed: int) -> dict:
        """Train one student (the loop) and measure it; returns the run's result."""
        pair = self.mult if task == MULTIPLE else self.sums
        student = pair.load(pair.info["student"])
        t0 = time.time()
        history = distill(student, pair.teacher, pair.train, self.design.loop(seed, arm), student_eos=pair.student_eos,
                          teacher_eos=pair.teacher_eos, pad_id=pair.pad, log=lambda m: None)
        t_train = time.time() - t0
        student.eval()
        if task == MULTIPLE:
            measures = self.multiples_measures(student, seed)
        else:
            measures = {"greedy_acc": 100 * pair.greedy_accuracy(student)}
        train = {k: [h[k] for h in history if k in h]
                 for k in ("gate_frac", "hard_gate_frac", "student_entropy_mean", "rkl_mean", "fkl_high_entropy_mean")}
        return {"task": task, "arm": arm, "seed": seed, "train_seconds": t_train, "seconds": time.time() - t0,
                "measures": measures, "train": {k: v for k, v in train.items() if v}}


_CTX: Optional[Context] = None


def _init(design: Design, token_set: dict, token_set_x: dict, threads: int) -> None:
    global _CTX
    torch.set_num_threads(threads)
    _CTX = Context(design, token_set, token_set_x)


def _job(task: str, arm: str, seed: int, path: Optional[str], meta: Optional[dict]) -> dict:
    """A worker's job: one run; written to `path` (atomically, with `meta`) unless it is a timing run."""
    start = time.time()
    result = _CTX.run(task, arm, seed)
    result["cpu_capability"] = torch.backends.cpu.get_cpu_capability()  # the kernels this worker's torch used
    result["wall"] = [start, time.time()]  # for the timing runs: wall time without the worker's start-up
    if path is not None:
        write_json(Path(path), {**meta, "result": result})
    return result


def refs_key_of(refs: dict) -> dict:
    """The sets' hashes from references.json: the part of it that enters every run's config."""
    return {k: refs[k] for k in SET_HASHES}


def _pool(design: Design, refs: dict, threads: int, workers: int) -> ProcessPoolExecutor:
    """`workers` spawned processes, each holding a Context with H2's token sets and `threads` torch threads."""
    return ProcessPoolExecutor(max_workers=workers, mp_context=get_context("spawn"), initializer=_init,
                               initargs=(design, refs["token_set"], refs["token_set_x"], threads))


def progress_line(r: dict) -> str:
    m = r["measures"]
    what = (f"greedy {m['greedy_acc']:.1f}%" if r["task"] == ADD else
            f"H1 Pass@{P.K_PRIMARY} {m['H']['pass'][P.K_PRIMARY - 1]:.2f}%  H2 H_dec {m['deciding_entropy']:.4f}  "
            f"H3 D_{P.D_K} {m['H']['d8']:.3f}")
    return f"[prereg] {r['task']} {r['arm']} seed {r['seed']}: {r['seconds']:.0f} s  {what}"


# -- references, budget, tiers --------------------------------------------------------------------------------------

def references(ctx: Context) -> dict:
    """H2's token set, the sets' hashes, and the reference measures (teacher, untrained student; reported only)."""
    m = ctx.mult
    ts = P.teacher_token_set(m.teacher, m.teacher_tok, ctx.H, ctx.h_prompts, teacher_eos=m.teacher_eos, pad_id=m.pad)
    ts_x = P.teacher_token_set(m.teacher, m.teacher_tok, ctx.X, ctx.x_prompts, teacher_eos=m.teacher_eos, pad_id=m.pad,
                               seed=P.TOKEN_SET_SEED + 1)  # E2's H2 on X (the preregistered set is H's)
    ctx.token_set, ctx.token_set_x = ts, ts_x
    student0 = m.load(m.info["student"])
    ref = {}
    for name, model, eos in (("teacher", m.teacher, m.teacher_eos), ("student_before", student0, m.student_eos)):
        sampled, _ = ctx.sampled(model, 4000, eos)
        ref[name] = {s: {"pass@4": sampled[s]["pass"][P.K_PRIMARY - 1], "d8": sampled[s]["d8"]} for s in ("H", "X")}
        for s, prompts, probs in (("H", ctx.h_prompts, ctx.H), ("X", ctx.x_prompts, ctx.X)):
            texts = P.generate(model, prompts, max_new_tokens=16, eos_id=eos, pad_id=m.pad, greedy=True)
            ref[name][s]["greedy_acc"] = 100 * sum(P.compute_score(MULTIPLE, ctx.decode(r), p.ground_truth())
                                                   for r, p in zip(texts, probs)) / len(probs)
    ref["student_before"]["deciding_entropy"] = P.deciding_entropies(student0, m.tok, lambda i: ctx.h_prompts[i], ts,
                                                                     m.pad)["deciding_entropy"]
    s = ctx.sums
    ref["sums"] = {"student_before_greedy": 100 * s.greedy_accuracy(s.load(s.info["student"])),
                   "teacher_greedy": 100 * s.greedy_accuracy(s.teacher, teacher=True)}
    return {"token_set": asdict(ts), "token_set_kept": len(ts.j), "token_set_sha256": ts.sha256(),
            "token_set_x": asdict(ts_x), "token_set_x_kept": len(ts_x.j), "token_set_x_sha256": ts_x.sha256(),
            "H_sha256": P.problems_sha256(ctx.H), "X_sha256": P.problems_sha256(ctx.X), "novel": ctx.n_novel,
            "references": ref}


def schedule(design: Design, n3: int) -> list[tuple[str, str, int]]:
    """Section 7's order: tier 1 seed-major, tier 2, tier 3 seed-major (a stopped run leaves complete pairs)."""
    jobs = [(MULTIPLE, a, s) for s in range(design.seeds1) for a in TIER1]
    jobs += [(ADD, a, s) for s in range(design.seeds2) for a in TIER2]
    jobs += [(MULTIPLE, a, s) for s in range(n3) for a in TIER3]
    return jobs


def run_all(out: Path, design: Design, workers: int, threads: Optional[int] = None, log: Callable = print,
            cpu_isa: Optional[str] = None) -> dict:
    """Everything up to the analysis; resumable (completed runs of this commit and config are kept). `threads`:
    torch threads per worker (default cpus // workers; more threads than cores in all makes torch's tiny ops
    wait on descheduled threads, tens of times slower)."""
    t_start = time.time()
    force_cpu_isa(cpu_isa)
    prov = provenance(out)
    refuse_dirty_docs(out, prov)
    threads = threads or max(1, (os.cpu_count() or 1) // workers)
    torch.set_num_threads(threads)
    ref_path, budget_path = out / "references.json", out / "budget.json"
    ctx = None
    if ref_path.exists():
        refs = json.loads(ref_path.read_text())
        existing_prov = refs["provenance"]
        if existing_prov["commit"] != prov["commit"] or refs["design"] != asdict(design):
            raise SystemExit(f"refusing to resume over {ref_path}: written by commit {existing_prov['commit']} with "
                             f"another design or commit. Fix: pass a new --out")
    else:
        ctx = Context(design)
        refs = {"provenance": prov, "design": asdict(design), **references(ctx)}
        write_json(ref_path, refs)
        log(f"[prereg] references: token set {refs['token_set_kept']} of {design.h_size * P.TOKEN_SET_SAMPLES} teacher "
            f"responses kept ({time.time() - t_start:.0f} s)")
    refs_key = refs_key_of(refs)
    with _pool(design, refs, threads, workers) as pool:
        if budget_path.exists():
            budget = json.loads(budget_path.read_text())
            if (budget["workers"], budget["threads_per_worker"]) != (workers, threads):
                raise SystemExit(f"{budget_path} was timed with {budget['workers']} worker(s) x "
                                 f"{budget['threads_per_worker']} thread(s); float reductions depend on the thread "
                                 f"count. Fix: resume with --workers {budget['workers']} --threads "
                                 f"{budget['threads_per_worker']}")
        else:  # timing runs: seed 1000, never analysed (neither printed nor written)
            timing = {}
            for task in (MULTIPLE, ADD):  # one run per worker at once: effective s/run = wall / runs in parallel
                walls = [r["wall"] for r in pool.map(_job, [task] * workers, ["eopd"] * workers,
                                                     [TIMING_SEED] * workers, [None] * workers, [None] * workers)]
                timing[task] = (max(w[1] for w in walls) - min(w[0] for w in walls)) / workers
            t0_total = time.time() - t_start
            n3 = P.budget_n3(timing[MULTIPLE], timing[ADD], t0_total, cap=design.cap3, floor=design.floor3,
                             budget_s=design.budget_s, tier1=len(TIER1) * design.seeds1,
                             tier2=len(TIER2) * design.seeds2)
            budget = {"t_m": timing[MULTIPLE], "t_s": timing[ADD], "T0": t0_total, "n3": n3, "workers": workers,
                      "threads_per_worker": threads, "commit": prov["commit"]}
            write_json(budget_path, budget)
        log(f"[prereg] budget: t_m {budget['t_m']:.1f} s, t_s {budget['t_s']:.1f} s, T0 {budget['T0']:.0f} s -> "
            f"n3 = {budget['n3']} ({budget['workers']} worker(s) x {budget['threads_per_worker']} thread(s))")
        run_jobs(pool, out, design, refs_key, prov, budget, schedule(design, budget["n3"]), log)
    return {"provenance": prov, "seconds": time.time() - t_start}


def run_jobs(pool, out: Path, design: Design, refs_key: dict, prov: dict, budget: dict,
             jobs: list[tuple[str, str, int]], log: Callable) -> None:
    """Submit the jobs whose run files are not already there (same commit and config), one progress line each."""
    futures, done = [], 0
    for task, arm, seed in jobs:
        config = run_config(design, refs_key, task, arm, seed)
        path = run_path(out, task, arm, seed)
        if existing(path, prov["commit"], config) is not None:
            done += 1
            continue
        meta = {"provenance": prov, "config": config, "config_sha256": sha(config), "budget": budget}
        futures.append(pool.submit(_job, task, arm, seed, str(path), meta))
    log(f"[prereg] {len(jobs)} runs: {done} already done, {len(futures)} to run")
    for f in futures:  # in submission order: the progress lines follow the schedule
        log(progress_line(f.result()))


# -- the addendum (preregistration section 11): tier 3 beside a run whose budget rule gave n3 = 0 -------------------

REPRO_JOBS = ((MULTIPLE, "opd", 0), (MULTIPLE, "eopd", 0))  # re-run before tier 3; must equal the base's files


def _canonical(obj) -> str:
    """JSON text with sorted keys: equal exactly when two results are equal float for float (NaN included)."""
    return json.dumps(obj, sort_keys=True)


def _shown(path: Path) -> str:
    """A path as results files record it: relative to the repository when inside it."""
    p = path.resolve()
    return str(p.relative_to(ROOT)) if p.is_relative_to(ROOT) else str(p)


def _same_result(a: dict, b: dict) -> bool:
    """Two runs' results agree float for float on every measure and training curve."""
    return _canonical([a["measures"], a["train"]]) == _canonical([b["measures"], b["train"]])


def _resolve(path: str) -> Path:
    return Path(path) if Path(path).is_absolute() else ROOT / path


def run_addendum(out: Path, base: Path, design: Design, workers: int, threads: Optional[int] = None,
                 log: Callable = print, cpu_isa: Optional[str] = None) -> dict:
    """Section 11: tier 3 at n3 = design.cap3 in `out`, paired by seed with the runs in `base` (whose budget rule
    gave n3 = 0). Before any tier-3 run, REPRO_JOBS are re-run at this commit and must equal the base's files
    float for float (every measure and training curve): seed pairing across two commits needs the same
    numerics (`cpu_isa`: force_cpu_isa). Resumable like run_all; `addendum.json` records the base, the
    reproduction and the budget."""
    t_start = time.time()
    force_cpu_isa(cpu_isa)
    prov = provenance(out)
    refuse_dirty_docs(out, prov)
    refs = json.loads((base / "references.json").read_text())
    base_budget = json.loads((base / "budget.json").read_text())
    if refs["design"] != asdict(design):
        raise SystemExit(f"{base / 'references.json'} was run with another design; the addendum's tier 3 must use the "
                         f"base's. Fix: pass the base's shape (--quick only for a --quick base)")
    if base_budget["n3"] != 0:
        raise SystemExit(f"{base} ran tier 3 itself (n3 = {base_budget['n3']}); the addendum is for a base whose "
                         f"budget rule gave n3 = 0")
    threads = threads or base_budget["threads_per_worker"]
    if threads != base_budget["threads_per_worker"]:
        raise SystemExit(f"the base ran {base_budget['threads_per_worker']} torch thread(s) per worker; float "
                         f"reductions depend on the thread count. Fix: --threads {base_budget['threads_per_worker']}")
    torch.set_num_threads(threads)
    base_commit = refs["provenance"]["commit"]
    meta_path = out / "addendum.json"
    meta = json.loads(meta_path.read_text()) if meta_path.exists() else None
    if meta is not None and (meta["provenance"]["commit"], meta["base_commit"]) != (prov["commit"], base_commit):
        raise SystemExit(f"refusing to resume over {meta_path}: written by commit {meta['provenance']['commit']} "
                         f"against base commit {meta['base_commit']}. Fix: pass a new --out")
    refs_key = refs_key_of(refs)
    budget = {"n3": design.cap3, "rule": "preregistration section 11: tier 3 at the cap, no timing runs",
              "workers": workers, "threads_per_worker": threads, "cpu_isa": cpu_isa, "commit": prov["commit"],
              "base_commit": base_commit}
    with _pool(design, refs, threads, workers) as pool:
        if meta is None or not all(r["equal"] for r in meta["reproduction"]):
            base_recs = []
            for task, arm, seed in REPRO_JOBS:
                rec = json.loads(run_path(base, task, arm, seed).read_text())
                if rec["config_sha256"] != sha(run_config(design, refs_key, task, arm, seed)):
                    raise SystemExit(f"{run_path(base, task, arm, seed)} has another config than this commit "
                                     f"gives for it; the addendum cannot pair with it")
                base_recs.append(rec["result"])
            fresh = list(pool.map(_job, *zip(*REPRO_JOBS), [None] * len(REPRO_JOBS), [None] * len(REPRO_JOBS)))
            repro = [{"task": t, "arm": a, "seed": s, "seconds": r["seconds"],
                      "equal": _same_result(r, b)}
                     for (t, a, s), r, b in zip(REPRO_JOBS, fresh, base_recs)]
            meta = {"provenance": prov, "base": _shown(base), "base_commit": base_commit, "budget": budget,
                    "reproduction": repro}
            write_json(meta_path, meta)
            for r in repro:
                log(f"[prereg] reproduction of the base's {r['task']} {r['arm']} seed {r['seed']}: "
                    f"{'equal' if r['equal'] else 'DIFFERENT'} ({r['seconds']:.0f} s)")
            if not all(r["equal"] for r in repro):
                raise SystemExit(f"the base's runs do not reproduce at commit {prov['commit']} (see {meta_path}); "
                                 f"tier 3 would not be paired with them. Fix: run the addendum with the base's torch, "
                                 f"threads and CPU kind, or at the base's commit {base_commit}")
        run_jobs(pool, out, design, refs_key, prov, budget,
                 [(MULTIPLE, a, s) for s in range(design.cap3) for a in TIER3], log)
    return {"provenance": prov, "seconds": time.time() - t_start}


# -- reproduction: a run's files against earlier runs of the same design ------------------------------------------

def compare_runs(out: Path, others: list[Path]) -> dict:
    """Every run file in `out` against the file of the same (task, arm, seed) in `others` (the first that has it):
    the same config (config_sha256) and every measure and training curve equal float for float. Also the
    references' token sets and set hashes. Writes `out/reproduction.json`; runs absent from `others` and runs of
    `others` absent from `out` are listed, not counted as differences."""
    def files(d: Path) -> dict[tuple, Path]:
        return {tuple(p.relative_to(d / "runs").parts): p for p in sorted((d / "runs").glob("*/*/seed*.json"))}

    mine, theirs = files(out), {}
    for d in reversed(others):  # the first directory given wins
        theirs.update(files(d))
    rows, unmatched = [], []
    for key, path in mine.items():
        if key not in theirs:
            unmatched.append("/".join(key))
            continue
        a, b = (json.loads(p.read_text()) for p in (path, theirs[key]))
        rows.append({"run": "/".join(key), "other": _shown(theirs[key]),
                     "config": a["config_sha256"] == b["config_sha256"],
                     "equal": _same_result(a["result"], b["result"]),
                     "commits": [a["provenance"]["commit"], b["provenance"]["commit"]]})
    ref_dirs = [d for d in others if (d / "references.json").exists()]
    refs_equal = None  # an addendum has no references.json of its own
    if ref_dirs and (out / "references.json").exists():
        ref_a, ref_b = (json.loads((d / "references.json").read_text()) for d in (out, ref_dirs[0]))
        keys = ("token_set", "token_set_x", *SET_HASHES, "references")
        refs_equal = _canonical([ref_a[k] for k in keys]) == _canonical([ref_b[k] for k in keys])
    result = {"out": _shown(out), "others": [_shown(d) for d in others], "compared": len(rows),
              "equal": sum(r["config"] and r["equal"] for r in rows), "references_equal": refs_equal,
              "different": [r["run"] for r in rows if not (r["config"] and r["equal"])],
              "not_in_others": unmatched, "not_in_out": sorted("/".join(k) for k in set(theirs) - set(mine)),
              "runs": rows}
    write_json(out / "reproduction.json", result)
    return result


# -- analysis -----------------------------------------------------------------------------------------------------

def load_runs(out: Path) -> dict[str, dict[str, list[dict]]]:
    runs: dict[str, dict[str, list[dict]]] = {}
    for path in sorted((out / "runs").glob("*/*/seed*.json")):
        r = json.loads(path.read_text())["result"]
        runs.setdefault(r["task"], {}).setdefault(r["arm"], []).append(r)
    for arms in runs.values():
        for rs in arms.values():
            rs.sort(key=lambda r: r["seed"])
    return runs


MEASURES: dict[str, Callable[[dict], float]] = {  # a multiples run's scalar measures (exploratory tables)
    "Pass@4 (H, %)": lambda m: m["H"]["pass"][P.K_PRIMARY - 1],
    "H_dec (nats)": lambda m: m["deciding_entropy"],
    "D_8 (H)": lambda m: m["H"]["d8"],
    "Pass@1 = Avg@64 (H, %)": lambda m: m["H"]["pass"][0],
    "Pass@8 (H, %)": lambda m: m["H"]["pass"][7],
    "Pass@64 (H, %)": lambda m: m["H"]["pass"][-1],
    "distinct correct of 64 (H)": lambda m: m["H"]["distinct"],
    "coverage (H)": lambda m: m["H"]["coverage"],
    "distinct among solved (H)": lambda m: m["H"]["distinct_solved"],
    "Pass@4 (novel keys, %)": lambda m: m["novel"]["pass"][P.K_PRIMARY - 1],
    "D_8 (novel keys)": lambda m: m["novel"]["d8"],
    "H_dec (novel keys, nats)": lambda m: m["deciding_entropy_novel"],
    "H_dec (X, nats)": lambda m: m["deciding_entropy_X"],
    "Pass@4 (X, %)": lambda m: m["X"]["pass"][P.K_PRIMARY - 1],
    "D_8 (X)": lambda m: m["X"]["d8"],
    "H_dec, own samples (nats)": lambda m: m["own_deciding_entropy"],
    "entropy over the deciding digits (nats)": lambda m: m["deciding_digits_entropy"],
    "phrasing-token entropy (nats)": lambda m: m["phrasing_entropy"],
    "all-token entropy (nats)": lambda m: m["student_entropy"],
    "FKL on H_T > 0.8": lambda m: m["fkl_high_entropy"],
}


def paired(runs: dict, a: str, b: str, fn: Callable[[dict], float], task: str = MULTIPLE):
    """Per-seed values of arms a and b on their common seeds (the paired design)."""
    ra, rb = {r["seed"]: r for r in runs[task][a]}, {r["seed"]: r for r in runs[task][b]}
    seeds = sorted(set(ra) & set(rb))
    return [fn(ra[s]["measures"]) for s in seeds], [fn(rb[s]["measures"]) for s in seeds]


def mean_ci(values: list[float]) -> tuple[float, float, float]:
    """Mean and its 95% t interval over seeds."""
    n = len(values)
    mu = sum(values) / n
    if n < 2:
        return mu, float("nan"), float("nan")
    half = t_quantile(0.975, n - 1) * math.sqrt(sum((v - mu) ** 2 for v in values) / (n - 1) / n)
    return mu, mu - half, mu + half


def merged_runs(out: Path) -> dict[str, dict[str, list[dict]]]:
    """The run files of `out`, and of its base when `out` is an addendum (section 11): the base's arms plus the
    addendum's tier 3 (an arm in both is refused)."""
    runs = load_runs(out)
    if (out / "addendum.json").exists():
        base = load_runs(_resolve(json.loads((out / "addendum.json").read_text())["base"]))
        for task, arms in runs.items():
            both = set(arms) & set(base.get(task, {}))
            if both:
                raise SystemExit(f"{out} and its base both hold {task} arms {sorted(both)}; an addendum adds arms")
            base.setdefault(task, {}).update(arms)
        runs = base
    return runs


def analyse(runs: dict[str, dict[str, list[dict]]]) -> dict:
    """Primaries (section 2), the secondary family (section 5) and the exploratory contrasts (section 6)."""
    mult = runs.get(MULTIPLE, {})
    primary = []
    if {"opd", "eopd"} <= set(mult):
        for name, fn in (("H1: Pass@4, EOPD > OPD", MEASURES["Pass@4 (H, %)"]),
                         ("H2: entropy at the deciding token, EOPD > OPD", MEASURES["H_dec (nats)"]),
                         ("H3: D_8 distinct correct answers, EOPD > OPD", MEASURES["D_8 (H)"])):
            primary.append(P.contrast(name, *paired(runs, "eopd", "opd", fn), "one"))
        P.family(primary)
        for row in primary:
            row["verdict"] = "holds" if row["passed"] else "not shown"
    secondary = []
    plan = [("S1: Pass@4, EOPD > random gate", "eopd", "random", "Pass@4 (H, %)", "one"),
            ("S2: H_dec, EOPD > random gate", "eopd", "random", "H_dec (nats)", "one"),
            ("S3: Pass@4, random gate - OPD", "random", "opd", "Pass@4 (H, %)", "two"),
            ("S5: Pass@4, quantile 0.25 > OPD", "quantile", "opd", "Pass@4 (H, %)", "one"),
            ("S6: Pass@4, tau 0.4 > OPD", "eopd_tau0.4", "opd", "Pass@4 (H, %)", "one"),
            ("S7: Pass@4, tau 1.2 > OPD", "eopd_tau1.2", "opd", "Pass@4 (H, %)", "one")]
    for name, a, b, key, sided in plan:
        if a in mult and b in mult and len(paired(runs, a, b, MEASURES[key])[0]) >= 2:
            secondary.append(P.contrast(name, *paired(runs, a, b, MEASURES[key]), sided))
    sums = runs.get(ADD, {})
    if {"opd", "eopd"} <= set(sums):
        secondary.insert(3, P.contrast("S4: sums greedy accuracy, EOPD - OPD", *paired(
            runs, "eopd", "opd", lambda m: m["greedy_acc"], task=ADD), "two"))
    P.family(secondary)
    for row in secondary:
        row["verdict"] = "shown (secondary)" if row["passed"] else "not shown"
    exploratory = []
    for a, b in (("eopd", "opd"), ("random", "eopd"), ("quantile", "eopd"), ("random", "opd"),
                 ("eopd_tau0.4", "eopd"), ("eopd_tau1.2", "eopd")):
        if a in mult and b in mult:
            for key, fn in MEASURES.items():
                x, y = paired(runs, a, b, fn)
                if len(x) >= 2 and all(math.isfinite(v) for v in x + y):
                    row = P.contrast(f"{a} - {b}: {key}", x, y, "two")
                    exploratory.append({k: row[k] for k in ("name", "n", "mean_diff", "ci95")})
    per_arm = {arm: {key: mean_ci([fn(r["measures"]) for r in rs]) for key, fn in MEASURES.items()}
               for arm, rs in mult.items()}
    for arm, rs in sums.items():
        per_arm[f"sums {arm}"] = {"greedy acc (%)": mean_ci([r["measures"]["greedy_acc"] for r in rs])}
    gates = {arm: mean_ci([sum(r["train"][k]) / len(r["train"][k]) for r in rs])
             for arm, rs in mult.items() for k in (("hard_gate_frac",) if arm == "random" else ("gate_frac",))}
    return {"primary": primary, "secondary": secondary, "exploratory": exploratory, "per_arm": per_arm,
            "train_gate_frac": gates, "seeds": {t: {a: [r["seed"] for r in rs] for a, rs in arms.items()}
                                                for t, arms in runs.items()}}


def figures(runs: dict[str, dict[str, list[dict]]], out: Path) -> list[str]:
    """Pass@k curves with 95% intervals, distinct-answer histograms, the deciding-token entropy per arm."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    mult = runs.get(MULTIPLE, {})
    written = []
    fig, ax = plt.subplots(figsize=(6, 4))
    for arm, rs in mult.items():
        n = len(rs[0]["measures"]["H"]["pass"])
        band = [mean_ci([r["measures"]["H"]["pass"][k] for r in rs]) for k in range(n)]
        ks = list(range(1, n + 1))
        ax.plot(ks, [b[0] for b in band], label=f"{arm} (n={len(rs)})")
        if len(rs) > 1:
            ax.fill_between(ks, [b[1] for b in band], [b[2] for b in band], alpha=0.2)
    ax.set(xscale="log", xlabel="k", ylabel="Pass@k on H (%)", title="Pass@k, mean over seeds, 95% intervals")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    written.append(save_figure(fig, out / "pass_at_k.png"))
    fig, ax = plt.subplots(figsize=(6, 4))
    width = 0.8 / max(1, len(mult))
    for i, (arm, rs) in enumerate(mult.items()):
        hist = [sum(r["measures"]["H"]["distinct_hist"][c] for r in rs) for c in range(6)]
        total = sum(hist)
        ax.bar([c + i * width for c in range(6)], [h / total for h in hist], width=width, label=arm)
    ax.set(xlabel="distinct correct answers among 64 samples", ylabel="fraction of (problem, seed)",
           title="Distinct correct answers per problem (H)")
    ax.legend(fontsize=8)
    written.append(save_figure(fig, out / "distinct_answers.png"))
    fig, ax = plt.subplots(figsize=(6, 4))
    for i, (arm, rs) in enumerate(mult.items()):
        vals = [r["measures"]["deciding_entropy"] for r in rs]
        ax.scatter([i] * len(vals), vals, s=10, alpha=0.6)
        mu, lo, hi = mean_ci(vals)
        ax.errorbar([i + 0.2], [mu], yerr=[[mu - lo], [hi - mu]] if len(vals) > 1 else None, fmt="o", capsize=4)
    ax.set_xticks(range(len(mult)), list(mult), fontsize=8)
    ax.set(ylabel="student entropy at the deciding token (nats)", title="H2's measure per seed, mean and 95% interval")
    written.append(save_figure(fig, out / "deciding_entropy.png"))
    return written


def _row(v: dict) -> str:
    lo, hi = v["ci95"]
    return (f"| {v['name']} | {v['mean_diff']:+.4g} [{lo:+.4g}, {hi:+.4g}] | {v['t']:.2f} ({v['df']}) | "
            f"{v['sided']} | {v['p']:.3g} | {v['p_holm']:.3g} | {v['verdict']} |")


def markdown(summary: dict, refs: dict, budget: dict) -> str:
    head = "| test | mean difference [95% CI] | t (df) | sided | p | p (Holm) | verdict |\n|---|---|---|---|---|---|---|"
    lines = [f"Commit {refs['provenance']['commit']} (clean tree: {refs['provenance']['clean']}). Budget: t_m "
             f"{budget['t_m']:.1f} s, t_s {budget['t_s']:.1f} s, T0 {budget['T0']:.0f} s, n3 = {budget['n3']}, "
             f"{budget['workers']} worker(s) x {budget['threads_per_worker']} thread(s).", "",
             f"H2's token set: {refs['token_set_kept']} of {refs['token_set']['drawn']} teacher responses kept on H "
             f"(X, exploratory: {refs['token_set_x_kept']} of {refs['token_set_x']['drawn']}).", "",
             "## Primary (one-sided, Holm over the 3)", "", head, *[_row(v) for v in summary["primary"]], "",
             "## Secondary (Holm within the family)", "", head, *[_row(v) for v in summary["secondary"]], "",
             "## Per arm (mean [95% CI] over seeds)", "", "| arm | measure | mean [95% CI] |", "|---|---|---|"]
    for arm, ms in summary["per_arm"].items():
        lines += [f"| {arm} | {k} | {mu:.4g} [{lo:.4g}, {hi:.4g}] |" for k, (mu, lo, hi) in ms.items()]
    lines += ["", "## Exploratory contrasts (no verdicts)", "", "| contrast | n | mean difference [95% CI] |",
              "|---|---|---|"]
    lines += [f"| {v['name']} | {v['n']} | {v['mean_diff']:+.4g} [{v['ci95'][0]:+.4g}, {v['ci95'][1]:+.4g}] |"
              for v in summary["exploratory"]]
    lines += ["", "Training gate fraction (random: the hard gate's count it matched): " + ", ".join(
        f"{a} {mu:.3f}" for a, (mu, _, _) in summary["train_gate_frac"].items()), "",
        "References: " + json.dumps(refs["references"])]
    return "\n".join(lines) + "\n"


def report(out: Path) -> dict:
    """summary.json, results.md and the plots of the runs in `out` (with its base's, when `out` is an addendum)."""
    addendum = json.loads((out / "addendum.json").read_text()) if (out / "addendum.json").exists() else None
    refs_dir = _resolve(addendum["base"]) if addendum else out
    refs = json.loads((refs_dir / "references.json").read_text())
    budget = json.loads((refs_dir / "budget.json").read_text())
    runs = merged_runs(out)
    summary = {"provenance": provenance(out), "design": refs["design"], "budget": budget,
               "arms": {a: {"settings": asdict(s), "random_gate": rg} for a, (s, rg) in ARMS.items()},
               **refs_key_of(refs),
               **analyse(runs),
               "figures": [Path(f).name for f in figures(runs, out)]}
    if addendum:
        summary["addendum"] = addendum
    write_json(out / "summary.json", summary)
    text = markdown(summary, refs, budget)
    if addendum:
        a = addendum["budget"]
        text = (f"Addendum (preregistration section 11): tier 3 at commit {addendum['provenance']['commit']} (clean "
                f"tree: {addendum['provenance']['clean']}), n3 = {a['n3']}, {a['workers']} worker(s) x "
                f"{a['threads_per_worker']} thread(s); the base run is {addendum['base']}. Reproduction of the base's "
                + ", ".join(f"{r['arm']} seed {r['seed']}: {'equal' if r['equal'] else 'DIFFERENT'}"
                            for r in addendum["reproduction"]) + ".\n\nBase run: " + text)
    (out / "results.md").write_text(text)
    return summary
