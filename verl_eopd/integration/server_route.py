"""Exact teacher log-prob of the sampled token on verl's teacher-server route (a version-gated patch).

The teacher servers already compute log pi_T(y_t) for every token of the sequence they score: vLLM's
`prompt_logprobs=K` returns the top-K plus the actual token when it is outside the top-K, SGLang returns
`input_token_logprobs` beside `input_top_logprobs`. verl 0.9.1's extraction keeps only the top-K, so a
sampled token outside the top-K has no teacher log-prob and the loss would need the uniform-tail fallback
(about 6 nats off on Zipf-like tails, docs/topk_route.md).

With the patch on, the extraction appends one column to each row: `prompt_ids[j][K]` = the token at
position j + 1 (the one row j predicts: the sampled token on response rows) and `prompt_logprobs[j][K]` its
exact log-prob; the trailing dummy row gets id 0 / log-prob 0.0 there, as in verl's own padding. The
payload is then [S, K + 1] and `integration.loss.eopd_logits_processor` reads column K as exact
log pi_T(y_t) (checking that its ids are the sequence's tokens). verl's own code after the extraction
handles any width (`shape[1:]`); only `loss_mode=eopd` reads these fields.

The patch wraps verl's function (it calls verl's extraction unchanged, then adds the column) and is:
  * on only when `EOPD_TEACHER_TOKEN_COLUMN=1` (`verl_eopd.main` sets it, in the driver and in Ray's
    runtime_env, for `teacher_route=server` unless `server_token_logprob=fallback`), so other loss modes
    and other users of these servers see verl's payload unchanged;
  * gated on verl 0.9.1 and on the exact signatures below: anything else raises rather than guessing;
  * applied when the server module is imported (a post-import hook), or at once if it already is, through
    `patches.apply` (declared there as server-token-column-vllm / -sglang).
"""

from __future__ import annotations

import importlib.abc
import importlib.util
import inspect
import os
import sys
from typing import Any, Callable

from . import patches
from .env import TOKEN_COLUMN_ENV as ENV
from .version import check_verl_version

VLLM_MODULE = "verl.workers.rollout.vllm_rollout.vllm_async_server"
SGLANG_MODULE = "verl.workers.rollout.sglang_rollout.async_sglang_server"
_PATCHED = "_eopd_token_column"


class PatchError(RuntimeError):
    pass


def enabled() -> bool:
    return os.environ.get(ENV, "") == "1"


def append_token_column(result_dict: dict, ids: list[int], logprobs: list[float]) -> None:
    """Add column K to every row of verl's extracted payload (ids/log-probs per real row, then the dummy)."""
    rows_ids, rows_lp = result_dict["prompt_ids"], result_dict["prompt_logprobs"]
    if len(ids) != len(rows_ids) - 1:
        raise PatchError(f"token column: {len(ids)} tokens for {len(rows_ids)} rows (expected rows - 1)")
    for row_ids, row_lp, tok, lp in zip(rows_ids, rows_lp, [*ids, 0], [*logprobs, 0.0]):
        row_ids.append(int(tok))
        row_lp.append(float(lp))


def with_token_column_vllm(original: Callable) -> Callable:
    """Wrap verl's `extract_prompt_logprobs(output, num_prompt_logprobs, result_dict)` (vLLM RequestOutput)."""

    def extract_prompt_logprobs(output, num_prompt_logprobs, result_dict):
        original(output=output, num_prompt_logprobs=num_prompt_logprobs, result_dict=result_dict)
        if not num_prompt_logprobs:  # K = 0 already carries the sampled token's log-prob
            return
        tokens = list(output.prompt_token_ids)
        ids, lps = [], []
        for j, entries in enumerate(output.prompt_logprobs[1:], start=1):
            tok = int(tokens[j])
            entry = entries.get(tok) if entries is not None else None
            if entry is None:  # vLLM always returns the actual token's entry; refuse rather than invent one
                raise PatchError(f"vLLM prompt_logprobs at position {j} lacks the prompt token {tok}")
            ids.append(tok)
            lps.append(entry.logprob)
        append_token_column(result_dict, ids, lps)

    setattr(extract_prompt_logprobs, _PATCHED, True)
    extract_prompt_logprobs.__wrapped__ = original
    return extract_prompt_logprobs


