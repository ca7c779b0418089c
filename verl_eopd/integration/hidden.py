"""EOPD without the [tokens, V] logits inside verl's FSDP engine (`distillation.distillation_loss.from_hidden`).

The model still runs its own forward under FSDP (so every parameter is gathered, offloaded and reduced as
verl does); only its lm head's forward is replaced (HiddenCapture): it receives the last hidden states h [.., H]
and holds the gathered weight W [V, H] (tied to the input embedding or not), and returns the per-row results
computed from them instead of logits. Then:

    actor  (EOPDHiddenActorEngine): the EOPD processor's student pass is `student_logprobs_at_from_hidden`
           (core/kernels.py; W h per chunk, recomputed in backward), log pi(y) for verl's old log-probs and the
           task loss from the same pass; the rest (teacher top-k slicing, estimates, the loss) is unchanged.
    teacher (EOPDTeacherEngine with from_hidden): `teacher_stats_from_hidden`.
Refused: an lm head with a bias or not a Linear, a model that does not return its head's output as `logits`,
per-sample temperatures,
entropy_coeff != 0 (the entropy from hidden states is a detached metric), verl's fused kernels, sum_pi_squared.
"""

from __future__ import annotations

import dataclasses
from functools import partial
import torch

from ..core.kernels import HostChecks, collect_checks

ACTOR_MODEL_TYPE = "eopd_actor_hidden"


class HiddenCapture:
    """Runs `pending(h, W)` as the lm head's forward: h [..., H] the decoder's last hidden states (after the final
    norm) and W [V, H] the lm head's weight as FSDP holds it there (gathered: the lm head is its own FSDP unit,
    or the root's when tied). The result, a dict of per-row tensors, travels out of the model as `output.logits`,
    so FSDP hooks its backward onto it as onto any output and gathers W again before the chunked kernels'
    backward reads it. With nothing pending the head is the plain linear map."""

    def __init__(self):
        self.pending = None  # set for each forward by the engine: (h, W) -> dict of per-row tensors

    def attach(self, module: torch.nn.Module, name: str) -> None:
        import types

        head = module.get_output_embeddings() if hasattr(module, "get_output_embeddings") else None
        if not isinstance(head, torch.nn.Linear):
            raise ValueError(f"distillation.distillation_loss.from_hidden=true: the {name} ({type(module).__name__}) "
                             "has no Hugging Face get_output_embeddings() linear lm head. Fix: from_hidden=false")
        if head.bias is not None:
            raise ValueError(f"distillation.distillation_loss.from_hidden=true: the {name}'s lm head has a bias; "
                             "the hidden-state kernels take logits = h W^T. Fix: from_hidden=false")
        capture = self

        def forward(head_self, hidden: torch.Tensor):
            pending, capture.pending = capture.pending, None
            if pending is None:
                return torch.nn.functional.linear(hidden, head_self.weight)
            w = head_self.weight
            if hasattr(w, "full_tensor"):  # a DTensor lm head (tensor parallel): the whole vocabulary
                w = w.full_tensor()
            # views (e.g. one column of the student's log-probs) are cloned: FSDP's backward hook on a view is lost
            # to any later in-place op on it; these are [tokens]-sized, not [tokens, V]
            return {k: v.clone() if v._is_view() else v for k, v in pending(hidden, w).items()}

        head.forward = types.MethodType(forward, head)

    @staticmethod
    def result(output, name: str) -> dict:
        rows = getattr(output, "logits", None)
        if not isinstance(rows, dict):
            raise RuntimeError(f"from_hidden: the {name} model did not return its lm head's output as `logits`; "
                               "this model class is not supported. Fix: distillation.distillation_loss.from_hidden=false")
        return rows


