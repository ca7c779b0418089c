"""A plain PyTorch on-policy distillation loop around verl_eopd's own objective: the lighter harness of the
mini reproduction (verl's trainer is the reference; tests/test_e2e_cpu.py and docs/mini_repro.md compare).

One step = what verl's trainer does with `train_batch_size = ppo_mini_batch_size` and one PPO epoch:
    sample      the student generates one response per prompt (temperature 1, Hugging Face `generate`)
    old         log pi_old(y_t) by a forward pass of the student before the update (verl's recomputed
                `old_log_probs`), so r_t = 1 at the update, as on verl's first mini-batch
    teacher     the first student end token of each response becomes the teacher's (core.eos), the teacher
                scores the response at temperature 1, `core.kernels.teacher_stats` gives top-k, exact entropy
                and log pi_T(y_t); the teacher's end token is mapped back in the top-k
    update      `core.objective.eopd_loss` (token-mean over the batch), AdamW, gradient clipping
With `task_rewards` (verl's `eopd_grpo`): `rollouts_per_prompt` responses per prompt, the task reward scores
each, GRPO's group-normalised advantage and PPO's clipped policy loss (`grpo_advantages`, `ppo_policy_loss`:
verl's outcome GRPO and vanilla PPO loss, tests/test_loop.py compares them) are added to
`distillation_coef` x the EOPD loss, as verl's `distillation_ppo_loss` adds them.
Only the objective, teacher statistics and EOS remap are verl_eopd's; the rest is the smallest loop that
feeds them, so a result here says what the objective does, not what verl's scheduling does.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass, field
from typing import Callable, Optional

import torch

from ..core.eos import map_teacher_eos_in_topk
from ..core.kernels import teacher_stats
from ..core.objective import eopd_loss
from ..core.settings import EOPDSettings


@dataclass
class LoopConfig:
    steps: int = 200
    batch: int = 256  # sequences per optimizer step (= prompts per rollout batch, one response each)
    lr: float = 1e-3
    weight_decay: float = 0.01
    grad_clip: float = 1.0
    max_new_tokens: int = 16
    topk: int = 16
    temperature: float = 1.0
    seed: int = 0
    eval_every: int = 25
    ppo_epochs: int = 1  # updates per rollout batch (verl's actor.ppo_epochs); later ones are PPO-clipped
    settings: EOPDSettings = field(default_factory=EOPDSettings)
    rollouts_per_prompt: int = 1  # verl's rollout.n: batch / n prompts per step, each sampled n times
    task_rewards: bool = False  # add GRPO on the task reward (verl's use_task_rewards, algorithm=eopd_grpo)
    distillation_coef: float = 1.0  # verl's distillation_loss_coef: weight of EOPD next to the GRPO loss
    clip_ratio: float = 0.2  # GRPO's PPO clip (verl's clip_ratio_low = clip_ratio_high)
    clip_ratio_c: float = 3.0  # GRPO's dual clip for negative advantages (verl's clip_ratio_c)
    random_gate: bool = False  # the random-gate control: see `random_gate_entropy` (needs settings.gate "hard")


def grpo_advantages(scores: torch.Tensor, group: int, eps: float = 1e-6) -> torch.Tensor:
    """Outcome GRPO advantages [B] of B = prompts x `group` scores (a prompt's responses adjacent):
        A_i = (s_i - mean_g) / (std_g + eps),   std unbiased; a group of one keeps A_i = s_i (verl: mean 0, std 1)
    """
    if group == 1:
        return scores.clone()
    g = scores.view(-1, group)
    return ((g - g.mean(-1, keepdim=True)) / (g.std(-1, keepdim=True) + eps)).reshape(-1)


def ppo_policy_loss(logp: torch.Tensor, old: torch.Tensor, adv: torch.Tensor, mask: torch.Tensor, clip: float,
                    clip_c: float) -> torch.Tensor:
    """PPO's clipped policy loss, token-mean over mask; logp, old, mask [B, R], adv [B] (one per response):
        r_t = exp(logp_t - old_t),  l_t = max(-A r_t, -A clip(r_t, 1 - clip, 1 + clip)),  and for A < 0
        l_t = min(l_t, -A clip_c) (dual clip);  L = sum_t mask_t l_t / sum_t mask_t
    """
    a = adv[:, None].to(logp.dtype)
    ratio = torch.exp((logp - old).clamp(-20.0, 20.0))
    clipped = torch.maximum(-a * ratio, -a * ratio.clamp(1 - clip, 1 + clip))
    per_token = torch.where(a < 0, torch.minimum(clipped, -a * clip_c), clipped)
    m = mask.to(logp.dtype)
    return (per_token * m).sum() / m.sum().clamp_min(1.0)


def _left_pad(seqs: list[list[int]], pad: int) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad, dtype=torch.long)
    mask = torch.zeros(len(seqs), width, dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, width - len(s):] = torch.tensor(s)
        mask[i, width - len(s):] = 1
    return ids, mask


@torch.no_grad()
def generate(model, prompts: list[list[int]], *, max_new_tokens: int, eos_id: int, pad_id: int,
             greedy: bool = False, temperature: float = 1.0, top_p: float = 1.0, chunk: int = 512) -> list[list[int]]:
    """Responses (token ids, ending with the end token when the model stopped) for each prompt."""
    out = []
    for s in range(0, len(prompts), chunk):
        ids, mask = _left_pad(prompts[s:s + chunk], pad_id)
        kw = dict(do_sample=False) if greedy else dict(do_sample=True, temperature=temperature, top_p=top_p, top_k=0)
        seq = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=max_new_tokens, eos_token_id=eos_id,
                             pad_token_id=pad_id, **kw)[:, ids.shape[1]:]
        for row in seq.tolist():
            resp = []
            for t in row:
                resp.append(t)
                if t == eos_id:
                    break
            out.append(resp)
    return out


def _response_logits(model, prompts: list[list[int]], responses: list[list[int]], pad_id: int):
    """Logits [B, R, V] at the response positions (row t predicts y_t), ids [B, R], mask [B, R]."""
    seqs = [p + r for p, r in zip(prompts, responses)]
    ids, attn = _left_pad(seqs, pad_id)
    R = max(len(r) for r in responses)
    logits = model(input_ids=ids, attention_mask=attn).logits  # [B, L, V]
    L = ids.shape[1]
    resp_ids = torch.full((len(seqs), R), pad_id, dtype=torch.long)
    mask = response_mask(responses)
    rows = torch.zeros(len(seqs), R, dtype=torch.long)
    for b, r in enumerate(responses):
        start = L - len(r)  # left padding: the response ends at the last column
        resp_ids[b, :len(r)] = torch.tensor(r)
        rows[b, :len(r)] = torch.arange(start - 1, L - 1)
        rows[b, len(r):] = L - 2
    gathered = logits.gather(1, rows.unsqueeze(-1).expand(-1, -1, logits.shape[-1]))
    return gathered, resp_ids, mask


def accuracy(model, prompts, answers, score: Callable, data_sources, *, max_new_tokens: int, eos_id: int,
             pad_id: int, decode: Callable, greedy: bool = True, temperature: float = 1.0, top_p: float = 1.0) -> float:
    """Mean verifiable reward `score(data_source, decode(response), answer)` of one response per prompt."""
    resp = generate(model, prompts, max_new_tokens=max_new_tokens, eos_id=eos_id, pad_id=pad_id, greedy=greedy,
                    temperature=temperature, top_p=top_p)
    return sum(score(ds, decode(r), a) for r, a, ds in zip(resp, answers, data_sources)) / len(prompts)


def held_out_accuracy(model_dir: str, info: dict) -> float:
    """Greedy accuracy of the model in `model_dir` (its own tokenizer and end token) on an embedded pair's
    held-out split (`info["val"]`, verl's validation set of the default run; 16 new tokens at most)."""
    import pandas as pd
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from ..cpu.embedded import compute_score

    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, attn_implementation="sdpa")
    rows = pd.read_parquet(info["val"]).to_dict("records")
    prompts = [tok(tok.apply_chat_template(list(r["prompt"]), tokenize=False, add_generation_prompt=True),
                   add_special_tokens=False)["input_ids"] for r in rows]
    return accuracy(model, prompts, [r["reward_model"]["ground_truth"] for r in rows], compute_score,
                    [r["data_source"] for r in rows], max_new_tokens=16, eos_id=tok.eos_token_id,
                    pad_id=tok.pad_token_id, decode=lambda y: tok.decode(y, skip_special_tokens=True))


@torch.no_grad()
def teacher_statistics(teacher, prompts: list[list[int]], responses: list[list[int]], *, topk: int, student_eos: int,
                       teacher_eos: int, pad_id: int) -> dict[str, torch.Tensor]:
    """`core.kernels.teacher_stats` of the teacher on the student's responses [B, R]: the teacher scores its copy
    (first student end token -> the teacher's), and its end token is mapped back in the top-k ids."""
    t_resp = []
    for r in responses:
        r = list(r)
        if student_eos != teacher_eos and student_eos in r:
            r[r.index(student_eos)] = teacher_eos
        t_resp.append(r)
    t_logits, t_ids, _ = _response_logits(teacher, prompts, t_resp, pad_id)
    ts = teacher_stats(t_logits, t_ids, topk)
    if student_eos != teacher_eos:
        ts["topk_ids"] = map_teacher_eos_in_topk(ts["topk_ids"], student_eos, teacher_eos)
    return ts


def response_mask(responses: list[list[int]]) -> torch.Tensor:
    """[B, R] bool, True on each response's tokens (R = the longest response; the layout of `_response_logits`)."""
    mask = torch.zeros(len(responses), max(len(r) for r in responses), dtype=torch.bool)
    for b, r in enumerate(responses):
        mask[b, :len(r)] = True
    return mask


def random_gate_seed(seed: int, step: int) -> int:
    """The random gate's generator seed for a run's seed and step (distinct for every (seed, step) pair with
    0 <= step < 1,000,003)."""
    return seed * 1_000_003 + step


def random_gate_entropy(teacher_entropy: torch.Tensor, mask: torch.Tensor, tau: float,
                        generator: torch.Generator) -> tuple[torch.Tensor, int]:
    """The random-gate control: a stand-in teacher entropy [B, R] under which the hard gate 1[H > tau] opens on
    exactly n = #{valid t : H_t > tau} tokens (the count the entropy-aware gate opens in this batch), drawn
    uniformly at random without replacement among the valid tokens: tau + 1 there, 0 elsewhere. Returns
    (stand-in entropy, n). teacher_entropy [B, R] nats, mask [B, R] bool."""
    valid = mask.bool().reshape(-1).nonzero().squeeze(-1)
    n_open = int(((teacher_entropy > tau) & mask.bool()).sum())
    chosen = valid[torch.randperm(valid.numel(), generator=generator)[:n_open]]
    stand_in = torch.zeros(teacher_entropy.numel(), dtype=torch.float32)
    stand_in[chosen] = float(tau) + 1.0
    return stand_in.view(teacher_entropy.shape), n_open


def _norm(grads) -> float:
    return float(torch.sqrt(sum((g.double() ** 2).sum() for g in grads if g is not None)))


def distill(student, teacher, train_prompts: list[list[int]], cfg: LoopConfig, *, student_eos: int, teacher_eos: int,
            pad_id: int, evaluate: Optional[Callable[[int], dict]] = None, log: Callable = print,
            reward: Optional[Callable[[int, list[int]], float]] = None) -> list[dict]:
    """Run cfg.steps on-policy distillation steps; returns per-step records (loss stats, and eval when due).
    `reward(prompt_index, response_ids)`: the task reward, needed with cfg.task_rewards."""
    n = cfg.rollouts_per_prompt
    if cfg.batch % n:
        raise ValueError(f"LoopConfig.batch ({cfg.batch}) must be a multiple of rollouts_per_prompt ({n})")
    if cfg.task_rewards and reward is None:
        raise ValueError("LoopConfig.task_rewards needs distill(..., reward=...)")
    if cfg.random_gate and cfg.settings.gate != "hard":
        raise ValueError(f"LoopConfig.random_gate matches the hard gate's token count, but settings.gate is "
                         f"{cfg.settings.gate!r}. Fix: use EOPDSettings(gate='hard') with random_gate=True")
    rng = random.Random(cfg.seed)
    torch.manual_seed(cfg.seed)
    opt = torch.optim.AdamW(student.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    teacher.eval()
    history = []
    if evaluate is not None:
        history.append({"step": 0, **evaluate(0)})
    order: list[int] = []
    for step in range(1, cfg.steps + 1):
        if len(order) < cfg.batch // n:
            more = list(range(len(train_prompts)))
            rng.shuffle(more)
            order += more
        picked, order = [i for i in order[:cfg.batch // n] for _ in range(n)], order[cfg.batch // n:]
        batch = [train_prompts[i] for i in picked]
        student.eval()
        responses = generate(student, batch, max_new_tokens=cfg.max_new_tokens, eos_id=student_eos, pad_id=pad_id,
                             temperature=cfg.temperature)
        ts = teacher_statistics(teacher, batch, responses, topk=cfg.topk, student_eos=student_eos,
                                teacher_eos=teacher_eos, pad_id=pad_id)
        gate_entropy, task = ts["entropy"], {}
        if cfg.random_gate:  # one draw per rollout batch, the same tokens for every PPO epoch
            valid = response_mask(responses)
            gen = torch.Generator().manual_seed(random_gate_seed(cfg.seed, step))
            gate_entropy, n_open = random_gate_entropy(ts["entropy"], valid, cfg.settings.entropy_threshold, gen)
            task["hard_gate_frac"] = n_open / max(1, int(valid.sum()))
        if cfg.task_rewards:
            scores = torch.tensor([float(reward(i, r)) for i, r in zip(picked, responses)])
            adv = grpo_advantages(scores, n)
            task["score"] = float(scores.mean())
        student.train()
        old = None
        for _ in range(cfg.ppo_epochs):
            s_logits, ids, mask = _response_logits(student, batch, responses, pad_id)
            if old is None:  # log pi_old: the policy that sampled, before this batch's first update
                old = torch.log_softmax(s_logits.detach().float(), -1).gather(-1, ids.unsqueeze(-1)).squeeze(-1)
            loss, stats = eopd_loss(s_logits, ids, old, ts["topk_ids"], ts["topk_logprobs"], mask, cfg.settings,
                                    teacher_entropy=gate_entropy, teacher_token_logprobs=ts["token_logprobs"])
            if cfg.task_rewards:
                logp = torch.log_softmax(s_logits.float(), -1).gather(-1, ids.unsqueeze(-1)).squeeze(-1)
                pg = ppo_policy_loss(logp, old, adv, mask, cfg.clip_ratio, cfg.clip_ratio_c)
                if "pg_grad_norm" not in task and evaluate is not None and step % cfg.eval_every in (0, 1):
                    # the two terms' scales: gradient norms of each alone (first epoch of evaluated steps)
                    params = [p for p in student.parameters() if p.requires_grad]
                    g_pg = torch.autograd.grad(pg, params, retain_graph=True, allow_unused=True)
                    g_d = torch.autograd.grad(loss, params, retain_graph=True, allow_unused=True)
                    task["pg_grad_norm"] = _norm(g_pg)
                    task["distill_grad_norm"] = _norm(g_d)
                task["pg_loss"] = float(pg.detach())
                loss = pg + cfg.distillation_coef * loss
            opt.zero_grad()
            loss.backward()
            grad_norm = float(torch.nn.utils.clip_grad_norm_(student.parameters(), cfg.grad_clip))
            opt.step()
        rec = {"step": step, "grad_norm": grad_norm, **stats, **task}
        if evaluate is not None and (step % cfg.eval_every == 0 or step == cfg.steps):
            rec.update(evaluate(step))
        history.append(rec)
        if "acc" in rec or step == 1:
            log(f"[loop] step {step}: loss {stats['loss']:.3f} rkl {stats['rkl_mean']:.3f} gate {stats['gate_frac']:.3f}"
                + (f" acc {rec['acc']:.3f}" if "acc" in rec else ""))
        if not math.isfinite(float(loss.detach())):
            raise FloatingPointError(f"loss is {float(loss.detach())} at step {step}")
    return history
