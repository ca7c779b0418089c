"""End-token remap on verl's teacher-server route (a version-gated patch; the reference route remaps in the
teacher worker, integration/teacher.py).

A Base student stops with its own end token (Qwen3-Base `<|endoftext|>`) where a chat teacher ends with
`<|im_end|>`; sent as is to verl's teacher pool, every stop is scored as the teacher's unlikely token (about
-21 nats) and distillation learns never to stop. verl 0.9.1's agent loop sends `prompt + response` ids to
`AsyncTeacherLLMServerManager.compute_teacher_logprobs_single`; the wrapper below, on when
`EOPD_SERVER_EOS="<student id>,<teacher id>"` (set by `verl_eopd.main` for `teacher_route=server` when the
two end tokens differ and `eos_remap` is on):

  * sends the teacher a copy whose final token, when it is the student's end token (a response stops at its
    first end token, so that is the one), is the teacher's;
  * maps the teacher's end token back to the student's in the returned top-k ids (`core.eos`, as on the
    reference route), and, in the exact token column when the payload carries one
    (integration/server_route.py), at the remapped final token only, so the column holds the student's own
    tokens (a teacher end token the student wrote itself stays).
It runs where the agent loop runs (Ray workers get the variable through runtime_env) and is applied when
verl's teacher manager module is imported, through `patches.apply` (declared there as server-eos-remap).
"""

from __future__ import annotations

import inspect
import os
import sys
from typing import Callable, Optional

import torch

from . import patches
from ..core.eos import map_teacher_eos_in_topk

ENV = "EOPD_SERVER_EOS"
MODULE = "verl.experimental.teacher_loop.teacher_manager"
CLASS, METHOD = "AsyncTeacherLLMServerManager", "compute_teacher_logprobs_single"
PARAMS = ("self", "sequence_ids", "multi_modal_data", "mm_processor_kwargs", "mm_processor_output", "routing_key")
_PATCHED = "_eopd_eos_remap"


def eos_pair() -> Optional[tuple[int, int]]:
    """(student end token, teacher end token) from EOPD_SERVER_EOS, or None when unset."""
    value = os.environ.get(ENV, "").strip()
    if not value:
        return None
    s, t = (int(x) for x in value.split(","))
    return s, t


def server_eos_pair(config, loss) -> Optional[tuple[int, int]]:
    """(student, teacher) end tokens to remap on the server route, or None (ref route, eos_remap off, or the
    same token), resolved as on the reference route (`config.end_token_ids`)."""
    if loss.teacher_route != "server" or not loss.eos_remap:
        return None
    from .config import end_token_ids

    teacher_path = config.distillation.teacher_models.teacher_model.model_path
    s, t = end_token_ids(loss, config.actor_rollout_ref.model, teacher_path)
    return None if s is None or t is None or int(s) == int(t) else (int(s), int(t))


def remap_sequence(sequence_ids: list[int], student_eos: int, teacher_eos: int) -> list[int]:
    """The teacher's copy: a final student end token becomes the teacher's."""
    if sequence_ids and int(sequence_ids[-1]) == student_eos:
        return [*sequence_ids[:-1], teacher_eos]
    return list(sequence_ids)


def map_back(teacher_ids: torch.Tensor, topk: Optional[int], student_eos: int, teacher_eos: int,
             remapped: bool = True) -> torch.Tensor:
    """Teacher ids [S, K] (or [S, K + 1] with the exact token column) with the teacher's end token renamed in
    the top-k (as on the reference route). In the token column (the scored tokens themselves: row j holds token
    j + 1, the last row is a dummy) only the final token is renamed, and only when `remapped`: a teacher end
    token the student itself wrote elsewhere stays what it is."""
    ids = teacher_ids.long()
    if topk is not None and ids.dim() == 2 and ids.shape[1] == topk + 1:
        col = ids[:, -1:].clone()
        if remapped and col.shape[0] >= 2 and int(col[-2, 0]) == teacher_eos:
            col[-2, 0] = student_eos
        ids = torch.cat([map_teacher_eos_in_topk(ids[:, :-1], student_eos, teacher_eos), col], dim=-1)
    else:
        ids = map_teacher_eos_in_topk(ids, student_eos, teacher_eos)
    return ids.to(teacher_ids.dtype)


def with_eos_remap(original: Callable, student_eos: int, teacher_eos: int) -> Callable:
    async def compute_teacher_logprobs_single(self, sequence_ids, *args, **kwargs):
        sent = remap_sequence(sequence_ids, student_eos, teacher_eos)
        ids, logprobs = await original(self, sent, *args, **kwargs)
        cfg = getattr(self, "distillation_loss_config", None)
        topk = int(cfg.topk) if cfg is not None and getattr(cfg, "topk", None) is not None else None
        remapped = bool(sequence_ids) and int(sent[-1]) != int(sequence_ids[-1])
        return map_back(ids, topk, student_eos, teacher_eos, remapped), logprobs

    setattr(compute_teacher_logprobs_single, _PATCHED, True)
    compute_teacher_logprobs_single.__wrapped__ = original
    return compute_teacher_logprobs_single


def patch_module(module) -> bool:
    """Wrap the manager's method in `module` (idempotent, signature-checked). True when it was patched now."""
    pair = eos_pair()
    cls = getattr(module, CLASS, None)
    fn = getattr(cls, METHOD, None) if cls is not None else None
    if fn is None:
        raise RuntimeError(f"{MODULE}.{CLASS}.{METHOD} not found: this verl is not the one the end-token remap was "
                           "written for. Fix: verl==0.9.1, or distillation.distillation_loss.teacher_route=ref")
    if pair is None or getattr(fn, _PATCHED, False):
        return False
    got = tuple(inspect.signature(fn).parameters)
    if got != PARAMS:
        raise RuntimeError(f"{MODULE}.{CLASS}.{METHOD}{got}: expected parameters {PARAMS}; refusing to patch. "
                           "Fix: verl==0.9.1, or distillation.distillation_loss.teacher_route=ref")
    return patches.apply("server-eos-remap", lambda: setattr(cls, METHOD, with_eos_remap(fn, *pair)))


def install() -> bool:
    """Arm the patch in this process when EOPD_SERVER_EOS is set; returns whether it is on."""
    if eos_pair() is None:
        return False
    from .server_route import add_post_import_patch

    if MODULE in sys.modules:
        patch_module(sys.modules[MODULE])
    add_post_import_patch(MODULE, patch_module)
    return True
