"""EOPD loss config: verl's `DistillationLossConfig` plus the EOPD keys, validated when built.

Lives at `distillation.distillation_loss` (hydra `_target_: verl_eopd.config.EOPDLossConfig`). The YAML
mirror with one comment per key is `verl_eopd/conf/distillation_loss/eopd.yaml`; a test keeps the two in step.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

from verl.workers.config import DistillationLossConfig

from . import plugin
from .losses import ENTROPY_ESTIMATORS, GATES

plugin.register()  # the loss name must be registered before DistillationLossConfig.__post_init__ looks it up

_KEY = "distillation.distillation_loss"
TEACHER_ROUTES = ("ref", "server")
SERVER_TOKEN_LOGPROB = ("exact", "fallback")


def _fail(key: str, value, why: str, fix: str):
    raise ValueError(f"{_KEY}.{key}={value!r}: {why}. Fix: {fix}")


def _is_number(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


@dataclass
class EOPDLossConfig(DistillationLossConfig):
    """Entropy-aware on-policy distillation loss (DESIGN.md section 2). Paper defaults.

    Inherited keys keep verl's meaning; EOPD fixes some of them:
      loss_mode "eopd"; topk 16 (teacher top-k width K); use_policy_gradient False (EOPD builds its own
      PPO-clipped reverse-KL term; verl's PG wrapper would drop the FKL gradient); loss_max_clamp and
      log_prob_min_clamp None (a clamp of the mixed per-token loss, or of the log-probs inside FKL, would
      change the objective; EOPD's terms are finite without them); use_task_rewards False (pure
      distillation; True adds verl's PPO/GRPO loss on task advantages, and the EOPD term is then scaled by
      distillation_loss_coef).

    EOPD keys:
      entropy_threshold: tau in nats; a token is gated when the teacher entropy exceeds it (hard/soft gates).
      fkl_coef: alpha, the weight of the gated forward KL (0 = plain OPD).
      gate: "hard" (1[H > tau], the paper) | "soft" (sigmoid((H - tau)/gate_temperature)) |
            "quantile" (the gate_quantile fraction of valid tokens with the highest teacher entropy in the
            micro-batch).
      gate_temperature: nats, width of the soft gate.   gate_quantile: fraction in (0, 1] for "quantile".
      entropy_estimator: how teacher entropy is estimated when only top-k log-probs are available (the
            server route): "midpoint" of the top-k bounds, "lower" or "upper". Exact entropy (ref route)
            is used whenever the batch carries it.
      clip_ratio_c: optional dual-clip constant (> 1) on the reverse-KL surrogate for negative advantages;
            None in the paper, 3.0 in verl's vanilla PPO loss.
      teacher_vocab_size: V of the teacher used by the top-k entropy bounds and the outside-top-k
            log-prob fallback; None uses the student's vocabulary size.
      logits_chunk_mb: fp32 MiB of logits visited at once by the chunked loss and the teacher pass.
      teacher_route: "ref" (the teacher runs in verl's reference worker: exact entropy and sampled-token
            log-prob, distillation.enabled false) | "server" (verl's vLLM/SGLang teacher pool,
            distillation.enabled true: top-k only).
      server_token_logprob: server route only. "exact" (default): the teacher servers' extraction is patched
            (verl_eopd.server_logprobs) to also ship the sampled token's exact log-prob; "fallback": verl's
            top-k payload unchanged, the uniform-tail estimate for sampled tokens outside the top-k.
      eos_remap: map the student's first end token to the teacher's on the teacher's copy of the response
            (ref route); active only when the two ids differ.
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
    clip_ratio: float = 0.2
    clip_ratio_low: float = 0.2
    clip_ratio_high: float = 0.2

    entropy_threshold: float = 0.8
    fkl_coef: float = 1.0
    gate: str = "hard"
    gate_temperature: float = 0.1
    gate_quantile: float = 0.2
    entropy_estimator: str = "midpoint"
    clip_ratio_c: Optional[float] = None
    teacher_vocab_size: Optional[int] = None
    logits_chunk_mb: int = 64
    teacher_route: str = "ref"
    server_token_logprob: str = "exact"
    eos_remap: bool = True
    student_eos_token_id: Optional[int] = None
    teacher_eos_token_id: Optional[int] = None

    def __post_init__(self):
        self.validate()
        super().__post_init__()

    def validate(self) -> None:
        """Raise ValueError naming the first bad key and its fix. Runs when the config is built."""
        if self.loss_mode != "eopd":
            _fail("loss_mode", self.loss_mode, "EOPDLossConfig only drives the 'eopd' loss",
                  "set loss_mode=eopd, or drop the _target_ to use verl's DistillationLossConfig")
        if not (isinstance(self.topk, int) and not isinstance(self.topk, bool) and self.topk >= 1):
            _fail("topk", self.topk, "the teacher top-k width must be an integer >= 1", "use topk=16 (the paper)")
        if not (_is_number(self.entropy_threshold) and self.entropy_threshold >= 0):
            _fail("entropy_threshold", self.entropy_threshold, "tau is an entropy in nats and must be finite and >= 0",
                  "use entropy_threshold=0.8 (the paper); use fkl_coef=0 to switch the FKL term off")
        if not (_is_number(self.fkl_coef) and self.fkl_coef >= 0):
            _fail("fkl_coef", self.fkl_coef, "the forward-KL weight must be finite and >= 0", "use fkl_coef=1.0 (the paper)")
        if not (_is_number(self.distillation_loss_coef) and self.distillation_loss_coef >= 0):
            _fail("distillation_loss_coef", self.distillation_loss_coef, "must be finite and >= 0", "use 1.0")
        if self.gate not in GATES:
            _fail("gate", self.gate, f"unknown gate; choose one of {list(GATES)}", "use gate=hard (the paper)")
        if not (_is_number(self.gate_temperature) and self.gate_temperature > 0):
            _fail("gate_temperature", self.gate_temperature, "the soft-gate width must be > 0", "use 0.1 nats")
        if not (_is_number(self.gate_quantile) and 0 < self.gate_quantile <= 1):
            _fail("gate_quantile", self.gate_quantile, "the gated fraction must be in (0, 1]", "use 0.2")
        if self.entropy_estimator not in ENTROPY_ESTIMATORS:
            _fail("entropy_estimator", self.entropy_estimator, f"choose one of {list(ENTROPY_ESTIMATORS)}",
                  "use entropy_estimator=midpoint")
        for key in ("clip_ratio_low", "clip_ratio_high"):
            v = getattr(self, key)
            if not (_is_number(v) and v > 0) or (key == "clip_ratio_low" and v >= 1):
                _fail(key, v, "PPO clip eps must be > 0 (and < 1 for the low side)", "use 0.2 (the paper)")
        if self.clip_ratio_c is not None and not (_is_number(self.clip_ratio_c) and self.clip_ratio_c > 1):
            _fail("clip_ratio_c", self.clip_ratio_c, "the dual-clip constant must be > 1", "use null (the paper) or 3.0")
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
        if self.teacher_vocab_size is not None and not (
            isinstance(self.teacher_vocab_size, int) and self.teacher_vocab_size >= self.topk
        ):
            _fail("teacher_vocab_size", self.teacher_vocab_size, "must be an integer >= topk", "use null")
        if not (isinstance(self.logits_chunk_mb, int) and self.logits_chunk_mb >= 1):
            _fail("logits_chunk_mb", self.logits_chunk_mb, "must be an integer >= 1", "use 64")
        if self.teacher_route not in TEACHER_ROUTES:
            _fail("teacher_route", self.teacher_route, f"choose one of {list(TEACHER_ROUTES)}", "use teacher_route=ref")
        if self.server_token_logprob not in SERVER_TOKEN_LOGPROB:
            _fail("server_token_logprob", self.server_token_logprob, f"choose one of {list(SERVER_TOKEN_LOGPROB)}",
                  "use exact")
        if not isinstance(self.eos_remap, bool):
            _fail("eos_remap", self.eos_remap, "must be true or false", "use true")
        for key in ("student_eos_token_id", "teacher_eos_token_id"):
            v = getattr(self, key)
            if v is not None and not (isinstance(v, int) and not isinstance(v, bool) and v >= 0):
                _fail(key, v, "must be a token id >= 0 or null", "use null to read it from the tokenizer")

    @property
    def loss_kwargs(self) -> dict:
        """Keyword arguments of `losses.eopd_token_losses` carried by this config."""
        return dict(
            entropy_threshold=float(self.entropy_threshold), fkl_coef=float(self.fkl_coef),
            clip_ratio_low=float(self.clip_ratio_low), clip_ratio_high=float(self.clip_ratio_high),
            clip_ratio_c=self.clip_ratio_c, gate=self.gate, gate_temperature=float(self.gate_temperature),
            gate_quantile=float(self.gate_quantile),
        )


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
            f"{_KEY}._target_: expected verl_eopd.config.EOPDLossConfig, got {type(loss).__name__}. "
            "Fix: launch with algorithm=eopd|opd|eopd_grpo"
        )
    return loss


