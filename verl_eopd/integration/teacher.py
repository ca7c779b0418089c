"""The teacher in verl's reference role: exact entropy and sampled-token log-prob, no extra GPU pool.

The reference worker of `ActorRolloutRefWorker` normally loads a copy of the actor. Here it loads the
teacher (`distillation.teacher_models.teacher_model.model_path`) with the same FSDP engine config as
the ref (param offload included), and its forward emits, per token, from the full teacher logits at
temperature 1 (whatever the rollout temperature):

    teacher_ids [j, K] int32, teacher_logprobs [j, K] fp32   the teacher's top-k and their log-probs
    teacher_entropy [j] fp32                                  exact full-vocabulary entropy
    teacher_token_logprob [j] fp32                            exact log pi_T of the next token

in verl's layout (row j predicts token j+1, nested per sequence), i.e. 8K + 8 bytes per token; full
logits never leave the worker. The actor's EOPD loss reads these fields (exact values win over top-k
estimates). The logits are visited in chunks (`core.kernels.teacher_stats`): one fp32 chunk at a time.

End-of-sequence remap (core/eos.py): a Base student ends with its own end token
(`<|endoftext|>`) where a chat teacher expects `<|im_end|>`. On the copy of the response the teacher
scores, the first student end token of each response becomes the teacher's, so the teacher judges
"stop here" with its own stop token; in the returned top-k ids the teacher's end token is mapped back to
the student's (rows that already hold the student's end token are left alone), so the forward KL
teaches the student to stop with the token its rollout actually stops on.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Optional

import torch

from ..core.eos import map_teacher_eos_in_topk, remap_first_eos
from ..core.kernels import read_across_ranks, teacher_stats
from ..core.settings import DEFAULT_LOGITS_CHUNK_MB

TEACHER_MODEL_TYPE = "eopd_teacher"


@dataclass(frozen=True)
class TeacherSettings:
    """What the teacher worker needs besides verl's ref config."""

    model_path: str
    topk: int
    student_eos_token_id: Optional[int] = None
    teacher_eos_token_id: Optional[int] = None
    logits_chunk_mb: int = DEFAULT_LOGITS_CHUNK_MB
    param_dtype: Optional[str] = None  # "bf16" | "fp32": the teacher's parameters (its offloaded copy); None: as loaded
    from_hidden: bool = False  # statistics from the last hidden states and the lm head, no [tokens, V] logits

    @property
    def remap_eos(self) -> bool:
        s, t = self.student_eos_token_id, self.teacher_eos_token_id
        return s is not None and t is not None and s != t


# ------------------------------------------------------------------------------------------------ batches


def response_lengths(data) -> torch.Tensor:
    """[B] response lengths of a verl batch (nested `responses`/`response_mask`, or padded + attention_mask)."""
    for key in ("responses", "response_mask"):
        if key in data.keys() and data[key].is_nested:
            return data[key].offsets().diff()
    prompt_width = data["prompts"].shape[1]
    return data["attention_mask"][:, prompt_width:].sum(-1)


# ------------------------------------------------------------------------------------------------ engine


_TEACHER_ENGINE = []  # registered once per process, on first use


