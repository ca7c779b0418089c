"""EOPD loss config: verl's `DistillationLossConfig` plus the EOPD keys, validated when built.

Lives at `distillation.distillation_loss` (hydra `_target_: verl_eopd.integration.config.EOPDLossConfig`).
The objective's keys are the fields of `core.settings.EOPDSettings` (same names, same defaults, validated
there, once); `EOPDLossConfig.settings` hands them to the loss. The YAML mirror with one comment per key is
`verl_eopd/conf/distillation_loss/eopd.yaml`; a test keeps the two in step.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from typing import Literal, Optional

from verl.workers.config import DistillationLossConfig

from ..core.settings import EntropyEstimator, EOPDSettings, Gate, SettingsError

_KEY = "distillation.distillation_loss"
TeacherRoute = Literal["ref", "server"]
ServerTokenLogprob = Literal["exact", "fallback"]
TEACHER_ROUTES: tuple[str, ...] = ("ref", "server")
SERVER_TOKEN_LOGPROB: tuple[str, ...] = ("exact", "fallback")
TeacherParamDtype = Literal["bf16", "fp32"]
TEACHER_PARAM_DTYPES: tuple[str, ...] = ("bf16", "fp32")
_PAPER = EOPDSettings()  # the objective's defaults, spelled once (core/settings.py)


def _fail(key: str, value, why: str, fix: str):
    raise ValueError(f"{_KEY}.{key}={value!r}: {why}. Fix: {fix}")


def _is_id(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v >= 0


@dataclass
class EOPDLossConfig(DistillationLossConfig):
    """Entropy-aware on-policy distillation loss. Paper defaults.

    Inherited keys keep verl's meaning; EOPD fixes some of them:
      loss_mode "eopd"; topk 16 (teacher top-k width K); use_policy_gradient False (EOPD builds its own
      PPO-clipped reverse-KL term; verl's PG wrapper would drop the FKL gradient); loss_max_clamp and
      log_prob_min_clamp None (a clamp of the mixed per-token loss, or of the log-probs inside FKL, would
      change the objective; EOPD's terms are finite without them); use_task_rewards False (pure
      distillation; True adds verl's PPO/GRPO loss on task advantages, and the EOPD term is then scaled by
      distillation_loss_coef).

    The objective's keys (entropy_threshold, fkl_coef, clip_ratio_low/high, clip_ratio_c, gate,
    gate_temperature, gate_quantile, entropy_estimator, teacher_vocab_size, logits_chunk_mb) are documented
    on `EOPDSettings`. The run's keys:
      teacher_route: "ref" (the teacher runs in verl's reference worker: exact entropy and sampled-token
            log-prob, distillation.enabled false) | "server" (verl's vLLM/SGLang teacher pool,
            distillation.enabled true: top-k only).
      server_token_logprob: server route only. "exact" (default): the teacher servers' extraction is patched
            (integration/server_route.py) to also ship the sampled token's exact log-prob; "fallback": verl's
            top-k payload unchanged, the uniform-tail estimate for sampled tokens outside the top-k.
      eos_remap: map the student's first end token to the teacher's on the teacher's copy of the response
            (ref route); active only when the two ids differ.
      teacher_param_dtype: ref route. "bf16" (default): the teacher's parameters, and so the copy verl keeps
            offloaded in host memory, in bf16 (an 8B teacher: 16 GB instead of 33 GB per node); what FSDP computes
            with bf16 param_dtype is unchanged, and buffers (RoPE frequencies) stay fp32. "fp32": as verl loads it.
      from_hidden: never materialise the [tokens, V] logits: the student's EOPD terms and log-probs, and (ref
            route) the teacher's statistics, come from the last hidden states and the lm head a chunk of rows at a
            time (integration/hidden.py; core eopd_loss_from_hidden). Same values; for long responses and large
            vocabularies. Needs entropy_coeff 0 and a Hugging Face causal LM without an lm-head bias.
      student_eos_token_id / teacher_eos_token_id: the end tokens; null = the eos_token_id of each model's
            tokenizer (Qwen3-Base <|endoftext|>, Qwen3 chat <|im_end|>).
    """

    loss_mode: str = "eopd"
    topk: Optional[int] = 16
    use_task_rewards: bool = False
    distillation_loss_coef: float = 1.0
    loss_max_clamp: Optional[float] = None
    log_prob_min_clamp: Optional[float] = None
    use_policy_gradient: bool = False
    policy_loss_mode: str = "vanilla"
    clip_ratio: float = _PAPER.clip_ratio_low

    # the objective (core.settings.EOPDSettings)
    entropy_threshold: float = _PAPER.entropy_threshold
    fkl_coef: float = _PAPER.fkl_coef
    clip_ratio_low: float = _PAPER.clip_ratio_low
    clip_ratio_high: float = _PAPER.clip_ratio_high
    clip_ratio_c: Optional[float] = _PAPER.clip_ratio_c
    gate: Gate = _PAPER.gate
    gate_temperature: float = _PAPER.gate_temperature
    gate_quantile: float = _PAPER.gate_quantile
    entropy_estimator: EntropyEstimator = _PAPER.entropy_estimator
    teacher_vocab_size: Optional[int] = _PAPER.teacher_vocab_size
    logits_chunk_mb: int = _PAPER.logits_chunk_mb

    # the run
    teacher_route: TeacherRoute = "ref"
    server_token_logprob: ServerTokenLogprob = "exact"
    eos_remap: bool = True
    teacher_param_dtype: TeacherParamDtype = "bf16"
    from_hidden: bool = False
    student_eos_token_id: Optional[int] = None
    teacher_eos_token_id: Optional[int] = None

    def __post_init__(self):
        from .loss import register_loss

        self.validate()
        register_loss()  # verl's __post_init__ looks the loss name up in its registry
        super().__post_init__()

    @property
    def settings(self) -> EOPDSettings:
        """The objective's settings carried by this config (validated)."""
        try:
            return EOPDSettings.of(self)
        except SettingsError as e:
            raise ValueError(f"{_KEY}.{e}") from None

    def validate(self) -> None:
        """Raise ValueError naming the first bad key and its fix. Runs when the config is built."""
        if self.loss_mode != "eopd":
            _fail("loss_mode", self.loss_mode, "EOPDLossConfig only drives the 'eopd' loss",
                  "set loss_mode=eopd, or drop the _target_ to use verl's DistillationLossConfig")
        if not (isinstance(self.topk, int) and not isinstance(self.topk, bool) and self.topk >= 1):
            _fail("topk", self.topk, "the teacher top-k width must be an integer >= 1", "use topk=16 (the paper)")
        self.settings  # noqa: B018 - the objective's keys, validated in core.settings
        if not (isinstance(self.distillation_loss_coef, (int, float)) and not isinstance(self.distillation_loss_coef, bool)
                and 0 <= self.distillation_loss_coef < float("inf")):
            _fail("distillation_loss_coef", self.distillation_loss_coef, "must be finite and >= 0", "use 1.0")
        if self.use_policy_gradient:
            _fail("use_policy_gradient", True, "EOPD builds its own PPO-clipped reverse-KL term; verl's policy-"
                  "gradient wrapper would detach the forward-KL term", "set use_policy_gradient=false")
        if self.loss_max_clamp is not None:
            _fail("loss_max_clamp", self.loss_max_clamp, "clamping the mixed per-token EOPD loss changes the "
                  "objective (the FKL term is >= 0 and finite without it)", "set loss_max_clamp=null")
        if self.log_prob_min_clamp is not None:
            _fail("log_prob_min_clamp", self.log_prob_min_clamp, "EOPD renormalises the teacher over its top-k "
                  "and never takes log 0, so a log-prob floor would only bias the FKL", "set log_prob_min_clamp=null")
        if self.use_chunked_topk:
            _fail("use_chunked_topk", True, "EOPD's loss is always chunked", "drop it; size chunks with logits_chunk_mb")
        if self.teacher_vocab_size is not None and self.teacher_vocab_size < self.topk:
            _fail("teacher_vocab_size", self.teacher_vocab_size, "must be an integer >= topk", "use null")
        if self.teacher_route not in TEACHER_ROUTES:
            _fail("teacher_route", self.teacher_route, f"choose one of {list(TEACHER_ROUTES)}", "use teacher_route=ref")
        if self.server_token_logprob not in SERVER_TOKEN_LOGPROB:
            _fail("server_token_logprob", self.server_token_logprob, f"choose one of {list(SERVER_TOKEN_LOGPROB)}",
                  "use exact")
        if self.teacher_param_dtype not in TEACHER_PARAM_DTYPES:
            _fail("teacher_param_dtype", self.teacher_param_dtype, f"choose one of {list(TEACHER_PARAM_DTYPES)}",
                  "use bf16")
        if not isinstance(self.from_hidden, bool):
            _fail("from_hidden", self.from_hidden, "must be true or false", "use false")
        if not isinstance(self.eos_remap, bool):
            _fail("eos_remap", self.eos_remap, "must be true or false", "use true")
        for key in ("student_eos_token_id", "teacher_eos_token_id"):
            v = getattr(self, key)
            if v is not None and not _is_id(v):
                _fail(key, v, "must be a token id >= 0 or null", "use null to read it from the tokenizer")