def check_tokenizers(student_path: str, teacher_path: str, trust_remote_code: bool = False) -> None:
    """The teacher must score the student's token ids: same tokenizer family, teacher vocab covering the student's.

    Embedding tables that differ only by padding (151,936 vs 152,064 rows) are fine; a token string with
    a different id, or a student id the teacher's model cannot embed, is refused.
    """
    from transformers import AutoConfig, AutoTokenizer

    s_vocab = AutoTokenizer.from_pretrained(student_path, trust_remote_code=trust_remote_code).get_vocab()
    t_vocab = AutoTokenizer.from_pretrained(teacher_path, trust_remote_code=trust_remote_code).get_vocab()
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


def check_run_config(config) -> "EOPDLossConfig":
    """Validate a composed EOPD run config; raises ValueError naming the key and the fix."""
    from omegaconf import OmegaConf

    loss = build_loss_config(config.distillation)
    dist, aref = config.distillation, config.actor_rollout_ref
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
            "actor_rollout_ref.model.use_fused_kernels=true: fused kernels never materialise the student logits the "
            "EOPD forward KL needs. Fix: actor_rollout_ref.model.use_fused_kernels=false"
        )
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
        lora = aref.model.get("lora_rank", 0) or (aref.model.get("lora", {}) or {}).get("rank", 0)
        if lora and int(lora) > 0:
            raise ValueError("actor_rollout_ref.model.lora_rank > 0: with LoRA verl uses the actor as its reference, "
                             f"which cannot hold the teacher. Fix: full fine-tuning, or {_KEY}.teacher_route=server")
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
    check_tokenizers(aref.model.path, teacher_path, bool(aref.model.get("trust_remote_code", False)))
    return loss
