"""The laptop-scale reproduction of the paper's claims on the embedded tiny pair (scripts/mini_repro.py is
its command line).

Arms: OPD (fkl_coef 0), EOPD (hard gate, tau = 0.8) and an adaptive gate (the top 20% of tokens by teacher
entropy). Each arm runs the same seeds; a seed fixes the prompt order and the sampling, so arms are paired
by seed. Training is the plain loop of `math/loop.py` (verl_eopd's own objective, teacher statistics and
EOS remap; the default run's shape: 512 responses per rollout batch, 4 PPO epochs, AdamW lr 1e-3).

Measured, all on the held-out split (never trained on):
  curve     greedy accuracy every `eval_every` steps (the whole held-out split)
  (c)       Avg@16 and Pass@k, k = 1..16 (16 samples per problem at T = 1, top-p 0.8: the paper's protocol)
  (a), (b)  on one fixed set of held-out prompts for every arm (one response per prompt, sampled by the arm's
            final student at T = 1, the same sampling seed): the student's token entropy, and the forward KL
            to the teacher on the tokens whose teacher entropy exceeds tau = 0.8 (the same rule for every arm)
Verdicts: paired t-tests over seeds (df = seeds - 1), Holm-corrected over every test in the family;
"holds" when the corrected p < 0.05 with the claimed sign, "reversed" with the opposite sign, otherwise
"not shown", always with the mean paired difference and its 95% interval.
"""

from __future__ import annotations

import json
import random
import time
from dataclasses import asdict, replace
from pathlib import Path
from typing import Callable

import torch

from ..core.objective import eopd_loss
from ..core.settings import EOPDSettings
from .curves import plot, save_figure
from .eval import pass_at_k
from .loop import LoopConfig, _response_logits, accuracy, distill, generate, teacher_statistics
from .stats import holm, paired_t

ARMS = {
    "opd": EOPDSettings(fkl_coef=0.0),
    "eopd": EOPDSettings(),
    "eopd_quantile": EOPDSettings(gate="quantile", gate_quantile=0.2),
}
LABELS = {"opd": "OPD", "eopd": "EOPD (tau = 0.8)", "eopd_quantile": "EOPD, quantile gate (top 20%)"}
TAU = 0.8


def claims(k: int) -> dict[str, tuple[str, int]]:
    """claim -> (result key, the direction EOPD is claimed to move it against OPD)."""
    out = {"a: higher student entropy": ("student_entropy", +1),
           "b: lower FKL on high-entropy tokens": ("fkl_high_entropy", -1)}
    for j in sorted({min(8, k), k}):
        out[f"c: higher Pass@{j}"] = (f"pass@{j}", +1)
    out[f"c: higher Avg@{k}"] = (f"avg@{k}", +1)
    return out