# --------------------------------------------------------------------------------------------------
# Whole-run checks, before Ray starts or any model loads
# --------------------------------------------------------------------------------------------------


def build_loss_config(distillation) -> "EOPDLossConfig":
    """The validated EOPDLossConfig of a `distillation` config node; errors name the key and the fix."""
    from verl.utils.config import omega_conf_to_dataclass

    try:
        loss = omega_conf_to_dataclass(distillation.distillation_loss)
    except Exception as e:  # hydra wraps our ValueError in an InstantiationException: surface ours
        cause = e
        while cause.__cause__ is not None and not isinstance(cause, ValueError):
            cause = cause.__cause__
        if isinstance(cause, ValueError) and _KEY in str(cause):
            raise ValueError(str(cause)) from None
        raise
    if not isinstance(loss, EOPDLossConfig):
        raise ValueError(
            f"{_KEY}._target_: expected verl_eopd.integration.config.EOPDLossConfig, got {type(loss).__name__}. "
            "Fix: launch with algorithm=eopd|opd|eopd_grpo"
        )
    return loss


def check_tokenizers(student_path: str, teacher_path: str, trust_remote_code: bool = False) -> None:
    """The teacher must score the student's token ids: same tokenizer family, teacher vocab covering the student's.

    Embedding tables that differ only by padding (151,936 vs 152,064 rows) are fine; a token string with
    a different id, or a student id the teacher's model cannot embed, is refused.
    """
    from transformers import AutoConfig, AutoTokenizer

    def vocab(key: str, path: str) -> dict:
        try:
            return AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code).get_vocab()
        except Exception as e:  # noqa: BLE001 - re-raised naming the key
            raise ValueError(f"{key}={path!r}: its tokenizer does not load ({type(e).__name__}: {e}). Fix: a model "
                             "folder or hub id with a tokenizer (offline: a local folder)") from e

    s_vocab = vocab("actor_rollout_ref.model.path", student_path)
    t_vocab = vocab("distillation.teacher_models.teacher_model.model_path", teacher_path)
    bad = [(tok, i, t_vocab.get(tok)) for tok, i in s_vocab.items() if t_vocab.get(tok) != i]
    if bad:
        examples = ", ".join(f"{tok!r}: student {i} / teacher {j}" for tok, i, j in sorted(bad, key=lambda x: x[1])[:5])
        raise ValueError(
            f"distillation.teacher_models.teacher_model.model_path={teacher_path!r}: its tokenizer differs from the "
            f"student's (actor_rollout_ref.model.path={student_path!r}) on {len(bad)} of {len(s_vocab)} tokens "
            f"({examples}). EOPD scores the student's token ids with the teacher, so both must share a tokenizer. "
            "Fix: pick a teacher of the same model family as the student."
        )
    t_rows = AutoConfig.from_pretrained(teacher_path, trust_remote_code=trust_remote_code).vocab_size
    need = max(s_vocab.values()) + 1
    if t_rows < need:
        raise ValueError(
            f"distillation.teacher_models.teacher_model.model_path={teacher_path!r}: the teacher embeds {t_rows} ids "
            f"but the student's tokenizer uses ids up to {need - 1}. Fix: use a teacher whose vocab covers the student's."
        )