def _teacher_engine_class():
    """FSDPEngineWithLMHead whose forward emits the teacher fields instead of log_probs (registered once)."""
    from verl.utils import tensordict_utils as tu
    from verl.workers.engine.base import EngineRegistry
    from verl.workers.engine.fsdp.transformer_impl import FSDPEngineWithLMHead

    if _TEACHER_ENGINE:
        return _TEACHER_ENGINE[0]

    @EngineRegistry.register(model_type=TEACHER_MODEL_TYPE, backend=["fsdp", "fsdp2"], device=["cuda", "npu", "cpu"])
    class EOPDTeacherEngine(FSDPEngineWithLMHead):
        """The reference engine, with EOPD teacher outputs computed from the full logits at T = 1."""

        def __init__(self, model_config, *args, **kwargs):
            model_config.model_type = "language_model"  # FSDPEngine builds the module by this name
            super().__init__(model_config, *args, **kwargs)

        eopd_param_dtype: Optional[str] = None  # set by TeacherTrainingWorker before initialize()
        eopd_from_hidden: bool = False  # likewise (integration/hidden.py)

        def _build_module(self):
            """verl's module, then the parameters (only) cast to `eopd_param_dtype`. The teacher is loaded as
            verl loads it (model_dtype fp32: RoPE frequencies and other buffers in fp32) and its parameters are
            then kept in bf16: half the memory of the offloaded copy, and no change to what FSDP computes with
            bf16 param_dtype. Loading with model_dtype=bf16 instead would also round the buffers (Transformers
            5 keeps `inv_freq` in the load dtype: each RoPE frequency off by up to 0.2%, the angle error growing with position)."""
            module = super()._build_module()
            if self.eopd_param_dtype is not None:
                from verl.utils.torch_dtypes import PrecisionType

                dtype = PrecisionType.to_dtype(self.eopd_param_dtype)
                for p in module.parameters():  # tied embeddings: one Parameter, cast once
                    p.data = p.data.to(dtype)
            if self.eopd_from_hidden:
                from .hidden import HiddenCapture

                self._capture = HiddenCapture()
                self._capture.attach(module, "teacher")
            return module

        def prepare_model_inputs(self, micro_batch):
            model_inputs, output_args = super().prepare_model_inputs(micro_batch)
            if self.eopd_from_hidden:  # the statistics are computed as the lm head's forward (hidden.HiddenCapture)
                from functools import partial

                self._capture.pending = partial(self._stats_from_hidden, micro_batch, output_args)
            return model_inputs, output_args

        def _stats_from_hidden(self, micro_batch, output_args, hidden, weight) -> dict:
            """teacher_stats from h and W at temperature 1 (no logits), per packed row."""
            from ..core.kernels import teacher_stats_from_hidden
            from .hidden import packed_rows

            k = tu.get_non_tensor_data(data=micro_batch, key="eopd_topk", default=None)
            if k is None:
                raise RuntimeError("the EOPD teacher engine with from_hidden only serves EOPD teacher passes")
            chunk_mb = int(tu.get_non_tensor_data(data=micro_batch, key="eopd_logits_chunk_mb",
                                                  default=DEFAULT_LOGITS_CHUNK_MB))
            use_rmpad = tu.get_non_tensor_data(data=micro_batch, key="use_remove_padding", default=True)
            h = packed_rows(hidden, micro_batch, use_rmpad)
            labels = output_args["input_ids_rmpad_rolled"].reshape(-1).clamp(0, weight.shape[0] - 1)
            # one read, across ranks: a NaN row on one rank stops every rank there
            return read_across_ranks(teacher_stats_from_hidden, h, weight, labels, int(k),
                                     chunk_bytes=chunk_mb * 2**20)

        def prepare_model_outputs(self, output, output_args, micro_batch, logits_processor_func):
            k = tu.get_non_tensor_data(data=micro_batch, key="eopd_topk", default=None)
            if k is None:  # plain reference log-probs
                return super().prepare_model_outputs(output, output_args, micro_batch, logits_processor_func)
            chunk_mb = int(tu.get_non_tensor_data(data=micro_batch, key="eopd_logits_chunk_mb", default=DEFAULT_LOGITS_CHUNK_MB))
            use_rmpad = tu.get_non_tensor_data(data=micro_batch, key="use_remove_padding", default=True)
            from .hidden import HiddenCapture, pack_outputs, packed_rows

            if self.eopd_from_hidden:  # computed inside the forward from h and W (_stats_from_hidden)
                stats = HiddenCapture.result(output, "teacher")
            else:
                labels = output_args["input_ids_rmpad_rolled"].reshape(-1)
                logits = output.logits
                if hasattr(logits, "full_tensor"):  # DTensor (tensor parallel): gather the vocabulary
                    logits = logits.full_tensor()
                # packed [(nnz / sp) + pad, V] (or [nnz, V] from padded [B, S, V]), raw logits: temperature 1
                logits = packed_rows(logits, micro_batch, use_rmpad)
                labels = labels.clamp(0, logits.shape[-1] - 1)  # padding rows only
                # one read, across ranks: a NaN row on one rank stops every rank there
                stats = read_across_ranks(teacher_stats, logits, labels, int(k), chunk_bytes=chunk_mb * 2**20)
            out = {
                "teacher_ids": stats["topk_ids"].to(torch.int32),
                "teacher_logprobs": stats["topk_logprobs"],
                "teacher_entropy": stats["entropy"],
                "teacher_token_logprob": stats["token_logprobs"],
            }
            return pack_outputs(self, out, micro_batch, output_args, use_rmpad)

    _TEACHER_ENGINE.append(EOPDTeacherEngine)
    return EOPDTeacherEngine


def teacher_model_config(student_model_config, teacher_path: str):
    """The actor's HFModelConfig with the teacher's path: same attention, padding-removal and remote-code
    settings; LoRA and MTP off (the teacher is frozen)."""
    from verl.workers.config.model import MtpConfig

    return dataclasses.replace(
        student_model_config, path=teacher_path, local_path=None, hf_config_path=None, local_hf_config_path=None,
        tokenizer_path=None, local_tokenizer_path=None, hf_config=None, generation_config=None, tokenizer=None,
        processor=None, architectures=None, lora_rank=0, lora={}, lora_adapter_path=None,
        mtp=MtpConfig(enable=False), model_type="language_model",
    )


_TEACHER_WORKER = []  # the class, built on first use so importing this module stays cheap


def teacher_worker_class():
    """verl's TrainingWorker subclass for the teacher (defined lazily: verl's workers import the platform)."""
    if _TEACHER_WORKER:
        return _TEACHER_WORKER[0]
    from verl.utils import tensordict_utils as tu
    from verl.workers.engine_workers import TrainingWorker

    _teacher_engine_class()

    class TeacherTrainingWorker(TrainingWorker):
        """verl's TrainingWorker in the ref role, loading the teacher and emitting the EOPD teacher fields."""

        def __init__(self, config, *, teacher: TeacherSettings):
            config = dataclasses.replace(
                config, model_type=TEACHER_MODEL_TYPE,
                model_config=teacher_model_config(config.model_config, teacher.model_path),
            )
            super().__init__(config)
            self.teacher = teacher
            self.engine.eopd_param_dtype = teacher.param_dtype  # read by the engine's initialize() (reset)
            self.engine.eopd_from_hidden = teacher.from_hidden

        def infer_batch(self, data):
            t = self.teacher
            if t.remap_eos:
                data["input_ids"] = remap_first_eos(data["input_ids"], response_lengths(data),
                                                    t.student_eos_token_id, t.teacher_eos_token_id)
            tu.assign_non_tensor(data, eopd_topk=t.topk, eopd_logits_chunk_mb=t.logits_chunk_mb)
            out = TrainingWorker.infer_batch(self, data)
            if out is not None and t.remap_eos:
                ids = out["teacher_ids"]
                mapped = map_teacher_eos_in_topk(ids.values(), t.student_eos_token_id, t.teacher_eos_token_id)
                out["teacher_ids"] = torch.nested.nested_tensor_from_jagged(mapped, ids.offsets())
            return out

    _TEACHER_WORKER.append(TeacherTrainingWorker)
    return TeacherTrainingWorker