class _Pair:
    """The embedded pair loaded for the loop: models, tokenizer, prompts and answers."""

    def __init__(self, info: dict):
        import pandas as pd
        from transformers import AutoModelForCausalLM, AutoTokenizer

        from ..cpu.embedded import compute_score

        self.info, self.score = info, compute_score
        self.tok = AutoTokenizer.from_pretrained(info["student"])
        self.teacher_tok = AutoTokenizer.from_pretrained(info["teacher"])
        self.load = lambda path: AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32,
                                                                      attn_implementation="sdpa")
        self.teacher = self.load(info["teacher"])

        def rows(path):
            out = pd.read_parquet(path).to_dict("records")
            ids = [self.tok(self.tok.apply_chat_template(list(r["prompt"]), tokenize=False, add_generation_prompt=True),
                            add_special_tokens=False)["input_ids"] for r in out]
            return ids, [r["reward_model"]["ground_truth"] for r in out], [r["data_source"] for r in out]

        self.train, self.train_answers, self.train_sources = rows(info["train"])
        self.val, self.val_answers, self.val_sources = rows(info["val"])
        self.student_eos, self.teacher_eos = self.tok.eos_token_id, self.teacher_tok.eos_token_id
        self.pad = self.tok.pad_token_id

    def scores(self, model, prompts, answers, sources, *, greedy, n=1, seed=0, top_p=1.0) -> list[list[float]]:
        torch.manual_seed(seed)
        reps = [p for p in prompts for _ in range(n)]
        out = generate(model, reps, max_new_tokens=16, eos_id=self.student_eos, pad_id=self.pad, greedy=greedy,
                       top_p=top_p)
        flat = [self.score(ds, self.tok.decode(r, skip_special_tokens=True), a)
                for r, a, ds in zip(out, [a for a in answers for _ in range(n)], [s for s in sources for _ in range(n)])]
        return [flat[i * n:(i + 1) * n] for i in range(len(prompts))]

    def greedy_accuracy(self, model, teacher: bool = False) -> float:
        """Greedy accuracy on the whole held-out split (the teacher stops on its own end token)."""
        tok = self.teacher_tok if teacher else self.tok
        return accuracy(model, self.val, self.val_answers, self.score, self.val_sources, max_new_tokens=16,
                        eos_id=tok.eos_token_id, pad_id=self.pad, decode=lambda r: tok.decode(r, skip_special_tokens=True))

    @torch.no_grad()
    def claims_ab(self, model, prompts, seed: int) -> dict[str, float]:
        """Student entropy and FKL on tokens with teacher entropy > TAU, on responses the model samples for
        the fixed prompts (one each, T = 1, sampling seed fixed)."""
        torch.manual_seed(seed)
        resp = generate(model, prompts, max_new_tokens=16, eos_id=self.student_eos, pad_id=self.pad)
        ts = teacher_statistics(self.teacher, prompts, resp, topk=16, student_eos=self.student_eos,
                                teacher_eos=self.teacher_eos, pad_id=self.pad)
        s_logits, ids, mask = _response_logits(model, prompts, resp, self.pad)
        old = torch.log_softmax(s_logits.float(), -1).gather(-1, ids.unsqueeze(-1)).squeeze(-1)
        _, stats = eopd_loss(s_logits, ids, old, ts["topk_ids"], ts["topk_logprobs"], mask,
                             EOPDSettings(entropy_threshold=TAU), teacher_entropy=ts["entropy"],
                             teacher_token_logprobs=ts["token_logprobs"])
        return {"student_entropy": stats["student_entropy_mean"], "fkl_high_entropy": stats["fkl_high_entropy_mean"],
                "high_entropy_frac": stats["high_entropy_frac"]}


def run_arm(pair: _Pair, arm: str, seed: int, cfg: LoopConfig, ab_prompts, k: int, log: Callable) -> dict:
    student = pair.load(pair.info["student"])
    curve = {}

    def evaluate(step):
        acc = pair.greedy_accuracy(student)
        curve[step] = acc
        return {"acc": acc}

    t0 = time.time()
    history = distill(student, pair.teacher, pair.train, replace(cfg, seed=seed, settings=ARMS[arm]),
                      student_eos=pair.student_eos, teacher_eos=pair.teacher_eos, pad_id=pair.pad, evaluate=evaluate,
                      log=lambda m: None)
    sampled = pair.scores(student, pair.val, pair.val_answers, pair.val_sources, greedy=False, n=k, seed=1000 + seed,
                          top_p=0.8)
    result = {"arm": arm, "seed": seed, "curve": curve, "seconds": time.time() - t0,
              f"avg@{k}": 100 * sum(sum(r) for r in sampled) / (k * len(sampled)),
              **{f"pass@{j}": 100 * sum(pass_at_k(k, int(sum(r)), j) for r in sampled) / len(sampled)
                 for j in range(1, k + 1)},
              **pair.claims_ab(student, ab_prompts, seed=2000),
              "train_metrics": {key: [h[key] for h in history if key in h]
                                for key in ("gate_frac", "student_entropy_mean", "rkl_mean", "fkl_high_entropy_mean")}}
    log(f"[mini_repro] {arm} seed {seed}: held-out greedy {100 * curve[0]:.1f}% -> {100 * curve[cfg.steps]:.1f}%, "
        f"Pass@{k} {result[f'pass@{k}']:.1f}, entropy {result['student_entropy']:.3f}, "
        f"FKL(H>tau) {result['fkl_high_entropy']:.3f} ({result['seconds']:.0f} s)")
    return result