_REMOTE = ("hdfs://", "s3://", "gs://", "http://", "https://")
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[A-Za-z0-9][\w.-]*)?$")


def check_paths(config) -> None:
    """Data files that do not exist and model paths that are neither a folder nor a valid hub id fail here,
    naming the key, before Ray starts (verl would fail tens of seconds later inside a Ray traceback)."""
    from omegaconf import OmegaConf

    for key in ("data.train_files", "data.val_files"):
        value = OmegaConf.select(config, key)
        files = [value] if isinstance(value, str) else list(value or [])
        for f in files:
            f = str(f)
            if not f.startswith(_REMOTE) and not os.path.exists(os.path.expanduser(f)):
                raise ValueError(f"{key}={f!r}: no such file. Fix: {key}=<existing parquet file or list of files> "
                                 "(scripts/prepare_data.py writes them), or leave the model paths unset for the "
                                 "embedded tiny default")
    for key in ("actor_rollout_ref.model.path", "distillation.teacher_models.teacher_model.model_path"):
        path = OmegaConf.select(config, key)
        if not path:
            continue
        path = str(path)
        local = os.path.expanduser(path)
        if os.path.exists(local):
            if not os.path.isdir(local):
                raise ValueError(f"{key}={path!r} is a file; a model is a folder (config.json, weights, tokenizer). "
                                 f"Fix: {key}=<model folder or hub id such as Qwen/Qwen3-1.7B-Base>")
        elif path.startswith(("/", "./", "../", "~")) or not _HUB_ID.match(path):
            raise ValueError(f"{key}={path!r}: neither an existing folder nor a valid hub id (owner/name). "
                             f"Fix: {key}=<model folder or hub id such as Qwen/Qwen3-1.7B-Base>")


