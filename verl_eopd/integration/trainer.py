"""EOPD in verl's v1 trainer: the teacher in the reference role, the EOPD loss on the actor.

    trainer.v1.trainer_mode=eopd  ->  EOPDTrainer (registered in verl's v1 trainer registry by
                                      `register_eopd_trainer`, which the plugin's set-up calls in the
                                      TaskRunner process: EOPD_TASK_RUNNER=1, see main.py)

EOPDTrainer is verl's synchronous trainer whose hybrid worker is EOPDActorRolloutRefWorker. On both
teacher routes the worker binds `loss.eopd_ppo_loss` as its actor's loss (verl would bind
`distillation_ppo_loss`, whose top-k processor is verl's forward KL). With `teacher_route: ref` also:
  1. the ref role is always on (no KL loss needed) and loads the teacher (teacher.py);
  2. the reference pass runs the teacher at temperature 1 and returns the EOPD teacher fields; they reach
     `update_actor` through TransferQueue like any other worker output;
  3. `update_actor` tells the engine to call the logits processor. The processor computes the student's
     sampled-token log-prob itself, so pure distillation skips verl's separate student log-prob pass
     (`distillation_only`) without losing the reverse-KL term; with task rewards verl's PPO/GRPO loss
     runs on top and needs that pass, so it is kept.
With `teacher_route: server` (verl's vLLM/SGLang teacher pool, `distillation.enabled: true`) verl's own
teacher pool and flags do the rest.
"""

from __future__ import annotations

import logging
from functools import partial

import ray
from omegaconf import DictConfig
from verl.single_controller.base.decorator import Dispatch, make_nd_compute_dataproto_dispatch_fn, register
from verl.trainer.ppo.utils import Role
from verl.trainer.ppo.v1.trainer_base import register_trainer
from verl.trainer.ppo.v1.trainer_sync import PPOTrainerSync
from verl.utils import tensordict_utils as tu
from verl.utils.config import omega_conf_to_dataclass
from verl.workers.engine_workers import ActorRolloutRefWorker

from .config import (SETTINGS_FILE, EOPDLossConfig, build_loss_config, changed_settings, end_token_ids,
                     settings_record)
from .console import compact_tracking, earlier_launches_log, keep_earlier_launches
from .env import cpu_platform_requested
from .loss import eopd_ppo_loss
from .teacher import TeacherSettings, teacher_worker_class

logger = logging.getLogger("verl_eopd")
TRAINER_NAME = "eopd"


def teacher_settings(loss: EOPDLossConfig, distillation_config: DictConfig, model_config: DictConfig) -> TeacherSettings:
    """Teacher path, top-k and end-token ids for the reference-worker teacher (ids resolved from tokenizers)."""
    path = distillation_config.teacher_models.teacher_model.model_path
    student_eos, teacher_eos = end_token_ids(loss, model_config, path) if loss.eos_remap else (None, None)
    return TeacherSettings(model_path=path, topk=int(loss.topk), student_eos_token_id=student_eos,
                           teacher_eos_token_id=teacher_eos, logits_chunk_mb=int(loss.logits_chunk_mb),
                           param_dtype=loss.teacher_param_dtype, from_hidden=bool(loss.from_hidden))