def verdicts(results: dict[str, list[dict]], k: int, arms=("eopd", "eopd_quantile"), task: str = "") -> list[dict]:
    """Paired tests of each EOPD arm against OPD for every claim, Holm-corrected over this family (`correct`
    redoes the correction over several tasks' families)."""
    rows = []
    opd = sorted(results["opd"], key=lambda r: r["seed"])
    for arm in arms:
        if arm not in results:
            continue
        runs = sorted(results[arm], key=lambda r: r["seed"])
        assert [r["seed"] for r in runs] == [r["seed"] for r in opd], "arms must share seeds (paired design)"
        for claim, (key, sign) in claims(k).items():
            test = paired_t([r[key] for r in runs], [r[key] for r in opd])
            rows.append({"task": task, "arm": arm, "claim": claim, "key": key, "sign": sign, **asdict(test)})
    return correct(rows)


def correct(rows: list[dict]) -> list[dict]:
    """Holm-correct the p-values of `rows` as one family and label each: "holds" when the corrected p < 0.05
    with the claimed sign, "reversed" with the opposite sign, else "not shown"."""
    for row, p_holm in zip(rows, holm([r["p"] for r in rows])):
        row["p_holm"] = p_holm
        if p_holm < 0.05:
            row["verdict"] = "holds" if row["mean_diff"] * row["sign"] > 0 else "reversed"
        else:
            row["verdict"] = "not shown"
    return rows


def run(arms, seeds, cfg: LoopConfig, k: int, ab_prompts_n: int, out_dir: Path, log: Callable = print,
        task: str = "eopd_tiny_add") -> dict:
    """Train and evaluate every arm x seed on the task's embedded pair; returns everything measured (also
    written to out_dir/results.json)."""
    from ..cpu.embedded import embedded_pair

    info = embedded_pair(task=task, studied=True)  # the pair of docs/mini_repro.md's figures
    pair = _Pair(info)
    ab_prompts = random.Random(0).sample(pair.val, min(ab_prompts_n, len(pair.val)))
    t0 = time.time()
    results: dict[str, list[dict]] = {}
    for seed in seeds:  # seed-major: a partial run still has complete pairs
        for arm in arms:
            results.setdefault(arm, []).append(run_arm(pair, arm, seed, cfg, ab_prompts, k, log))
    student0 = pair.load(info["student"])
    refs = {"student_before_greedy": pair.greedy_accuracy(student0),
            "teacher_greedy": pair.greedy_accuracy(pair.teacher, teacher=True)}
    summary = {"task": task, "config": {**asdict(replace(cfg, settings=EOPDSettings())), "k": k,
                                        "ab_prompts": len(ab_prompts), "seeds": list(seeds), "arms": list(arms),
                                        "heldout_problems": len(pair.val)},
               "seconds": time.time() - t0, "references": refs, "results": results,
               "verdicts": verdicts(results, k, task=task) if "opd" in results and len(seeds) >= 2 else []}
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "results.json").write_text(json.dumps(summary, indent=1, default=str))
    return summary


