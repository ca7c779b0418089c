"""The EOPD loss inside verl: the student-side logits processor, the registered `eopd` loss, and the loss
function the EOPD worker binds to its actor.

Data flow inside verl's FSDP engine (one micro-batch):
    engine forward -> student logits [1, nnz, V]
      -> `eopd_logits_processor` (per token, 1-D): eopd_fkl, eopd_logp (both differentiable),
         eopd_student_entropy, teacher-side top-k quantities
      -> verl packs them as nested tensors into model_output
    -> `eopd_distillation_loss` (registered loss): [B, R] per-token RKL surrogate + fkl_coef * g * FKL
    -> verl's `distillation_loss` aggregates (loss_agg_mode, global token count) and adds task PPO loss.

verl 0.9.1's `distillation_ppo_loss` sends every top-k loss to its built-in forward-KL processor
(`compute_topk_loss` ignores the loss name). Rather than rebinding that function globally, the EOPD worker
binds `eopd_ppo_loss` as its actor's loss: the processor call goes to `eopd_logits_processor`, the final
call to verl's `distillation_ppo_loss` (which finds `eopd_distillation_loss` in verl's registry).

Host reads (docs/gpu.md): one per micro-batch forward on this path, none in backward. The processor's bad-input
checks (token column, NaN rows, a from_hidden micro-batch's temperatures) stay on the device as flags in the
micro-batch's `HostChecks` (`micro_batch_checks`), which the registered loss reads once, with its own checks and
the metrics. The read is made across ranks (`HostChecks(across_ranks=True)`): a check that fails on one rank stops
every rank at that read, none waits in the next collective.
"""

from __future__ import annotations

import os
from typing import Any, Optional

import torch

from ..core.kernels import HostChecks, collect_checks, student_logprobs_at
from ..core.objective import eopd_stats, eopd_token_losses
from ..core.settings import EOPDSettings
from ..core.topk import estimated_entropy, fkl_topk, token_logprob_from_topk, valid_topk

LOSS_NAME = "eopd"


_PENDING: list[HostChecks] = []  # the processor's checks of the current micro-batch, read by its loss


def micro_batch_checks() -> HostChecks:
    """The checks of a new micro-batch's forward pass, gathered on the device (processor, kernels) and read once, across
    ranks, by the micro-batch's loss (`eopd_distillation_loss`). Checks of an earlier micro-batch that no loss read
    (not on verl's paths: its engine calls the loss after every processor call) are read first."""
    while _PENDING:
        stale = _PENDING.pop()
        if not stale.done:
            stale.read()
    checks = HostChecks(across_ranks=True)
    _PENDING.append(checks)
    return checks


def _loss_checks() -> HostChecks:
    """The micro-batch's checks left by its processor, or new ones (a loss called on its own, e.g. in tests)."""
    checks = _PENDING.pop() if _PENDING else None
    return checks if checks is not None and not checks.done else HostChecks(across_ranks=True)


def _pad_responses(t: torch.Tensor, R: int, fill=0) -> torch.Tensor:
    """A per-response batch field as a padded [B, R, ...] tensor: dense fields as they are; nested ones (verl ships
    jagged tensors in micro-batches) gathered on the device (`to_padded_tensor` reads the lengths on the host)."""
    if not t.is_nested:
        return t
    values, offsets = t.values(), t.offsets()
    pos = torch.arange(R, device=offsets.device)
    valid = pos < offsets.diff()[:, None]  # [B, R]
    idx = torch.where(valid, offsets[:-1, None] + pos, torch.zeros_like(pos))
    out = values[idx.clamp(max=max(values.shape[0] - 1, 0))] if values.shape[0] else values.new_zeros(*idx.shape,
                                                                                                     *values.shape[1:])
    return torch.where(valid.reshape(*valid.shape, *[1] * (out.dim() - 2)), out, torch.full_like(out, fill))


