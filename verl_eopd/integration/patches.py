"""Every runtime patch verl-eopd applies to verl, torch or Ray: declared here, applied through `apply`.

A patch is a change to another package's objects at run time. Each is a place a verl upgrade can break
silently, so each is declared once below with what it patches, why no door exists for it, the verl
version it was written against and when it is applied; `apply(name, fn)` runs it once per process and
records it. `python -m verl_eopd.plugin` lists them with their state in that process, and
docs/verl_integration.md mirrors this list (a test keeps the two in step).

What verl offers a door for is not patched (and so not listed): the loss is registered with
`register_distillation_loss` and bound to the actor in the EOPD worker (no global rebinding of verl's
top-k processor), the teacher engine with `EngineRegistry.register`, the trainer with `register_trainer`
(imported in the TaskRunner through `VERL_USE_EXTERNAL_MODULES`), the CPU platform with
`PlatformRegistry.register` + `set_platform` (its device module is a proxy object, not attributes added
to `torch.cpu`), engine lookup on CPU with `VERL_ENGINE_DEVICE`, and the gloo process group with verl's
own `initialize_global_process_group_ray(backend="gloo")`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

VERL = "0.9.1"


@dataclass(frozen=True)
class Patch:
    name: str  # short id
    target: str  # the object replaced or written
    why: str  # why a door does not suffice
    verl_version: str  # the release the patch was written and tested against
    when: str  # the condition under which it is applied


PATCHES: dict[str, Patch] = {p.name: p for p in (
    Patch(
        name="rollout-registry-hf",
        target="verl.workers.rollout.base._ROLLOUT_REGISTRY[('hf', 'async')]",
        why="verl 0.9.1 has a public RolloutReplicaRegistry.register for replicas but no register function for the "
            "in-worker server adapter; the `hf` backend (generation on CPU) needs an entry in this private dict",
        verl_version=VERL,
        when="every process, at plugin set-up",
    ),
    Patch(
        name="verl-trainer-main-alias",
        target="sys.meta_path (a finder for the module name verl.trainer.main, appended last)",
        why="verl 0.9.1 ships no verl.trainer.main, the command users were promised; writing a file into verl's "
            "package is not ours to do, and a finder placed last yields to a verl that ships its own",
        verl_version=VERL,
        when="every process that imports verl, at plugin set-up",
    ),
    Patch(
        name="console-config-dump",
        target="verl.trainer.main_ppo.pprint and verl.trainer.ppo.v1.trainer_base.pprint",
        why="verl's TaskRunner prints the whole resolved config (about 90 KB) and the trainer the validation-metric "
            "dicts, with no switch; with the compact console one line says how to see the config (--cfg job) "
            "and the compact lines show the accuracies",
        verl_version=VERL,
        when="trainer.console=compact: main_ppo in the driver (before verl pickles its TaskRunner class), "
             "trainer_base in the TaskRunner",
    ),
    Patch(
        name="cpu-offload-no-pin",
        target="torch.distributed.fsdp.CPUOffloadPolicy (and verl.workers.engine.fsdp.transformer_impl's reference)",
        why="verl's forward-only engines (the reference worker holding the teacher) offload with "
            "CPUOffloadPolicy(pin_memory=True); pinning needs an accelerator, so on CPU the policy never pins",
        verl_version=VERL,
        when="CPU runs (VERL_PLATFORM=cpu), every process",
    ),
    Patch(
        name="teacher-topk-hf",
        target="verl.workers.config.distillation.DistillationTeacherModelConfig._validate_topk_logprobs",
        why="verl 0.9.1 accepts top-k teachers only on vllm/sglang; on CPU the teacher pool of the server route runs "
            "the `hf` backend, which returns verl's top-k layout with no engine cap",
        verl_version=VERL,
        when="CPU runs (VERL_PLATFORM=cpu), every process",
    ),
    Patch(
        name="server-token-column-vllm",
        target="verl.workers.rollout.vllm_rollout.vllm_async_server.extract_prompt_logprobs",
        why="verl's extraction keeps only the top-K prompt log-probs although vLLM also returns the scored token's; "
            "the wrapper appends that exact log-prob as column K (integration/server_route.py)",
        verl_version=VERL,
        when="teacher_route=server with server_token_logprob=exact (EOPD_TEACHER_TOKEN_COLUMN=1), on import of the module",
    ),
    Patch(
        name="server-eos-remap",
        target="verl.experimental.teacher_loop.teacher_manager.AsyncTeacherLLMServerManager.compute_teacher_logprobs_single",
        why="verl sends the student's token ids to the teacher pool unchanged; a Base student's end token would be "
            "scored as the chat teacher's unlikely token (about -21 nats). The wrapper sends the teacher's end token "
            "and maps it back in the returned ids (integration/server_eos.py)",
        verl_version=VERL,
        when="teacher_route=server with different student/teacher end tokens and eos_remap (EOPD_SERVER_EOS), "
             "on import of the module",
    ),
    Patch(
        name="server-token-column-sglang",
        target="verl.workers.rollout.sglang_rollout.async_sglang_server._extract_prompt_logprobs_sglang",
        why="as for vLLM: SGLang's input_token_logprobs hold the scored token's exact log-prob, verl drops it",
        verl_version=VERL,
        when="teacher_route=server with server_token_logprob=exact (EOPD_TEACHER_TOKEN_COLUMN=1), on import of the module",
    ),
)}

_APPLIED: dict[str, Patch] = {}
# (name, id(target)) -> the target, held: a key is an id, and a freed target's id can be given to a new object,
# which would then pass for patched
_DONE: dict[tuple, object] = {}


def apply(name: str, fn: Callable[[], object], *, target: object = None) -> bool:
    """Run the declared patch `name` (its function `fn`) once in this process and record it as active.

    `target` (default: none) is the object patched when a patch can meet several of them (the server-route
    patch applies to each module object that is imported); the patch runs once per (name, target).
    Returns True when it ran now, False when it had already run."""
    if name not in PATCHES:
        raise KeyError(f"undeclared runtime patch {name!r}: declare it in verl_eopd.integration.patches.PATCHES")
    key = (name, id(target)) if target is not None else (name, None)
    if key in _DONE and _DONE[key] is target:
        return False
    fn()
    _DONE[key] = target
    _APPLIED[name] = PATCHES[name]
    return True


def applied() -> list[str]:
    """Names of the patches active in this process, in the order they were applied."""
    return list(_APPLIED)


def describe() -> str:
    """Every declared patch, with its state in this process (the `python -m verl_eopd.plugin` listing)."""
    lines = [f"verl-eopd runtime patches ({len(PATCHES)} declared, {len(_APPLIED)} active in this process):"]
    for p in PATCHES.values():
        state = "ACTIVE  " if p.name in _APPLIED else "inactive"
        lines += [f"  [{state}] {p.name}  (verl {p.verl_version})", f"      patches: {p.target}",
                  f"      when:    {p.when}", f"      why:     {p.why}"]
    return "\n".join(lines)