def figures(summary: dict, fig_dir: Path) -> list[str]:
    """Held-out accuracy curves (mean +- std over seeds) and Pass@k by k, per arm."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig_dir.mkdir(parents=True, exist_ok=True)
    groups = {LABELS[a]: [{"heldout_greedy_accuracy": {int(s): v for s, v in r["curve"].items()}} for r in runs]
              for a, runs in summary["results"].items()}
    n = summary["config"].get("heldout_problems", "all")
    written = plot(groups, str(fig_dir), panels={f"held-out greedy accuracy ({n} problems)": "heldout_greedy_accuracy"})
    k = summary["config"]["k"]
    fig, ax = plt.subplots(figsize=(5.5, 3.8))
    for arm, runs in summary["results"].items():
        ks = list(range(1, k + 1))
        means = [sum(r[f"pass@{j}"] for r in runs) / len(runs) for j in ks]
        ax.plot(ks, means, marker="o", ms=3, label=f"{LABELS[arm]} (n={len(runs)})")
    ax.set_xlabel("k")
    ax.set_ylabel("held-out Pass@k (%)")
    ax.set_title(f"{summary.get('task', '')}: Pass@k, T = 1, top-p 0.8, mean over seeds", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return written + [save_figure(fig, fig_dir / "pass_at_k.png")]


def markdown(summary: dict) -> str:
    """One task's per-arm table (mean +- std over seeds), for docs/mini_repro.md."""
    cfg, refs, k = summary["config"], summary["references"], summary["config"]["k"]
    lines = [f"### {summary.get('task', 'eopd_tiny_add')} ({cfg.get('heldout_problems', '?')} held-out problems, "
             f"{summary['seconds'] / 60:.1f} min)", "",
             f"Seeds {cfg['seeds']}, paired across arms. {cfg['steps']} steps of {cfg['batch']} responses, "
             f"{cfg['ppo_epochs']} PPO epochs, lr {cfg['lr']}. Student before training: "
             f"{100 * refs['student_before_greedy']:.1f}% greedy on the held-out split; teacher "
             f"{100 * refs['teacher_greedy']:.1f}%.", "",
             f"| arm | held-out greedy, end (%) | Avg@{k} | Pass@1 | Pass@{min(8, k)} | Pass@{k} | student entropy | "
             "FKL on H > tau |",
             "|---|---|---|---|---|---|---|---|"]
    for arm, runs in summary["results"].items():
        def m(key, scale=1.0):
            vals = [scale * r[key] for r in runs]
            mu = sum(vals) / len(vals)
            sd = (sum((v - mu) ** 2 for v in vals) / max(1, len(vals) - 1)) ** 0.5
            return f"{mu:.2f} +- {sd:.2f}"
        ends = [100 * r["curve"][str(cfg["steps"])] if str(cfg["steps"]) in r["curve"] else 100 * r["curve"][cfg["steps"]]
                for r in runs]
        mu = sum(ends) / len(ends)
        sd = (sum((v - mu) ** 2 for v in ends) / max(1, len(ends) - 1)) ** 0.5
        lines.append(f"| {LABELS[arm]} | {mu:.1f} +- {sd:.1f} | {m(f'avg@{k}')} | {m('pass@1')} | {m(f'pass@{min(8, k)}')} | "
                     f"{m(f'pass@{k}')} | {m('student_entropy')} | {m('fkl_high_entropy')} |")
    return "\n".join(lines)


def verdict_table(rows: list[dict]) -> str:
    """The paired tests against OPD, one row per task x arm x claim."""
    lines = [f"Paired t-tests against OPD (EOPD arm minus OPD, per seed), Holm-corrected over all {len(rows)} tests:",
             "", "| task | arm | claim | mean difference [95% CI] | t (df) | p | p (Holm) | verdict |",
             "|---|---|---|---|---|---|---|---|"]
    for v in rows:
        lo, hi = v["ci95"]
        lines.append(f"| {v.get('task', '')} | {LABELS[v['arm']]} | {v['claim']} | {v['mean_diff']:+.3f} "
                     f"[{lo:+.3f}, {hi:+.3f}] | {v['t']:.2f} ({v['df']}) | {v['p']:.3g} | {v['p_holm']:.3g} | "
                     f"{v['verdict']} |")
    return "\n".join(lines)
