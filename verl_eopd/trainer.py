"""EOPD in verl's v1 trainer: the teacher in the reference role, the EOPD loss on the actor.

    trainer.v1.trainer_mode=eopd  ->  EOPDTrainer (registered in verl's v1 trainer registry)

EOPDTrainer is verl's synchronous trainer with three changes when `teacher_route: ref`:
  1. the hybrid worker is EOPDActorRolloutRefWorker with the ref role always on (no KL loss needed);
  2. the reference pass runs the teacher at temperature 1 and returns the EOPD teacher fields (teacher.py);
     they reach `update_actor` through TransferQueue like any other worker output;
  3. the actor's loss is verl's `distillation_ppo_loss` with the EOPD loss config, and `update_actor` tells
     the engine to call the EOPD logits processor. The processor computes the student's sampled-token
     log-prob itself, so pure distillation skips verl's separate student log-prob pass
     (`distillation_only`) without losing the reverse-KL term; with task rewards verl's PPO/GRPO loss
     runs on top and needs that pass, so it is kept.
With `teacher_route: server` (verl's vLLM/SGLang teacher pool, `distillation.enabled: true`) verl's own
worker and trainer already do all of this; EOPDTrainer then behaves exactly like verl's sync trainer.
"""

from __future__ import annotations

import logging
from functools import partial
from typing import Optional

import ray
from omegaconf import DictConfig
from verl.single_controller.base.decorator import Dispatch, make_nd_compute_dataproto_dispatch_fn, register
from verl.trainer.main_ppo import TaskRunnerV1
from verl.trainer.ppo.utils import Role
from verl.trainer.ppo.v1.trainer_base import register_trainer
from verl.trainer.ppo.v1.trainer_sync import PPOTrainerSync
from verl.utils import tensordict_utils as tu
from verl.utils.config import omega_conf_to_dataclass
from verl.workers.engine_workers import ActorRolloutRefWorker

from .config import build_loss_config
from .teacher import TeacherSettings, teacher_worker_class

logger = logging.getLogger("verl_eopd")
TRAINER_NAME = "eopd"


def _eos_token_id(path: str, trust_remote_code: bool = False) -> Optional[int]:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code).eos_token_id


def teacher_settings(distillation_config: DictConfig, model_config: DictConfig) -> TeacherSettings:
    """Teacher path, top-k and end-token ids for the reference-worker teacher (ids resolved from tokenizers)."""
    loss = build_loss_config(distillation_config)
    path = distillation_config.teacher_models.teacher_model.model_path
    student_eos = teacher_eos = None
    if loss.eos_remap:
        trust = bool(model_config.get("trust_remote_code", False))
        student_eos = loss.student_eos_token_id
        if student_eos is None:
            student_eos = _eos_token_id(model_config.get("tokenizer_path") or model_config.path, trust)
        teacher_eos = loss.teacher_eos_token_id
        if teacher_eos is None:
            teacher_eos = _eos_token_id(path, trust)
    return TeacherSettings(model_path=path, topk=int(loss.topk), student_eos_token_id=student_eos,
                           teacher_eos_token_id=teacher_eos, logits_chunk_mb=int(loss.logits_chunk_mb))


class EOPDActorRolloutRefWorker(ActorRolloutRefWorker):
    """verl's hybrid actor/rollout/ref worker with the teacher as the ref and the EOPD loss on the actor."""

    def __init__(self, config: DictConfig, role: str, distillation_config=None, **kwargs):
        super().__init__(config, role, distillation_config=distillation_config, **kwargs)
        self._eopd_use_task_rewards = bool(build_loss_config(distillation_config).use_task_rewards)
        if self._is_ref:  # an instance attribute shadows the class attribute read by init_model
            self.ref_worker_cls = partial(teacher_worker_class(), teacher=teacher_settings(distillation_config, config.model))

    @register(dispatch_mode=Dispatch.ONE_TO_ALL)
    def init_model(self):
        ActorRolloutRefWorker.init_model(self)
        if self._is_actor and not self.distillation_enabled:
            from verl.trainer.distillation.losses import distillation_ppo_loss

            actor_config = self.loss_fn.keywords["config"]  # the ActorConfig verl just built
            distillation = omega_conf_to_dataclass(self.distillation_config)
            self.loss_fn = partial(distillation_ppo_loss, config=actor_config, distillation_config=distillation)
            self.actor.set_loss_fn(self.loss_fn)

    @register(dispatch_mode=make_nd_compute_dataproto_dispatch_fn(mesh_name="actor"))
    def update_actor(self, data):
        # verl derives these flags from distillation.enabled, which is false on the ref route
        tu.assign_non_tensor(data, distillation_use_topk=True, distillation_only=not self._eopd_use_task_rewards)
        return ActorRolloutRefWorker.update_actor(self, data)