class EOPDActorRolloutRefWorker(ActorRolloutRefWorker):
    """verl's hybrid actor/rollout/ref worker with the EOPD loss bound to the actor and, on the ref route,
    the teacher as the ref."""

    def __init__(self, config: DictConfig, role: str, distillation_config=None, **kwargs):
        if cpu_platform_requested():  # verl would ask for backend "cpu:gloo,cpu:gloo" (its CPU default + the device's)
            from verl.utils.distributed import initialize_global_process_group_ray

            initialize_global_process_group_ray(timeout_second=None, backend="gloo")
        super().__init__(config, role, distillation_config=distillation_config, **kwargs)
        self._eopd_loss = build_loss_config(distillation_config)
        if self._is_actor and self._eopd_loss.from_hidden:  # the student's pass from hidden states
            from .hidden import actor_worker_class

            self.actor_worker_cls = actor_worker_class()
        if self._is_ref and self._eopd_loss.teacher_route == "ref":
            # an instance attribute shadows the class attribute read by init_model
            self.ref_worker_cls = partial(teacher_worker_class(),
                                          teacher=teacher_settings(self._eopd_loss, distillation_config, config.model))

    @register(dispatch_mode=Dispatch.ONE_TO_ALL)
    def init_model(self):
        ActorRolloutRefWorker.init_model(self)
        if self._is_actor:  # the same ActorConfig verl builds in init_model, and the EOPD loss bound to it
            actor_config = omega_conf_to_dataclass(self.config.actor)
            actor_config.model_config = omega_conf_to_dataclass(self.config.model)
            distillation = omega_conf_to_dataclass(self.distillation_config)
            self.loss_fn = partial(eopd_ppo_loss, config=actor_config, distillation_config=distillation)
            self.actor.set_loss_fn(self.loss_fn)

    @register(dispatch_mode=make_nd_compute_dataproto_dispatch_fn(mesh_name="actor"))
    def update_actor(self, data):
        if not self.distillation_enabled:  # verl derives these flags from distillation.enabled (false on the ref route)
            tu.assign_non_tensor(data, distillation_use_topk=True,
                                 distillation_only=not self._eopd_loss.use_task_rewards)
        return ActorRolloutRefWorker.update_actor(self, data)


# the per-sample non-tensor fields that verl 0.9.1's model passes (actor update, ref/teacher pass) read: its FSDP
# engine's model inputs (found by grep over verl's engine, losses and workers)
MODEL_PASS_READS = frozenset({"multi_modal_inputs"})


def model_pass_fields(field_schema: dict[str, dict]) -> list[str]:
    """The fields of a TransferQueue batch that a model pass reads: every tensor field and MODEL_PASS_READS.
    `field_schema` is TransferQueue's {name: {"is_non_tensor": bool, ...}} (`BatchMeta.field_schema`)."""
    return [name for name, meta in field_schema.items() if not meta.get("is_non_tensor") or name in MODEL_PASS_READS]


def for_model_pass(batch):
    """A copy of the KVBatchMeta `batch` that names only `model_pass_fields`, so that verl's worker bridge fetches
    and builds only those: the per-sample rollout bookkeeping (prompt text, reward-model and tool kwargs,
    agent-loop metrics, ...) stays in TransferQueue. verl's bridge would otherwise fetch every field, and its
    engine rebuilds every per-sample non-tensor element of each micro-batch when it moves it to the device
    (`TensorDict.to`): on the embedded CPU run, 18 such fields of 512 responses cost about a fifth of the update
    and half of the teacher pass. The copy's extra_info is the caller's (verl's settings for the call)."""
    import dataclasses

    from verl.utils.transferqueue_utils import kv_batch_meta2batch_meta

    fields = model_pass_fields(kv_batch_meta2batch_meta(batch).field_schema)
    return dataclasses.replace(batch, fields=fields)