class _Responses:
    """verl's packed rows -> the [B, R] response layout (row j predicts token j + 1), the values of verl's
    `no_padding_2_padding`, with the row index found on the device once per micro-batch (verl's function reads the
    lengths and offsets on the host for each tensor) and its asserts made as flags in `checks`.

    R is verl's `max_response_len` (set by `left_right_2_no_padding`); without it, nested responses' longest
    (one host read, only for micro-batches built outside verl) or the padded responses' width, as verl takes it.
    """

    def __init__(self, data, checks: HostChecks):
        from verl.utils import tensordict_utils as tu

        prompts, responses = data["prompts"], data["responses"]
        R = tu.get_non_tensor_data(data=data, key="max_response_len", default=-1)
        if prompts.is_nested:
            p_lens, r_lens = prompts.offsets().diff(), responses.offsets().diff()
            if R < 0:
                R = responses._maybe_max_seqlen if hasattr(responses, "_maybe_max_seqlen") else None
                R = int(r_lens.max()) if R is None else R
        else:
            mask = data["attention_mask"]
            p_lens, r_lens = mask[:, : prompts.shape[1]].sum(1), mask[:, prompts.shape[1]:].sum(1)
            R = responses.shape[1]
        ends = (p_lens + r_lens).cumsum(0)
        pos = torch.arange(int(R), device=ends.device)
        self.R, self.checks, self.end, self.sized = int(R), checks, ends[-1], set()
        self.valid = pos < r_lens[:, None]  # [B, R]
        self.rows = torch.where(self.valid, (ends - r_lens - 1)[:, None] + pos, torch.zeros_like(pos))
        checks.add(~(p_lens > 0).all(), lambda: _fail(f"a prompt of the micro-batch is empty (prompt lengths "
                                                      f"{p_lens.tolist()}); verl's layout needs at least one token"),
                   "prompts non-empty")

    def __call__(self, t: torch.Tensor) -> torch.Tensor:
        """Packed per-token t ([nnz, ...] or nested per sequence) -> [B, R, ...], 0 beyond each response."""
        values = t.values() if t.is_nested else t
        n = values.shape[0]
        if n not in self.sized:
            self.sized.add(n)
            end = self.end
            self.checks.add(end != n, lambda: _fail(f"the micro-batch's sequences cover {int(end)} packed rows but a "
                                                    f"per-token tensor has {n}"), "packed rows match the sequences")
        out = values[self.rows.clamp(0, max(n - 1, 0))]
        valid = self.valid.reshape(*self.valid.shape, *[1] * (out.dim() - 2))
        return torch.where(valid, out, torch.zeros((), dtype=out.dtype, device=out.device))


def _fail(message: str):
    raise ValueError(message)


def _rows(t: torch.Tensor, n: int, fill) -> torch.Tensor:
    """Pad or check the token axis (dim 0) of a per-token tensor to n rows (Ulysses pads the sequence)."""
    if t.shape[0] == n:
        return t
    if t.shape[0] > n:
        raise ValueError(f"teacher tensor has {t.shape[0]} token rows but the student logits have {n}")
    pad = torch.full((n - t.shape[0], *t.shape[1:]), fill, dtype=t.dtype, device=t.device)
    return torch.cat([t, pad], dim=0)


def _split_token_column(checks: HostChecks, t_ids: torch.Tensor, t_lp: torch.Tensor, labels: torch.Tensor, k: int,
                        offsets: torch.Tensor):
    """Column K of a [nnz, K + 1] server payload: the exact teacher log-prob of the token each row predicts
    (integration/server_route.py). Returns it as [nnz], or None for verl's plain [nnz, K] payload. That column's
    ids must be the next tokens: a flag in `checks`."""
    width = t_ids.shape[-1]
    if width == k:
        return None
    if width != k + 1:
        raise ValueError(f"teacher_ids has {width} columns; expected distillation_loss.topk={k} (verl's payload) or "
                         f"{k + 1} (with the exact sampled-token column). Fix: the same topk for teacher and loss")
    ids = t_ids[:, -1]
    real = torch.ones_like(ids, dtype=torch.bool)
    real[offsets[1:].long() - 1] = False  # the last row of each sequence is verl's dummy
    bad = real & (ids != labels)

    def fail():
        j = int(bad.nonzero()[0, 0])
        raise ValueError(f"teacher_ids[..., {k}] (the sampled-token column) holds token {int(ids[j])} at packed row {j} "
                         f"but the sequence's next token is {int(labels[j])}: the teacher scored other tokens")

    checks.add(bad.any(), fail, f"teacher_ids[..., {k}] (the sampled-token column) equal to the next tokens")
    return t_lp[:, -1]