@register_trainer(TRAINER_NAME)
class EOPDTrainer(PPOTrainerSync):
    """verl's synchronous v1 trainer, with the teacher in the reference role when teacher_route is ref."""

    def __init__(self, config: DictConfig):
        super().__init__(config)
        self.eopd_ref_route = build_loss_config(config.distillation).teacher_route == "ref"
        if self.eopd_ref_route:
            self.use_reference_policy = True

    def _init_resource_pool_mgr(self):
        super()._init_resource_pool_mgr()
        if not self.eopd_ref_route:
            return
        import ray

        if Role.Actor in self.role_worker_mapping:
            raise ValueError(
                "teacher_route=ref needs the hybrid actor/rollout/ref worker: set "
                "actor_rollout_ref.hybrid_engine=true (or use teacher_route=server)"
            )
        self.role_worker_mapping.pop(Role.ActorRollout, None)
        self.mapping.pop(Role.ActorRollout, None)
        self.role_worker_mapping[Role.ActorRolloutRef] = ray.remote(EOPDActorRolloutRefWorker)
        self.mapping[Role.ActorRolloutRef] = "global_pool"

    # ------------------------------------------------------------------ checkpoints
    EOPD_SETTINGS_FILE = "eopd_settings.json"

    def _eopd_settings(self) -> dict:
        from omegaconf import OmegaConf

        node = OmegaConf.to_container(self.config.distillation.distillation_loss, resolve=True)
        node["teacher_model_path"] = self.config.distillation.teacher_models.teacher_model.model_path
        return node

    def _save_checkpoint(self):
        """verl's checkpoint plus the EOPD settings it was trained with (compared on resume)."""
        import json
        import os

        super()._save_checkpoint()
        folder = os.path.join(self.config.trainer.default_local_dir, f"global_step_{self.global_steps}")
        if os.path.isdir(folder):
            with open(os.path.join(folder, self.EOPD_SETTINGS_FILE), "w") as f:
                json.dump(self._eopd_settings(), f, indent=1, sort_keys=True)

    def _load_checkpoint(self):
        """verl's resume; then the EOPD settings saved with the checkpoint are compared with this run's."""
        import json
        import os

        super()._load_checkpoint()
        if self.global_steps <= 0:
            return
        folder = os.path.join(self.config.trainer.default_local_dir, f"global_step_{self.global_steps}")
        if self.config.trainer.resume_mode == "resume_path":
            folder = self.config.trainer.resume_from_path
        path = os.path.join(folder, self.EOPD_SETTINGS_FILE)
        if not os.path.exists(path):
            logger.warning("[verl_eopd] resumed from %s, which has no %s", folder, self.EOPD_SETTINGS_FILE)
            return
        with open(path) as f:
            saved = json.load(f)
        now = self._eopd_settings()
        changed = {k: (saved.get(k), now.get(k)) for k in sorted(set(saved) | set(now)) if saved.get(k) != now.get(k)}
        if changed:
            logger.warning("[verl_eopd] resumed at step %d with EOPD settings that differ from the checkpoint's "
                           "(saved -> now): %s", self.global_steps, changed)
        print(f"[verl_eopd] resumed at step {self.global_steps} from {folder}; EOPD settings "
              f"{'CHANGED: ' + str(changed) if changed else 'unchanged'}", flush=True)

    def _compute_ref_log_prob(self, batch, metrics: dict):
        if not self.eopd_ref_route:
            return super()._compute_ref_log_prob(batch, metrics)
        if self.ref_in_actor:
            raise ValueError("teacher_route=ref cannot run with a LoRA actor (verl then uses the actor as its ref)")
        # The teacher's fields are computed from its full logits at temperature 1 whatever the rollout
        # temperature; they are written back to TransferQueue by verl's worker bridge.
        batch.extra_info.update({"calculate_entropy": False, "compute_loss": False, "temperature": 1.0})
        output = self.ref_policy_wg.compute_ref_log_prob(batch)
        assert len(output) == len(batch)
        return batch



class _EOPDTaskRunnerActor(TaskRunnerV1.__ray_actor_class__):
    """verl's TaskRunnerV1. Being importable from here, Ray loads it by reference, which imports
    verl_eopd.trainer in the TaskRunner process and so registers the `eopd` v1 trainer there."""


EOPDTaskRunner = ray.remote(_EOPDTaskRunnerActor)
