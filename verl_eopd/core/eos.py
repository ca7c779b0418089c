"""End-of-sequence remap between a Base student and a chat teacher, on verl's nested (jagged) batches.

A Base student ends with its own end token (`<|endoftext|>`) where a chat teacher expects `<|im_end|>`;
scored as is, every stop costs about -21 nats of teacher log-prob and on-policy distillation learns never
to stop. On the copy of the response the teacher scores, the first student end token of each response
becomes the teacher's (`remap_first_eos`); in the teacher's top-k ids the teacher's end token is mapped
back to the student's (`map_teacher_eos_in_topk`), so the forward KL teaches the student to stop with the
token its rollout actually stops on.
"""

from __future__ import annotations

import torch

__all__ = ["remap_first_eos", "map_teacher_eos_in_topk"]


def remap_first_eos(input_ids: torch.Tensor, resp_lens: torch.Tensor, student_eos: int, teacher_eos: int) -> torch.Tensor:
    """Copy of nested `input_ids` [B, j] where the first `student_eos` of each response is `teacher_eos`.

    Only the response part (the last resp_lens[b] tokens of sequence b) is searched; prompts are untouched.
    """
    values, offsets = input_ids.values(), input_ids.offsets()
    n = values.shape[0]
    seq = torch.repeat_interleave(torch.arange(offsets.numel() - 1, device=values.device), offsets.diff())
    pos = torch.arange(n, device=values.device)
    in_response = pos >= (offsets[1:] - resp_lens.to(offsets.device))[seq]
    hit = in_response & (values == student_eos)
    first = torch.full((offsets.numel() - 1,), n, dtype=torch.long, device=values.device)
    first = first.scatter_reduce(0, seq[hit], pos[hit], reduce="amin")
    first = first[first < n]
    out = values.clone()
    out[first] = teacher_eos
    return torch.nested.nested_tensor_from_jagged(out, offsets)


def map_teacher_eos_in_topk(topk_ids: torch.Tensor, student_eos: int, teacher_eos: int) -> torch.Tensor:
    """Top-k ids [..., K] with teacher_eos renamed student_eos, except in rows already holding student_eos."""
    has_student = (topk_ids == student_eos).any(-1, keepdim=True)
    return torch.where((topk_ids == teacher_eos) & ~has_student, torch.full_like(topk_ids, student_eos), topk_ids)