def _eopd_config(distillation_config):
    """The EOPD loss config of verl's distillation config (anything carrying `EOPDSettings` as `.settings`,
    i.e. integration.config.EOPDLossConfig); a clear error for any other loss config."""
    cfg = distillation_config.distillation_loss
    if not isinstance(getattr(cfg, "settings", None), EOPDSettings):
        raise TypeError(
            "loss_mode=eopd needs distillation.distillation_loss._target_=verl_eopd.integration.config.EOPDLossConfig "
            f"(got {type(cfg).__name__}); the shipped configs set it"
        )
    return cfg


def inplace_cross_entropy_follows(data) -> bool:
    """True when verl computes the task log-probs of these same logits next with flash-attn's cross-entropy
    (`verl.utils.torch_functional.logprobs_from_logits`: the micro-batch is not `distillation_only`, i.e. task
    rewards or policy gradient are on, flash-attn is installed and VERL_DISABLE_FLASH_ATTN_CE is not 1).
    Its backward (`inplace_backward=True`) writes the gradient into the logits' storage without bumping
    their version counter, so anything that saved the logits for its own backward reads that gradient."""
    from verl.utils import tensordict_utils as tu
    from verl.utils import torch_functional as verl_F

    if tu.get_non_tensor_data(data=data, key="distillation_only", default=False):
        return False
    return (bool(getattr(verl_F, "FLAH_ATTN_CROSS_ENTROPY_LOSS_AVAILABLE", False))
            and os.environ.get("VERL_DISABLE_FLASH_ATTN_CE", "0") != "1")


def eopd_logits_processor(config, distillation_config, data, student_logits: torch.Tensor, data_format: str = "thd"):
    """Student-side EOPD terms, per packed token; called by verl's engine with the student logits.

    Args:
        student_logits: [1, nnz (/ sp), V] temperature-scaled student logits (grad enabled).
        data: verl micro-batch with nested `input_ids` [B, j], `teacher_ids` / `teacher_logprobs` [B, j, K]
            (row j predicts token j+1; the last row of each sequence is a dummy).
    Returns: dict of [1, nnz (/ sp)] tensors: eopd_fkl, eopd_logp (differentiable), eopd_student_entropy,
        eopd_topk_mass and, unless the batch carries the exact teacher fields, the top-k estimates
        eopd_teacher_entropy(_lower/_upper), eopd_teacher_token_logprob, eopd_in_topk.
    """
    logits = student_logits.squeeze(0)  # [n, V]
    if inplace_cross_entropy_follows(data):
        # the student log-prob kernel recomputes the softmax from its saved logits in backward; verl's in-place
        # cross-entropy backward may overwrite that storage first, so the kernel gets its own copy ([n, V],
        # only on this path; the gradient still reaches the logits through the copy)
        logits = logits.clone()

    def student_pass(index, chunk_bytes):
        return student_logprobs_at(logits, index, with_entropy=True, chunk_bytes=chunk_bytes)

    return eopd_student_outputs(config, distillation_config, data, logits.shape[0], logits.shape[1], student_pass)


def eopd_student_outputs(config, distillation_config, data, n: int, V: int, student_pass,
                         checks: Optional[HostChecks] = None):
    """The processor's outputs for n packed rows of a V-word student vocabulary, whatever holds the student:
    `student_pass(index [n, M], chunk_bytes) -> (log q [n, M] differentiable, entropy [n])` gives the student's
    full-vocabulary log-probs at `index` (from the logits here; from hidden states in integration/hidden.py).
    Its checks and the student pass's go to `checks` (default: a new `micro_batch_checks()`), read by the loss."""
    checks = micro_batch_checks() if checks is None else checks
    with collect_checks(checks):
        return _student_outputs(checks, config, distillation_config, data, n, V, student_pass)


