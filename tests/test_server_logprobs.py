"""The exact sampled-token column patch of verl's teacher-server prompt-logprob extraction.

verl's extraction functions live in modules that import vLLM / SGLang (CUDA-only wheels, absent here), so
the tests run verl's own installed function bodies, compiled from verl's source file on their own, on
payloads shaped exactly as vLLM's RequestOutput.prompt_logprobs and SGLang's meta_info.
"""

import ast
import gc
import os
import sys
import types
import weakref
from dataclasses import dataclass
from typing import Optional

import pytest
import torch

from verl_eopd.integration import server_route as sl

pytestmark = pytest.mark.integration

K, V = 4, 20


def verl_function(relpath: str, name: str):
    """verl's installed function `name` from `relpath`, compiled alone (its module needs vLLM/SGLang)."""
    import verl

    path = os.path.join(os.path.dirname(verl.__file__), relpath)
    tree = ast.parse(open(path).read())
    node = next(n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name == name)
    code = compile(ast.Module(body=[node], type_ignores=[]), path, "exec")
    ns = {"Optional": Optional, "RequestOutput": object}
    exec(code, ns)
    return ns[name]


@dataclass
class Logprob:  # vLLM's vllm.sequence.Logprob fields
    logprob: float
    rank: Optional[int] = None
    decoded_token: Optional[str] = None


def teacher(seed=0, S=9):
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, V, (S,), generator=g).tolist()
    logp = torch.log_softmax(torch.randn(S, V, generator=g) * 2, -1)  # row i predicts token i + 1
    return tokens, logp


def vllm_output(tokens, logp):
    """RequestOutput-like: prompt_logprobs[0] None; then top-K by rank plus the actual token if outside."""
    plp = [None]
    for j in range(1, len(tokens)):
        row = logp[j - 1]
        order = row.argsort(descending=True).tolist()
        d = {t: Logprob(float(row[t]), rank=order.index(t) + 1) for t in order[:K]}
        if tokens[j] not in d:
            d[tokens[j]] = Logprob(float(row[tokens[j]]), rank=order.index(tokens[j]) + 1)
        plp.append(d)
    return types.SimpleNamespace(prompt_token_ids=tokens, prompt_logprobs=plp)


def sglang_meta(tokens, logp):
    """SGLang meta_info: input_token_logprobs / input_top_logprobs as (logprob, token_id, text), entry 0 None."""
    tok, top = [(None, tokens[0], None)], [None]
    for j in range(1, len(tokens)):
        row = logp[j - 1]
        tok.append((float(row[tokens[j]]), tokens[j], None))
        vals, ids = row.topk(K)
        top.append([(float(v), int(i), None) for v, i in zip(vals, ids)])
    return {"input_token_logprobs": tok, "input_top_logprobs": top}


@pytest.mark.parametrize("seed", range(4))
def test_vllm_extraction_keeps_verls_columns_and_adds_the_exact_token(seed):
    original = verl_function("workers/rollout/vllm_rollout/utils.py", "extract_prompt_logprobs")
    tokens, logp = teacher(seed)
    out = vllm_output(tokens, logp)
    plain, patched = {}, {}
    original(output=out, num_prompt_logprobs=K, result_dict=plain)
    sl.with_token_column_vllm(original)(output=out, num_prompt_logprobs=K, result_dict=patched)
    S = len(tokens)
    assert len(patched["prompt_ids"]) == S and all(len(r) == K + 1 for r in patched["prompt_ids"])
    assert [r[:K] for r in patched["prompt_ids"]] == plain["prompt_ids"]  # verl's top-k untouched
    assert [r[:K] for r in patched["prompt_logprobs"]] == plain["prompt_logprobs"]
    for j in range(S - 1):  # column K: the token row j predicts, with its exact log-prob
        assert patched["prompt_ids"][j][K] == tokens[j + 1]
        # the server's own float, copied into the column (no arithmetic on it): exact
        assert patched["prompt_logprobs"][j][K] == float(logp[j, tokens[j + 1]])
    assert patched["prompt_ids"][-1] == [0] * (K + 1) and patched["prompt_logprobs"][-1] == [0.0] * (K + 1)
    outside = sum(tokens[j + 1] not in plain["prompt_ids"][j] for j in range(S - 1))
    assert outside > 0  # the case the patch exists for: verl's payload had no log-prob for these tokens


def test_vllm_k_zero_is_left_to_verl():
    original = verl_function("workers/rollout/vllm_rollout/utils.py", "extract_prompt_logprobs")
    tokens, logp = teacher(1)
    out = vllm_output(tokens, logp)
    out.prompt_logprobs = [None] + [{tokens[j]: Logprob(float(logp[j - 1, tokens[j]]), rank=1)}
                                    for j in range(1, len(tokens))]
    plain, patched = {}, {}
    original(output=out, num_prompt_logprobs=0, result_dict=plain)
    sl.with_token_column_vllm(original)(output=out, num_prompt_logprobs=0, result_dict=patched)
    assert patched == plain


