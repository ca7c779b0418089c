"""The `distillation_loss_coef` sweep of `algorithm=eopd_grpo` on the embedded tiny pair
(scripts/grpo_coef_sweep.py is its command line; docs/eopd_grpo.md reports it).

eopd_grpo's loss is verl's `distillation_ppo_loss`:
    L = L_GRPO + c * L_EOPD
    L_GRPO = token-mean of PPO's clipped -A_i r_t, A_i = (s_i - mean_g) / (std_g + 1e-6) over the prompt's group
    L_EOPD = token-mean of the clipped reverse-KL surrogate + fkl_coef * gate * FKL (core.objective)
Arms (same seeds, so paired): GRPO alone (c = 0), c in COEFS, and EOPD alone (no task reward, the same
rollouts: n responses per prompt). Training is the plain loop of `math/loop.py` in the shape of the embedded
eopd_grpo default (128 prompts x 4 responses per rollout batch, one mini-batch, 4 PPO epochs, AdamW lr 1e-3).
Measured: greedy accuracy on the whole held-out split every `eval_every` steps, and the gradient norm of each
term alone (first epoch of those steps), which says how the two losses scale against each other.
Verdicts: paired t-tests of every arm against the shipped default c = DEFAULT (df = seeds - 1), Holm-corrected.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, replace
from pathlib import Path
from typing import Callable

from ..core.settings import EOPDSettings
from .loop import LoopConfig, distill
from .stats import holm, paired_t

COEFS = (0.05, 0.2, 1.0)
DEFAULT = 1.0  # conf/algorithm/eopd_grpo.yaml's distillation_loss_coef


def arms(coefs=COEFS) -> dict[str, dict]:
    """arm name -> LoopConfig fields."""
    out = {"grpo_only": {"task_rewards": True, "distillation_coef": 0.0}}
    out.update({f"coef_{c:g}": {"task_rewards": True, "distillation_coef": float(c)} for c in coefs})
    out["eopd_only"] = {"task_rewards": False}
    return out


def run_arm(pair, name: str, fields: dict, seed: int, cfg: LoopConfig, log: Callable) -> dict:
    student = pair.load(pair.info["student"])
    curve = {}

    def evaluate(step):
        curve[step] = pair.greedy_accuracy(student)
        return {"acc": curve[step]}

    def reward(i, response):
        return pair.score(pair.train_sources[i], pair.tok.decode(response, skip_special_tokens=True),
                          pair.train_answers[i])

    t0 = time.time()
    history = distill(student, pair.teacher, pair.train, replace(cfg, seed=seed, **fields), student_eos=pair.student_eos,
                      teacher_eos=pair.teacher_eos, pad_id=pair.pad, evaluate=evaluate, log=lambda m: None,
                      reward=reward)
    scales = [{k: h[k] for k in ("step", "pg_grad_norm", "distill_grad_norm", "pg_loss", "loss", "rkl_mean")}
              for h in history if "pg_grad_norm" in h]
    result = {"arm": name, "seed": seed, "curve": curve, "final": 100 * curve[cfg.steps], "seconds": time.time() - t0,
              "train_score": [h.get("score") for h in history if "score" in h], "scales": scales}
    log(f"[coef_sweep] {name} seed {seed}: held-out greedy {100 * curve[0]:.1f}% -> {result['final']:.1f}% "
        f"({result['seconds']:.0f} s)")
    return result


def verdicts(results: dict[str, list[dict]], default: str) -> list[dict]:
    """Paired t-tests (final held-out greedy accuracy, points) of each arm against `default`, Holm-corrected."""
    base = sorted(results[default], key=lambda r: r["seed"])
    rows = []
    for name, runs in results.items():
        if name == default:
            continue
        runs = sorted(runs, key=lambda r: r["seed"])
        assert [r["seed"] for r in runs] == [r["seed"] for r in base], "arms must share seeds (paired design)"
        rows.append({"arm": name, "against": default,
                     **asdict(paired_t([r["final"] for r in runs], [r["final"] for r in base]))})
    for row, p in zip(rows, holm([r["p"] for r in rows])):
        row["p_holm"] = p
        row["verdict"] = ("better" if row["mean_diff"] > 0 else "worse") if p < 0.05 else "no difference shown"
    return rows


def run(seeds, cfg: LoopConfig, out_dir: Path, coefs=COEFS, log: Callable = print, task: str = "eopd_tiny_add") -> dict:
    from ..cpu.embedded import embedded_pair
    from .repro import _Pair

    info = embedded_pair(task=task, studied=True)  # the pair of the committed sweep
    pair = _Pair(info)
    t0 = time.time()
    results: dict[str, list[dict]] = {}
    for seed in seeds:  # seed-major: a partial run still has complete pairs
        for name, fields in arms(coefs).items():
            results.setdefault(name, []).append(run_arm(pair, name, fields, seed, cfg, log))
    default = f"coef_{DEFAULT:g}" if f"coef_{DEFAULT:g}" in results else f"coef_{coefs[-1]:g}"
    summary = {"task": task, "config": {**asdict(replace(cfg, settings=EOPDSettings())), "seeds": list(seeds),
                                        "coefs": list(coefs), "heldout_problems": len(pair.val)},
               "seconds": time.time() - t0, "results": results,
               "verdicts": verdicts(results, default) if len(seeds) >= 2 else []}
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "results.json").write_text(json.dumps(summary, indent=1, default=str))
    return summary


def _mean_sd(vals: list[float]) -> tuple[float, float]:
    mu = sum(vals) / len(vals)
    return mu, (sum((v - mu) ** 2 for v in vals) / max(1, len(vals) - 1)) ** 0.5


def markdown(summary: dict) -> str:
    cfg = summary["config"]
    lines = [f"Task {summary['task']} ({cfg['heldout_problems']} held-out problems), seeds {cfg['seeds']} paired across "
             f"arms; {cfg['steps']} steps of {cfg['batch']} responses ({cfg['batch'] // cfg['rollouts_per_prompt']} "
             f"prompts x {cfg['rollouts_per_prompt']}), {cfg['ppo_epochs']} PPO epochs, lr {cfg['lr']}; "
             f"{summary['seconds'] / 60:.1f} min.", "",
             "| arm | held-out greedy, start (%) | end (%) | train reward, last step | |grad L_GRPO| | |grad L_EOPD| |",
             "|---|---|---|---|---|---|"]
    for name, runs in summary["results"].items():
        start = _mean_sd([100 * (r["curve"].get(0, r["curve"].get("0"))) for r in runs])
        end = _mean_sd([r["final"] for r in runs])
        score = [r["train_score"][-1] for r in runs if r["train_score"]]
        norms = [s for r in runs for s in r["scales"]]
        pg = _mean_sd([s["pg_grad_norm"] for s in norms]) if norms else None
        dk = _mean_sd([s["distill_grad_norm"] for s in norms]) if norms else None
        lines.append(f"| {name} | {start[0]:.1f} | {end[0]:.1f} +- {end[1]:.1f} | "
                     + (f"{100 * _mean_sd(score)[0]:.1f}%" if score else "-") + " | "
                     + (f"{pg[0]:.3f} +- {pg[1]:.3f}" if pg else "-") + " | " + (f"{dk[0]:.3f} +- {dk[1]:.3f}" if dk else "-")
                     + " |")
    rows = summary["verdicts"]
    if rows:
        lines += ["", f"Paired t-tests of the final held-out accuracy against {rows[0]['against']} (points, arm minus "
                      f"default), Holm-corrected over {len(rows)} tests:", "",
                  "| arm | mean difference [95% CI] | t (df) | p | p (Holm) | verdict |", "|---|---|---|---|---|---|"]
        for v in rows:
            lo, hi = v["ci95"]
            lines.append(f"| {v['arm']} | {v['mean_diff']:+.1f} [{lo:+.1f}, {hi:+.1f}] | {v['t']:.2f} ({v['df']}) | "
                         f"{v['p']:.3g} | {v['p_holm']:.3g} | {v['verdict']} |")
    return "\n".join(lines)