def with_token_column_sglang(original: Callable) -> Callable:
    """Wrap verl's `_extract_prompt_logprobs_sglang(meta_info, num_prompt_logprobs, sequence_length, result_dict)`."""

    def _extract_prompt_logprobs_sglang(meta_info, num_prompt_logprobs, sequence_length, result_dict):
        original(meta_info, num_prompt_logprobs, sequence_length, result_dict)
        if not num_prompt_logprobs:
            return
        entries = meta_info.get("input_token_logprobs") or []
        ids = [int(tok) for _, tok, _ in entries[1:]]  # (logprob, token_id, text) per position, entry 0 None
        lps = [float(lp) for lp, _, _ in entries[1:]]
        append_token_column(result_dict, ids, lps)

    setattr(_extract_prompt_logprobs_sglang, _PATCHED, True)
    _extract_prompt_logprobs_sglang.__wrapped__ = original
    return _extract_prompt_logprobs_sglang


PATCH_NAMES = {VLLM_MODULE: "server-token-column-vllm", SGLANG_MODULE: "server-token-column-sglang"}

# module -> (function name, its verl 0.9.1 parameters, wrapper)
TARGETS: dict[str, tuple[str, tuple[str, ...], Callable]] = {
    VLLM_MODULE: ("extract_prompt_logprobs", ("output", "num_prompt_logprobs", "result_dict"), with_token_column_vllm),
    SGLANG_MODULE: ("_extract_prompt_logprobs_sglang", ("meta_info", "num_prompt_logprobs", "sequence_length",
                                                        "result_dict"), with_token_column_sglang),
}


def patch_module(module: Any) -> bool:
    """Replace the module's extraction function by the wrapped one (idempotent). Returns True if patched."""
    name, params, wrap = TARGETS[module.__name__]
    fn = getattr(module, name, None)
    if fn is None:
        raise PatchError(f"{module.__name__}.{name} not found: this verl is not the one the token-column patch "
                         f"was written for. Fix: verl==0.9.1, or server_token_logprob=fallback")
    if getattr(fn, _PATCHED, False):
        return False
    got = tuple(inspect.signature(fn).parameters)
    if got != params:
        raise PatchError(f"{module.__name__}.{name}{got}: expected parameters {params}; refusing to patch. "
                         "Fix: verl==0.9.1, or distillation.distillation_loss.server_token_logprob=fallback")
    return patches.apply(PATCH_NAMES.get(module.__name__, "server-token-column-vllm"),
                         lambda: setattr(module, name, wrap(fn)), target=module)


class _PatchingLoader(importlib.abc.Loader):
    def __init__(self, loader, patch: Callable[[Any], object]):
        self.loader, self.patch = loader, patch

    def create_module(self, spec):
        return self.loader.create_module(spec)

    def exec_module(self, module):
        self.loader.exec_module(module)
        self.patch(module)


_ARMED: dict[str, Callable[[Any], object]] = {}  # module name -> its patch, for the modules armed in this process


class _PostImportHook(importlib.abc.MetaPathFinder):
    """Patch the armed modules right after they are imported (they import vLLM/SGLang: never imported here)."""

    def find_spec(self, fullname, path, target=None):
        patch = _ARMED.get(fullname)
        if patch is None:
            return None
        for finder in sys.meta_path:
            if finder is self or not hasattr(finder, "find_spec"):
                continue
            spec = finder.find_spec(fullname, path, target)
            if spec is not None and spec.loader is not None:
                spec.loader = _PatchingLoader(spec.loader, patch)
                return spec
        return None


def add_post_import_patch(module_name: str, patch: Callable[[Any], object]) -> None:
    """Run `patch(module)` right after `module_name` is imported in this process (one shared import hook)."""
    _ARMED[module_name] = patch
    if not any(isinstance(f, _PostImportHook) for f in sys.meta_path):
        sys.meta_path.insert(0, _PostImportHook())


def install() -> bool:
    """Enable the patch in this process when `EOPD_TEACHER_TOKEN_COLUMN=1`; returns whether it is on."""
    if not enabled():
        return False
    check_verl_version()
    for name in TARGETS:
        if name in sys.modules:
            patch_module(sys.modules[name])
        add_post_import_patch(name, patch_module)
    return True