def test_vllm_missing_token_entry_is_an_error():
    original = verl_function("workers/rollout/vllm_rollout/utils.py", "extract_prompt_logprobs")
    tokens, logp = teacher(2)
    out = vllm_output(tokens, logp)
    outside = [j for j in range(1, len(tokens)) if len(out.prompt_logprobs[j]) == K + 1]
    assert outside, "the fixture must hold a token outside the top-K for this test to mean anything"
    del out.prompt_logprobs[outside[0]][tokens[outside[0]]]  # vLLM would never drop the actual token
    with pytest.raises(sl.PatchError, match="lacks the prompt token"):
        sl.with_token_column_vllm(original)(output=out, num_prompt_logprobs=K, result_dict={})


def test_sglang_extraction_adds_the_exact_token():
    original = verl_function("workers/rollout/sglang_rollout/async_sglang_server.py", "_extract_prompt_logprobs_sglang")
    tokens, logp = teacher(3)
    meta = sglang_meta(tokens, logp)
    plain, patched = {}, {}
    original(meta, K, len(tokens), plain)
    sl.with_token_column_sglang(original)(meta, K, len(tokens), patched)
    assert [r[:K] for r in patched["prompt_ids"]] == plain["prompt_ids"]
    for j in range(len(tokens) - 1):
        assert patched["prompt_ids"][j][K] == tokens[j + 1]
        # the server's own float, copied into the column (no arithmetic on it): exact
        assert patched["prompt_logprobs"][j][K] == float(logp[j, tokens[j + 1]])
    assert patched["prompt_ids"][-1][K] == 0


def _fake_server_module(name, fn_name, params):
    mod = types.ModuleType(name)
    src = f"def {fn_name}({', '.join(params)}):\n    return None\n"
    exec(src, mod.__dict__)
    return mod


def test_patch_module_is_idempotent_and_checks_the_signature():
    mod = _fake_server_module(sl.VLLM_MODULE, "extract_prompt_logprobs", ("output", "num_prompt_logprobs", "result_dict"))
    original = mod.extract_prompt_logprobs
    assert sl.patch_module(mod) is True
    assert mod.extract_prompt_logprobs.__wrapped__ is original
    assert sl.patch_module(mod) is False  # already patched
    other = _fake_server_module(sl.VLLM_MODULE, "extract_prompt_logprobs", ("output", "k", "result_dict"))
    with pytest.raises(sl.PatchError, match="refusing to patch"):
        sl.patch_module(other)
    missing = types.ModuleType(sl.SGLANG_MODULE)
    with pytest.raises(sl.PatchError, match="not found"):
        sl.patch_module(missing)


def test_a_patch_record_holds_its_target_so_no_new_object_passes_for_patched(monkeypatch):
    """The registry records a patched target by its id; a freed target's id can go to a new object, which then
    passed for patched (a random-order CI run: this module's idempotence test met the id of a stand-in module
    that an earlier test had patched and dropped). A record now holds its target, and a record under an id whose
    object is not the recorded one does not count."""
    from verl_eopd.integration import patches

    monkeypatch.setattr(patches, "_DONE", {})
    monkeypatch.setattr(patches, "_APPLIED", {})
    params = ("output", "num_prompt_logprobs", "result_dict")
    first = _fake_server_module(sl.VLLM_MODULE, "extract_prompt_logprobs", params)
    assert sl.patch_module(first) is True
    ref = weakref.ref(first)
    del first
    gc.collect()
    assert ref() is not None  # held by the record: its id cannot be handed to another object meanwhile
    other = _fake_server_module(sl.VLLM_MODULE, "extract_prompt_logprobs", params)
    name = sl.PATCH_NAMES.get(sl.VLLM_MODULE, "server-token-column-vllm")
    patches._DONE[(name, id(other))] = object()  # a stale record under other's id, as the id-only registry had
    assert sl.patch_module(other) is True
    assert getattr(other.extract_prompt_logprobs, "_eopd_token_column", False)
    assert sl.patch_module(other) is False


def test_post_import_hook_patches_a_module_when_it_is_imported(tmp_path, monkeypatch):
    """The servers import vLLM, so the hook is exercised on a stand-in module registered as a target."""
    (tmp_path / "eopd_fake_server.py").write_text(
        "def extract_prompt_logprobs(output, num_prompt_logprobs, result_dict):\n    return 'verl'\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setitem(sl.TARGETS, "eopd_fake_server",
                        ("extract_prompt_logprobs", ("output", "num_prompt_logprobs", "result_dict"),
                         sl.with_token_column_vllm))
    monkeypatch.setenv(sl.ENV, "1")
    monkeypatch.setattr(sys, "meta_path", list(sys.meta_path))
    sys.modules.pop("eopd_fake_server", None)
    assert sl.install() is True
    import eopd_fake_server

    assert getattr(eopd_fake_server.extract_prompt_logprobs, "_eopd_token_column", False)
    sys.modules.pop("eopd_fake_server", None)


def test_install_is_off_without_the_switch(monkeypatch):
    monkeypatch.delenv(sl.ENV, raising=False)
    monkeypatch.setattr(sys, "meta_path", list(sys.meta_path))
    assert sl.install() is False
    assert not any(isinstance(f, sl._PostImportHook) for f in sys.meta_path)