_MICRO_KEYS = {  # fixed micro-batch size -> (the batch it cuts, its dynamic-batch switch)
    "actor_rollout_ref.actor.ppo_micro_batch_size_per_gpu": ("mini", "actor_rollout_ref.actor.use_dynamic_bsz"),
    "actor_rollout_ref.rollout.log_prob_micro_batch_size_per_gpu": (
        "rollout", "actor_rollout_ref.rollout.log_prob_use_dynamic_bsz"),
    "actor_rollout_ref.ref.log_prob_micro_batch_size_per_gpu": ("rollout", "actor_rollout_ref.ref.log_prob_use_dynamic_bsz"),
}


def _rank_shares(config) -> tuple[int, dict]:
    """(data-parallel ranks, {"mini": responses per PPO mini-batch, "rollout": responses per rollout batch})."""
    from omegaconf import OmegaConf

    sel = lambda key, default=None: OmegaConf.select(config, key, default=default)  # noqa: E731
    ranks = int(config.trainer.n_gpus_per_node) * int(config.trainer.nnodes)
    dp = max(1, ranks // int(sel("actor_rollout_ref.actor.ulysses_sequence_parallel_size", 1) or 1))
    n = int(sel("actor_rollout_ref.rollout.n", 1))
    return dp, {"mini": int(config.actor_rollout_ref.actor.ppo_mini_batch_size) * n,
                "rollout": int(config.data.train_batch_size) * n}


def fitted_micro_batches(config, cap: int = 256) -> dict:
    """The embedded default's micro-batch sizes for this config's batches: per data-parallel rank, the largest
    size <= cap that cuts the rank's share of a mini-batch (the actor) or of a rollout batch (the log-prob
    passes) into whole micro-batches."""
    dp, shares = _rank_shares(config)
    out = {}
    for key, (which, _) in _MICRO_KEYS.items():
        share = shares[which] // dp if shares[which] % dp == 0 else 1
        out[key] = max(d for d in range(1, min(cap, max(1, share)) + 1) if share % d == 0)
    return out


def check_batch_shapes(config) -> None:
    """With fixed micro-batches (no dynamic batch size) every data-parallel rank's share of a PPO mini-batch,
    and of the rollout batch the old/ref log-prob passes see, must cut into whole micro-batches; verl asserts it
    only inside those passes, after Ray and the engines have started. Shares: ppo_mini_batch_size (resp.
    data.train_batch_size) x rollout.n responses over (ranks / ulysses sp size)."""
    from omegaconf import OmegaConf

    sel = lambda key, default=None: OmegaConf.select(config, key, default=default)  # noqa: E731
    dp, shares = _rank_shares(config)
    for key, (which, dynamic) in _MICRO_KEYS.items():
        micro = sel(key)
        if micro is None or sel(dynamic, False):
            continue
        responses = shares[which]
        if responses % dp == 0 and (responses // dp) % int(micro) == 0:
            continue
        batch = ("actor_rollout_ref.actor.ppo_mini_batch_size" if which == "mini" else "data.train_batch_size")
        share = responses / dp
        if responses % dp == 0:
            fit = max(d for d in range(1, int(micro) + 1) if (responses // dp) % d == 0)
            fix = f"{key}={fit}"
        else:
            fit = next(d for d in range(dp, 0, -1) if responses % d == 0)
            fix = f"trainer.n_gpus_per_node={fit} (with trainer.nnodes=1), or a multiple of {dp} responses per batch"
        raise ValueError(
            f"{batch} x rollout.n = {responses} responses over {dp} data-parallel ranks (trainer.n_gpus_per_node x "
            f"trainer.nnodes / ulysses sp) is {share:g} per rank, not a whole number of {key}={micro} micro-batches: "
            f"verl would stop inside the first {'update' if which == 'mini' else 'log-prob pass'}. Fix: {fix}"
        )


_TOKEN_BUDGETS = {  # dynamic batch size: token budget per rank -> its switch
    "actor_rollout_ref.actor.ppo_max_token_len_per_gpu": "actor_rollout_ref.actor.use_dynamic_bsz",
    "actor_rollout_ref.rollout.log_prob_max_token_len_per_gpu": "actor_rollout_ref.rollout.log_prob_use_dynamic_bsz",
    "actor_rollout_ref.ref.log_prob_max_token_len_per_gpu": "actor_rollout_ref.ref.log_prob_use_dynamic_bsz",
}


def check_token_budgets(config) -> None:
    """With dynamic batch sizes, each rank's token budget (x ulysses sp size) must hold the longest sequence the
    run can make (data.max_prompt_length + data.max_response_length): verl asserts it inside the first pass."""
    from omegaconf import OmegaConf

    sel = lambda key, default=None: OmegaConf.select(config, key, default=default)  # noqa: E731
    longest = int(sel("data.max_prompt_length", 0) or 0) + int(sel("data.max_response_length", 0) or 0)
    sp = int(sel("actor_rollout_ref.actor.ulysses_sequence_parallel_size", 1) or 1)
    for key, dynamic in _TOKEN_BUDGETS.items():
        budget = sel(key)
        if not sel(dynamic, False) or budget is None or int(budget) * sp >= longest:
            continue
        raise ValueError(
            f"{key}={budget}: with dynamic batch sizes a rank's micro-batch holds at most {int(budget) * sp} tokens "
            f"(x ulysses sp {sp}), less than one sequence of data.max_prompt_length + data.max_response_length = "
            f"{longest}: verl would stop inside the first pass. Fix: {key}={-(-longest // sp)}"
        )


def micro_batch_defaults(config, user_keys, gpu: bool) -> dict:
    """Batch settings for a run whose user set no micro-batch size. With dynamic batch sizes on, none. On GPUs
    (the user did not set actor_rollout_ref.actor.use_dynamic_bsz): verl's dynamic batch sizes, micro-batches cut
    by tokens per rank (ppo_max_token_len_per_gpu, verl's 16,384; the log-prob passes and the reference worker
    follow the actor), as scripts/paper_recipe.sh runs. Otherwise (CPU, or use_dynamic_bsz=false): the micro-batch
    keys left unset get `fitted_micro_batches`."""
    from omegaconf import OmegaConf

    sel = lambda key: OmegaConf.select(config, key)  # noqa: E731
    if sel("actor_rollout_ref.actor.use_dynamic_bsz"):
        return {}
    deprecated = {key: key.replace("_per_gpu", "") for key in _MICRO_KEYS}  # verl's older spelling of each
    unset = [key for key in _MICRO_KEYS if sel(key) is None and sel(deprecated[key]) is None]
    if gpu and len(unset) == len(_MICRO_KEYS) and "actor_rollout_ref.actor.use_dynamic_bsz" not in set(user_keys):
        return {"actor_rollout_ref.actor.use_dynamic_bsz": True}
    fitted = fitted_micro_batches(config)
    return {key: fitted[key] for key in unset}


GPU_ROLLOUT_BACKENDS = ("vllm", "sglang")
INSTALL = {"vllm": "pip install 'verl[vllm]==0.9.1'", "sglang": "pip install 'verl[sglang]==0.9.1'"}


def importable_backends() -> list[str]:
    """The GPU rollout backends this machine can import, verl's default (vllm) first."""
    import importlib.util

    return [name for name in GPU_ROLLOUT_BACKENDS if importlib.util.find_spec(name) is not None]


def gpu_rollout_settings(config, planned: bool = False) -> dict:
    """A GPU run: `actor_rollout_ref.rollout.name` when it is unset (verl 0.9.1 has no default and would raise
    inside Ray): vllm when importable, else sglang; neither is refused with the install command (the CPU-only `hf`
    backend is never picked on GPUs). `planned` (a dry run, trainer.dry_run=true): this machine need not be a GPU
    node, so vllm is planned when neither imports here (check_gpu_backends notes that the nodes need it)."""
    from omegaconf import OmegaConf

    if not OmegaConf.is_missing(config.actor_rollout_ref.rollout, "name"):
        return {}
    found = importable_backends()
    if not found and planned:
        return {"actor_rollout_ref.rollout.name": GPU_ROLLOUT_BACKENDS[0]}
    if not found:
        raise ValueError(
            "actor_rollout_ref.rollout.name is not set and this GPU machine can import neither vllm nor sglang, the "
            "rollout backends verl runs on GPUs (the run would fail inside Ray; this package's hf backend is for "
            f"CPUs). Fix: {INSTALL['vllm']} (or {INSTALL['sglang']} with actor_rollout_ref.rollout.name=sglang)"
        )
    return {"actor_rollout_ref.rollout.name": found[0]}


def check_gpu_backends(config, planned: bool = False) -> Optional[str]:
    """A GPU run's rollout backend and, on the server route (distillation.enabled), the teacher pool's: vllm or
    sglang must be importable here (refused with the install command otherwise; `planned`, a dry run: a note that
    the GPU nodes need it); the teacher pool never runs `hf` on GPUs (verl accepts hf top-k teachers only through
    the CPU platform's patch). Returns a note for a student rollout on `hf` set by the user (it runs, on the CPU of
    each rollout worker)."""
    from omegaconf import OmegaConf

    found = importable_backends()
    names = [("actor_rollout_ref.rollout.name", OmegaConf.select(config, "actor_rollout_ref.rollout.name"))]
    if OmegaConf.select(config, "distillation.enabled"):
        names.append(("distillation.teacher_models.teacher_model.inference.name",
                      OmegaConf.select(config, "distillation.teacher_models.teacher_model.inference.name")))
    note = None
    for key, name in names:
        name = str(name)
        if name in GPU_ROLLOUT_BACKENDS and name not in found and planned:
            need = f"{key}={name}: not importable on this machine; every GPU node needs it ({INSTALL[name]})"
            note = f"{note}; {need}" if note else need
            continue
        if name in GPU_ROLLOUT_BACKENDS and name not in found:
            other = [b for b in found if b != name]
            alt = f", or {key}={other[0]} (importable here)" if other else ""
            raise ValueError(f"{key}={name}: this GPU machine cannot import {name}; the run would fail inside Ray. "
                             f"Fix: {INSTALL[name]}{alt}")
        if name == "hf" and key.startswith("distillation."):
            fix = found[0] if found else "vllm"
            install = "" if found else f" after {INSTALL['vllm']}"
            raise ValueError(
                f"{key}=hf: verl serves top-k teachers with vllm or sglang on GPUs (this package's hf backend is for "
                f"CPUs; verl would refuse it after Ray has started). Fix: {key}={fix}{install}")
        if name == "hf":
            hf = (f"{key}=hf on a GPU machine: this package's CPU backend generates on each rollout worker's CPU "
                  f"(slow); {INSTALL['vllm']} and {key}=vllm for GPU generation")
            note = f"{note}; {hf}" if note else hf
    return note


_NAME_CHARS = re.compile(r"[^\w.-]+")


def _short(path: str) -> str:
    """The last component of a model path or hub id, or a data file's name without .parquet."""
    name = os.path.basename(str(path).rstrip("/")) or str(path)
    for ext in (".parquet", ".jsonl", ".json"):
        if name.endswith(ext):
            name = name[: -len(ext)]
    return _NAME_CHARS.sub("-", name)[:40]


def run_name(config, algorithm: str) -> str:
    """`<algorithm>_<student>_from_<teacher>_<training data>_<hash>` for trainer.experiment_name=auto: the hash is of
    the full student and teacher paths and training files, so runs on other models or data (the same file name in
    another folder included) get another name and so another checkpoint folder."""
    import hashlib

    from omegaconf import OmegaConf

    student = str(OmegaConf.select(config, "actor_rollout_ref.model.path"))
    teacher = str(OmegaConf.select(config, "distillation.teacher_models.teacher_model.model_path"))
    files = _files(OmegaConf.select(config, "data.train_files"))
    digest = hashlib.sha256("\n".join([student, teacher, *files]).encode()).hexdigest()[:8]
    data = "+".join(_short(f) for f in files[:2]) + ("+more" if len(files) > 2 else "")
    return f"{algorithm}_{_short(student)}_from_{_short(teacher)}_{data}_{digest}"


def absolute_local_paths(config) -> dict:
    """{key: absolute path} for the model paths and data files given relative to this directory (Ray workers on
    other nodes, and the checkpoint's record of what it was trained with, need the absolute form)."""
    from omegaconf import OmegaConf

    out = {}
    for key in ("actor_rollout_ref.model.path", "distillation.teacher_models.teacher_model.model_path"):
        path = OmegaConf.select(config, key)
        if path and not os.path.isabs(str(path)) and os.path.exists(str(path)):
            out[key] = os.path.abspath(str(path))
    for key in ("data.train_files", "data.val_files"):
        value = OmegaConf.select(config, key)
        files = _files(value)
        fixed = [os.path.abspath(f) if not os.path.isabs(f) and not f.startswith(_REMOTE) and os.path.exists(f) else f
                 for f in files]
        if fixed != files:
            out[key] = fixed[0] if isinstance(value, str) else fixed
    return out


def end_token_ids(loss, model_config, teacher_path: str) -> tuple[Optional[int], Optional[int]]:
    """(student, teacher) end-token ids for the EOS remap: the configured ids, else each tokenizer's
    eos_token_id (the student's from `model_config.tokenizer_path` or its model path)."""
    from transformers import AutoTokenizer

    trust = bool(model_config.get("trust_remote_code", False))

    def eos(path: str) -> Optional[int]:
        return AutoTokenizer.from_pretrained(path, trust_remote_code=trust).eos_token_id

    s = loss.student_eos_token_id
    if s is None:
        s = eos(model_config.get("tokenizer_path") or model_config.path)
    t = loss.teacher_eos_token_id
    if t is None:
        t = eos(teacher_path)
    return s, t


SETTINGS_FILE = "eopd_settings.json"  # written beside each verl checkpoint (integration/trainer.py)
_SPEED_ONLY = ("logits_chunk_mb", "from_hidden")  # settings that change speed and memory, not the objective


def _files(value) -> list[str]:
    """A data-files value (one path or a list) as a list of strings."""
    return [str(value)] if isinstance(value, str) else [str(f) for f in (value or [])]


def settings_record(config) -> dict:
    """What a checkpoint is trained with: the loss node, the teacher, the student and the training data
    (paths as the run was given them; verl_eopd.main makes local ones absolute before this is recorded)."""
    from omegaconf import OmegaConf

    node = OmegaConf.to_container(config.distillation.distillation_loss, resolve=True)
    node["teacher_model_path"] = OmegaConf.select(config, "distillation.teacher_models.teacher_model.model_path")
    node["student_model_path"] = OmegaConf.select(config, "actor_rollout_ref.model.path")
    node["train_files"] = _files(OmegaConf.select(config, "data.train_files"))
    return node


def changed_settings(saved: dict, now: dict) -> dict:
    """{key: (saved, now)} for the settings that differ, speed-only ones left out, and keys only one side knows
    (a checkpoint written before a key existed was trained with that key's behaviour at the time)."""
    return {k: (saved[k], now[k]) for k in sorted(set(saved) & set(now))
            if saved[k] != now[k] and k not in _SPEED_ONLY}


def check_resume(config) -> None:
    """A run that would resume (trainer.resume_mode auto or resume_path) from a checkpoint trained with other EOPD
    settings, another student or teacher, or other training data (`settings_record`) is refused before Ray,
    unless trainer.resume_accept_changed_eopd=true. Records written before a key existed are not compared on it."""
    import json
    import os

    mode = str(config.trainer.get("resume_mode", "auto"))
    if mode == "disable":
        return
    if mode == "resume_path":
        folder = config.trainer.get("resume_from_path")
    else:
        root = str(config.trainer.default_local_dir)
        tracker = os.path.join(root, "latest_checkpointed_iteration.txt")
        if not os.path.exists(tracker):
            return
        with open(tracker) as f:
            folder = os.path.join(root, f"global_step_{int(f.read().strip())}")
    path = os.path.join(str(folder), SETTINGS_FILE) if folder else None
    if not path or not os.path.exists(path):
        return
    with open(path) as f:
        changed = changed_settings(json.load(f), settings_record(config))
    if changed and not config.trainer.get("resume_accept_changed_eopd", False):
        diff = "; ".join(f"{k}: {a!r} -> {b!r}" for k, (a, b) in changed.items())
        raise ValueError(
            f"trainer.resume_mode={mode} would resume {folder}, trained with other EOPD settings, models or data "
            f"({diff}): the run would continue another run's training. Fix: trainer.resume_accept_changed_eopd=true "
            "to resume anyway, trainer.resume_mode=disable to start over, or another trainer.default_local_dir"
        )


def check_strategies(config) -> None:
    """FSDP2 only, for the actor, the reference worker (the teacher) and a critic when the run has one: EOPD's
    loss is a logits processor of verl's FSDP engine and its teacher an FSDP reference worker (Megatron and others
    are not supported), and FSDP1 (verl's default `fsdp`) runs code no test of this package runs."""
    from omegaconf import OmegaConf

    keys = ["actor_rollout_ref.actor.strategy", "actor_rollout_ref.ref.strategy"]
    critic = OmegaConf.select(config, "critic.enable")  # verl's need_critic, without its warning
    if critic or (critic is None and str(OmegaConf.select(config, "algorithm.adv_estimator")) == "gae"):
        keys.append("critic.strategy")
    for key in keys:
        strategy = OmegaConf.select(config, key)
        if strategy is None or str(strategy) == "fsdp2":
            continue
        if str(strategy) == "fsdp":
            raise ValueError(
                f"{key}={strategy}: FSDP1 is not supported; every test of EOPD's loss, teacher and from_hidden path "
                f"through verl's engine runs FSDP2 (the algorithm presets' default). Fix: {key}=fsdp2"
            )
        raise ValueError(
            f"{key}={strategy}: EOPD's loss is a logits processor of verl's FSDP engine and its teacher an FSDP "
            f"reference worker; Megatron (or any other strategy) is not supported. Fix: {key}=fsdp2"
        )


def check_run_config(config) -> "EOPDLossConfig":
    """Validate a composed EOPD run config; raises ValueError naming the key and the fix."""
    from omegaconf import OmegaConf

    loss = build_loss_config(config.distillation)
    dist, aref = config.distillation, config.actor_rollout_ref
    check_strategies(config)
    teacher_path = OmegaConf.select(config, "distillation.teacher_models.teacher_model.model_path")
    if not aref.model.get("path"):
        raise ValueError(
            "actor_rollout_ref.model.path is not set: EOPD needs a student (leave both it and the teacher path unset "
            "for the embedded tiny default). Fix: actor_rollout_ref.model.path=<HF name or local path>"
        )
    if not teacher_path:
        raise ValueError(
            "distillation.teacher_models.teacher_model.model_path is not set: EOPD needs a teacher. "
            "Fix: distillation.teacher_models.teacher_model.model_path=<HF name or local path>"
        )
    if aref.model.get("use_fused_kernels", False):
        raise ValueError(
            "actor_rollout_ref.model.use_fused_kernels=true: verl's fused kernels return only the sampled token's "
            "log-prob and entropy, not the EOPD forward KL over the teacher's top-k. Fix: "
            f"actor_rollout_ref.model.use_fused_kernels=false and, to skip the logits, {_KEY}.from_hidden=true"
        )
    if loss.from_hidden and float(aref.actor.get("entropy_coeff", 0.0) or 0.0) != 0.0:
        raise ValueError(
            f"{_KEY}.from_hidden=true with actor_rollout_ref.actor.entropy_coeff={aref.actor.entropy_coeff}: the "
            "student entropy from hidden states is a detached metric, so an entropy bonus would not train. Fix: "
            f"actor_rollout_ref.actor.entropy_coeff=0 or {_KEY}.from_hidden=false"
        )
    from .console import console_mode

    console_mode(config)  # trainer.console: compact | full
    check_batch_shapes(config)
    check_token_budgets(config)
    if not config.trainer.get("use_v1", True):
        raise ValueError("trainer.use_v1=false: EOPD runs on verl's v1 trainer. Fix: trainer.use_v1=true")
    if loss.teacher_route == "ref":
        if dist.get("enabled", False):
            raise ValueError(
                "distillation.enabled=true with teacher_route=ref would also start verl's vLLM/SGLang teacher pool. "
                f"Fix: distillation.enabled=false, or {_KEY}.teacher_route=server"
            )
        if config.trainer.v1.trainer_mode != "eopd":
            raise ValueError(
                f"trainer.v1.trainer_mode={config.trainer.v1.trainer_mode!r}: the reference-worker teacher needs the "
                "EOPD trainer. Fix: trainer.v1.trainer_mode=eopd"
            )
        if aref.actor.get("use_kl_loss", False) or config.algorithm.get("use_kl_in_reward", False):
            raise ValueError(
                "actor_rollout_ref.actor.use_kl_loss / algorithm.use_kl_in_reward: the reference worker holds the "
                "teacher with teacher_route=ref, so there is no reference policy to regularise towards. Fix: set "
                "both to false (EOPD's reverse-KL term already pulls the student to the teacher)"
            )
        for key, rank in (("actor_rollout_ref.model.lora_rank", aref.model.get("lora_rank", 0)),
                          ("actor_rollout_ref.model.lora.rank", (aref.model.get("lora", {}) or {}).get("rank", 0))):
            if rank and int(rank) > 0:
                raise ValueError(f"{key}={rank}: with LoRA verl uses the actor (adapters off) as its reference, which "
                                 f"then cannot hold the teacher. Fix: {key}=0 (full fine-tuning), or "
                                 f"{_KEY}.teacher_route=server (the teacher on verl's teacher pool)")
    elif not dist.get("enabled", False):
        raise ValueError(
            f"{_KEY}.teacher_route=server needs verl's teacher pool. Fix: distillation.enabled=true "
            "(with distillation.nnodes / n_gpus_per_node), or teacher_route=ref"
        )
    temperature = float(aref.rollout.get("temperature", 1.0))
    if temperature != 1.0:
        import logging

        logging.getLogger("verl_eopd").warning(
            "actor_rollout_ref.rollout.temperature=%s: student log-probs are taken at this temperature while the "
            "teacher is scored at 1.0; the paper trains at 1.0", temperature)
    check_paths(config)
    check_tokenizers(aref.model.path, teacher_path, bool(aref.model.get("trust_remote_code", False)))
    return loss