def scalar_temperature(micro_batch, checks: HostChecks):
    """The micro-batch's one temperature (verl allows one per sample; the hidden-state kernels take one): verl's
    host number as a float; a per-sample tensor as its first value, a 0-d fp32 tensor on the device, with the
    check that all are equal a flag in `checks` (no host read here)."""
    t = micro_batch["temperature"]
    if not isinstance(t, torch.Tensor):
        return float(t)
    vals = (t.values() if t.is_nested else t).reshape(-1)
    if not vals.numel():
        raise ValueError("the micro-batch's temperature tensor is empty")

    def fail():
        raise ValueError("distillation.distillation_loss.from_hidden=true needs one temperature per micro-batch, "
                         f"got {torch.unique(vals).tolist()[:4]}. Fix: from_hidden=false")

    checks.add((vals != vals[0]).any(), fail, "one temperature per micro-batch (from_hidden)")
    return vals[0].float()


def packed_rows(hidden: torch.Tensor, micro_batch, use_rmpad: bool) -> torch.Tensor:
    """Per-token rows (hidden states [.., H] or logits [.., V]) packed [n, ...] in the layout verl gives the logits
    processor: [(nnz / sp) + pad, ...] with remove-padding, else each sequence's first len rows of the padded
    [B, S, ...], concatenated (gathered with the row index found on the device: no host read of the lengths)."""
    if use_rmpad:
        return hidden.squeeze(0)
    input_ids = micro_batch["input_ids"]
    offsets = input_ids.offsets().to(hidden.device)
    row = torch.arange(input_ids.values().shape[0], device=hidden.device)
    seq = torch.searchsorted(offsets[1:], row, right=True)  # the sequence of each packed row
    return hidden[seq, row - offsets[seq]]


def pack_outputs(engine, out: dict, micro_batch, output_args, use_rmpad: bool) -> dict:
    """Per-row outputs [n, ...] -> nested per sequence (gathered over Ulysses SP and unpadded with remove-padding),
    as verl's prepare_model_outputs returns them."""
    cu_seqlens = micro_batch["input_ids"].offsets()
    packed = {}
    for key, v in out.items():
        if use_rmpad:
            v = engine._gather_and_unpad_packed(v, output_args["pad_size"])
        packed[key] = torch.nested.nested_tensor_from_jagged(v, cu_seqlens)
    return packed


_ACTOR = []


FROM_HIDDEN_LINE = "actor engine: EOPD terms from the last hidden states and the lm head (from_hidden=true)"