def _student_outputs(checks: HostChecks, config, distillation_config, data, n: int, V: int, student_pass):
    if config.strategy not in ("fsdp", "fsdp2"):
        raise NotImplementedError(
            f"loss_mode=eopd supports actor strategy fsdp/fsdp2, got actor.strategy={config.strategy!r}"
        )
    from verl.utils.ulysses import get_ulysses_sequence_parallel_world_size, slice_input_tensor

    cfg = _eopd_config(distillation_config)
    settings = cfg.settings
    t_lp, t_ids, input_ids = data["teacher_logprobs"], data["teacher_ids"], data["input_ids"]
    if not (t_lp.is_nested and t_ids.is_nested and input_ids.is_nested):
        raise ValueError("eopd expects verl's no-padding micro-batches: teacher_logprobs, teacher_ids and input_ids nested")
    t_lp, t_ids = t_lp.values(), t_ids.values().long()  # [nnz, K] or [nnz, K + 1]
    labels = torch.roll(input_ids.values(), shifts=-1, dims=0).long()  # y_{j+1} for row j
    token_column = _split_token_column(checks, t_ids, t_lp, labels, int(cfg.topk), input_ids.offsets())
    if token_column is not None:
        t_ids, t_lp = t_ids[:, :-1], t_lp[:, :-1]
    if get_ulysses_sequence_parallel_world_size() > 1:
        t_lp = slice_input_tensor(t_lp.unsqueeze(0), dim=1).squeeze(0)
        t_ids = slice_input_tensor(t_ids.unsqueeze(0), dim=1).squeeze(0)
        labels = slice_input_tensor(labels.unsqueeze(0), dim=1).squeeze(0)
        if token_column is not None:
            token_column = slice_input_tensor(token_column.unsqueeze(0), dim=1).squeeze(0)
    t_lp = _rows(t_lp, n, float("-inf"))
    t_ids = _rows(t_ids, n, 0)
    labels = _rows(labels, n, 0).clamp(0, V - 1)  # dummy rows only; response labels are < V

    valid = valid_topk(t_lp, t_ids, V)
    index = torch.cat([torch.where(valid, t_ids, torch.zeros_like(t_ids)), labels.unsqueeze(-1)], dim=-1)
    lq, student_entropy = student_pass(index, settings.chunk_bytes)
    fkl, mass = fkl_topk(lq[:, :-1], t_lp, valid)
    out = {"eopd_fkl": fkl, "eopd_logp": lq[:, -1], "eopd_student_entropy": student_entropy, "eopd_topk_mass": mass}
    t_vocab = settings.teacher_vocab_size or V
    keys = set(data.keys())
    with torch.no_grad():  # top-k estimates, only where the batch lacks the exact teacher fields
        if "teacher_entropy" not in keys:
            out["eopd_teacher_entropy"], out["eopd_teacher_entropy_lower"], out["eopd_teacher_entropy_upper"] = (
                estimated_entropy(t_lp, t_vocab, settings.entropy_estimator, valid_topk(t_lp, t_ids)))
        if "teacher_token_logprob" not in keys:
            fallback, in_topk = token_logprob_from_topk(t_ids, t_lp, labels, t_vocab, valid)
            out["eopd_in_topk"] = in_topk.float()
            if token_column is not None:  # exact log pi_T(y) from the server (server_route.py)
                out["eopd_teacher_token_logprob"] = _rows(token_column, n, 0.0)
                out["eopd_token_fallback"] = torch.zeros_like(fallback)
            else:  # exact inside the top-k, the uniform-tail estimate outside it
                out["eopd_teacher_token_logprob"] = fallback
                out["eopd_token_fallback"] = (~in_topk).float()
    return {k: v.unsqueeze(0) for k, v in out.items()}


def eopd_distillation_loss(config, distillation_config, model_output: dict, data) -> tuple[torch.Tensor, dict[str, Any]]:
    """The registered `eopd` loss: per-token [B, R] EOPD loss and `eopd/*` metrics (verl adds `actor/`).

    Exact teacher quantities win over top-k estimates when the batch carries them: `teacher_entropy`
    [B, j] (exact full-vocabulary entropy) and `teacher_token_logprob` [B, j] (exact log pi_T(y)), in the
    same row layout as `teacher_logprobs` (the reference-worker teacher route fills them).
    """
    cfg = _eopd_config(distillation_config)
    checks = _loss_checks()  # the processor's checks of this micro-batch: read below, once, with the metrics
    with collect_checks(checks):
        return _distillation_loss(cfg, checks, model_output, data)