class EOPDTrainer(PPOTrainerSync):
    """verl's synchronous v1 trainer with the EOPD worker, and the teacher in the reference role when
    teacher_route is ref."""

    def __init__(self, config: DictConfig):
        super().__init__(config)
        self.eopd_ref_route = build_loss_config(config.distillation).teacher_route == "ref"
        if self.eopd_ref_route:
            self.use_reference_policy = True

    @property
    def logger(self):
        """verl's Tracking object of the run (set by verl's `fit`)."""
        return self.__dict__.get("_eopd_tracking")

    @logger.setter
    def logger(self, tracking):
        # verl creates Tracking inside `fit`; its console backend becomes the compact one (integration/console.py),
        # and a resumed run's file log gets back the lines of the earlier launches that Tracking's "wb" emptied
        self.__dict__["_eopd_tracking"] = compact_tracking(tracking, self.config, int(getattr(self, "total_training_steps", 0) or 0))
        keep_earlier_launches(tracking, self.__dict__.pop("_eopd_earlier_log", None))

    def _build_replay_buffer(self):
        """verl's synchronous replay buffer, polled every `trainer.v1.sampler.sampler_kwargs.poll_interval` s.

        verl chooses the sync buffer (and sync checkpoints, batched dataloader fetches) by
        `trainer_mode == "sync"`; ours is registered as "eopd" but is verl's sync trainer, so it runs in sync
        mode from here on. verl's buffer waits for rollouts in sleeps of a fixed 2.0 s, which on small models
        makes every generation step a multiple of 2 s; the EOPD config polls every 0.05 s instead.

        An agent-loop manager that can say when its rollouts have ended (`wait_idle`: the CPU manager,
        cpu/agent_loop.py) is waited for before each `sample`, training and validation alike, so the buffer
        finds the batch complete at its first listing instead of listing the partition every poll while the
        rollouts run. verl's own manager has no `wait_idle` and is polled as above."""
        self.trainer_mode = "sync"
        buffer = super()._build_replay_buffer()
        kwargs = self.config.trainer.v1.sampler.get("sampler_kwargs", None) or {}
        buffer.poll_interval = float(kwargs.get("poll_interval", buffer.poll_interval))
        sample = buffer.sample

        def sample_once_rollouts_end(*args, **kw):
            wait_idle = getattr(getattr(self, "agent_loop_manager", None), "wait_idle", None)
            if wait_idle is not None:
                wait_idle()
            return sample(*args, **kw)

        buffer.sample = sample_once_rollouts_end
        return buffer

    def _init_resource_pool_mgr(self):
        super()._init_resource_pool_mgr()
        if Role.Actor in self.role_worker_mapping:
            raise ValueError(
                "loss_mode=eopd needs verl's hybrid actor/rollout/ref worker: set actor_rollout_ref.hybrid_engine=true"
            )
        if self.eopd_ref_route:  # the ref role holds the teacher
            self.role_worker_mapping.pop(Role.ActorRollout, None)
            self.mapping.pop(Role.ActorRollout, None)
            self.role_worker_mapping[Role.ActorRolloutRef] = ray.remote(EOPDActorRolloutRefWorker)
            self.mapping[Role.ActorRolloutRef] = "global_pool"
        else:
            for role in (Role.ActorRollout, Role.ActorRolloutRef):
                if role in self.role_worker_mapping:
                    self.role_worker_mapping[role] = ray.remote(EOPDActorRolloutRefWorker)

    # ------------------------------------------------------------------ checkpoints
    EOPD_SETTINGS_FILE = SETTINGS_FILE

    def _eopd_settings(self) -> dict:
        return settings_record(self.config)

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
        """verl's resume; then the EOPD settings saved with the checkpoint are compared with this run's (a change
        was refused before Ray unless trainer.resume_accept_changed_eopd=true: config.check_resume), and the file
        log of the earlier launches is read, to be kept when `fit` reopens it (console.keep_earlier_launches)."""
        import json
        import os

        super()._load_checkpoint()
        if self.global_steps <= 0:
            return
        self.__dict__["_eopd_earlier_log"] = earlier_launches_log(self.config)  # before `fit` reopens the file
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
        changed = changed_settings(saved, now)
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
        output = self.ref_policy_wg.compute_ref_log_prob(for_model_pass(batch))
        assert len(output) == len(batch)
        return batch

    def _update_actor(self, batch, metrics: dict):
        """verl's update, given only the fields the update reads (`for_model_pass`); verl's settings for it
        are kept on `batch` as verl would leave them."""
        narrowed = for_model_pass(batch)
        super()._update_actor(narrowed, metrics)
        batch.extra_info.update(narrowed.extra_info)
        return batch




def register_eopd_trainer() -> None:
    """Register EOPDTrainer as trainer.v1.trainer_mode=eopd in verl's v1 registry (idempotent: verl accepts
    the same class twice and refuses another class under the name)."""
    register_trainer(TRAINER_NAME)(EOPDTrainer)