def actor_engine_class():
    """verl's FSDP language-model engine with the student pass from hidden states (registered on first use)."""
    if _ACTOR:
        return _ACTOR[0]
    from verl.utils import tensordict_utils as tu
    from verl.workers.engine import EngineRegistry
    from verl.workers.engine.fsdp.transformer_impl import FSDPEngineWithLMHead

    from ..core.kernels import student_logprobs_at_from_hidden
    from ..core.settings import DEFAULT_LOGITS_CHUNK_MB

    @EngineRegistry.register(model_type=ACTOR_MODEL_TYPE, backend=["fsdp", "fsdp2"], device=["cuda", "npu"])
    class EOPDHiddenActorEngine(FSDPEngineWithLMHead):
        """The actor's engine for from_hidden: no logits; log-probs and the EOPD student terms from h and W."""

        def __init__(self, model_config, *args, **kwargs):
            model_config.model_type = "language_model"  # FSDPEngine builds the module by this name
            super().__init__(model_config, *args, **kwargs)
            self._capture = HiddenCapture()
            self._loss_function = None
            print(f"[verl_eopd] {FROM_HIDDEN_LINE}", flush=True)  # one line per actor rank (Ray forwards it)

        def _build_module(self):
            module = super()._build_module()
            self._capture.attach(module, "student")
            return module

        def forward_step(self, micro_batch, loss_function, forward_only):
            self._loss_function = loss_function  # the EOPD processor's configs, read inside the forward
            return super().forward_step(micro_batch, loss_function, forward_only)

        def prepare_model_inputs(self, micro_batch):
            model_inputs, output_args = super().prepare_model_inputs(micro_batch)
            self._capture.pending = partial(self._rows, micro_batch, output_args)
            return model_inputs, output_args

        def _rows(self, micro_batch, output_args, hidden, weight) -> dict:
            """Per packed row [n]: log pi(y), the entropy and (top-k distillation) the EOPD processor's terms."""
            get = partial_get(tu, micro_batch)
            if get("use_fused_kernels", False) or get("calculate_sum_pi_squared", False):
                raise ValueError("distillation.distillation_loss.from_hidden=true excludes verl's fused kernels and "
                                 "sum_pi_squared. Fix: actor_rollout_ref.model.use_fused_kernels=false")
            use_rmpad = get("use_remove_padding", True)
            only, entropy = get("distillation_only", False), get("calculate_entropy", False)
            h = packed_rows(hidden, micro_batch, use_rmpad)
            V = weight.shape[0]
            out = {}
            if get("distillation_use_topk", False):  # the EOPD loss follows: it reads these checks (loss.py)
                from .loss import micro_batch_checks

                checks = micro_batch_checks()
            else:  # verl's log-prob pass: read here, once, across ranks
                checks = HostChecks(across_ranks=True)
            with collect_checks(checks):
                self._rows_into(out, checks, micro_batch, output_args, h, weight, V, get, only, entropy)
            if not get("distillation_use_topk", False):
                checks.read()
            return out

        def _rows_into(self, out, checks, micro_batch, output_args, h, weight, V, get, only, entropy) -> None:
            temperature = scalar_temperature(micro_batch, checks)
            if get("distillation_use_topk", False):
                def student_pass(index, chunk_bytes):
                    return student_logprobs_at_from_hidden(h, weight, index, temperature=temperature,
                                                           with_entropy=True, chunk_bytes=chunk_bytes)

                fn = self._loss_function
                func, kw = getattr(fn, "func", fn), getattr(fn, "keywords", {})
                from .loss import eopd_ppo_loss, eopd_student_outputs

                if func is not eopd_ppo_loss:
                    raise ValueError("distillation.distillation_loss.from_hidden=true needs the EOPD actor loss "
                                     "(loss_mode=eopd); verl's own top-k losses read the logits")
                outputs = eopd_student_outputs(kw["config"], kw["distillation_config"], micro_batch, h.shape[0], V,
                                               student_pass, checks=checks)
                out.update({k: v.squeeze(0) for k, v in outputs.items()})
                if not only:
                    out["log_probs"] = out["eopd_logp"]
                if entropy:
                    out["entropy"] = out["eopd_student_entropy"]
            else:  # verl's old log-probs / log-prob passes: log pi(y) (and the entropy) from h
                labels = output_args["input_ids_rmpad_rolled"].reshape(-1).long().clamp(0, V - 1)
                lq, ent = student_logprobs_at_from_hidden(h, weight, labels.unsqueeze(-1), temperature=temperature,
                                                          with_entropy=entropy,
                                                          chunk_bytes=DEFAULT_LOGITS_CHUNK_MB * 2**20)
                if not only:
                    out["log_probs"] = lq[:, 0]
                if entropy:
                    out["entropy"] = ent

        def prepare_model_outputs(self, output, output_args, micro_batch, logits_processor_func):
            rows = HiddenCapture.result(output, "student")
            use_rmpad = tu.get_non_tensor_data(data=micro_batch, key="use_remove_padding", default=True)
            return pack_outputs(self, rows, micro_batch, output_args, use_rmpad)

    _ACTOR.append(EOPDHiddenActorEngine)
    return EOPDHiddenActorEngine


def partial_get(tu, micro_batch):
    return lambda key, default: tu.get_non_tensor_data(data=micro_batch, key=key, default=default)


_WORKER = []


def actor_worker_class():
    """verl's TrainingWorker building the from_hidden actor engine."""
    if _WORKER:
        return _WORKER[0]
    from verl.workers.engine_workers import TrainingWorker

    actor_engine_class()

    class EOPDHiddenActorWorker(TrainingWorker):
        def __init__(self, config):
            super().__init__(dataclasses.replace(config, model_type=ACTOR_MODEL_TYPE))

    _WORKER.append(EOPDHiddenActorWorker)
    return EOPDHiddenActorWorker