def _distillation_loss(cfg, checks: HostChecks, model_output: dict, data) -> tuple[torch.Tensor, dict[str, Any]]:
    missing = [k for k in ("eopd_fkl", "eopd_logp") if k not in model_output]
    if missing:
        raise RuntimeError(
            f"model_output lacks {missing}: verl did not call the EOPD logits processor. The EOPD worker binds it "
            "(trainer.v1.trainer_mode=eopd, set by algorithm=eopd|opd|eopd_grpo|eopd_server); also check "
            "actor_rollout_ref.model.use_fused_kernels=false and python -m verl_eopd.plugin"
        )

    resp = _Responses(data, checks)  # packed per-token (or nested) -> [B, R] (row j predicts token j+1)
    mask = _pad_responses(data["response_mask"], resp.R, 0).bool()
    old = _pad_responses(data["old_log_probs"], resp.R, 0.0)
    fkl, logp = resp(model_output["eopd_fkl"]), resp(model_output["eopd_logp"])
    keys = set(data.keys())
    exact_entropy = "teacher_entropy" in keys
    t_ent = resp(data["teacher_entropy"]) if exact_entropy else resp(model_output["eopd_teacher_entropy"])
    exact_token = "teacher_token_logprob" in keys
    t_tok = resp(data["teacher_token_logprob"]) if exact_token else resp(model_output["eopd_teacher_token_logprob"])
    rollout_is_weights = data.get("rollout_is_weights", None)
    if rollout_is_weights is not None:
        rollout_is_weights = _pad_responses(rollout_is_weights, resp.R, 0.0)

    per_token, parts = eopd_token_losses(logp, old, t_tok, fkl, t_ent, mask, rollout_is_weights=rollout_is_weights,
                                         settings=cfg.settings)
    stats = eopd_stats(
        parts, fkl=fkl, teacher_entropy=t_ent, old_log_probs=old, teacher_token_logprobs=t_tok,
        teacher_topk_mass=resp(model_output["eopd_topk_mass"]),
        in_topk=None if exact_token else resp(model_output["eopd_in_topk"]),
        token_fallback=None if exact_token else resp(model_output["eopd_token_fallback"]),
        entropy_threshold=cfg.entropy_threshold,
        student_entropy=resp(model_output["eopd_student_entropy"]),
        teacher_entropy_bounds=None if exact_entropy else (
            resp(model_output["eopd_teacher_entropy_lower"]), resp(model_output["eopd_teacher_entropy_upper"])),
        host=False,
    )
    stats.pop("n_tokens")
    # the one host read of the micro-batch: every check (processor, kernels, objective; across ranks) and the metrics
    values = checks.read(list(stats.values()))
    return per_token, {f"eopd/{k}": v for k, v in zip(stats, values)}


def eopd_ppo_loss(config, distillation_config, model_output: dict = None, data=None, dp_group=None,
                  student_logits: torch.Tensor = None, data_format: str = "thd"):
    """The actor's loss function in the EOPD worker; same signature and two roles as verl's
    `distillation_ppo_loss`: with `student_logits` it is the logits processor (EOPD's), without them the
    final loss (verl's, which calls the registered `eopd_distillation_loss` and adds the task PPO loss)."""
    from verl.trainer.distillation.losses import distillation_ppo_loss

    if student_logits is not None:
        return eopd_logits_processor(config, distillation_config, data, student_logits, data_format)
    return distillation_ppo_loss(config, distillation_config, model_output=model_output, data=data, dp_group=dp_group)


def register_loss() -> None:
    """Register loss_mode `eopd` in verl's distillation-loss registry (use_topk: the teacher ships its top-k
    and the engine calls the actor's loss as a logits processor). Idempotent."""
    from verl.trainer.distillation.losses import (
        DISTILLATION_LOSS_REGISTRY,
        DistillationLossSettings,
        register_distillation_loss,
    )

    current = DISTILLATION_LOSS_REGISTRY.get(LOSS_NAME)
    if current is None:
        register_distillation_loss(DistillationLossSettings(names=[LOSS_NAME], use_topk=True))(eopd_distillation_loss)
    elif current is not eopd_distillation_loss:
        raise RuntimeError(f"another package already registered distillation loss '{LOSS_NAME}': {current!r}")
