"""`trainer.dry_run=true`: every check of a launch, verl's later ones included, then the plan; no Ray, no weights.

`verl_eopd.main.prepare` already makes the launcher's checks (the loss keys, strategies, micro-batches, token
budgets, paths, tokenizers, verl's `validate_config`, resume). A dry run adds the checks verl makes only after
Ray has started, each as verl makes it or by calling verl's own config classes:
  * resource pools (verl's TaskRunner: `global_pool` = [trainer.n_gpus_per_node] x trainer.nnodes, plus
    `teacher_pool` = [distillation.n_gpus_per_node] x distillation.nnodes on the server route, and a reward pool
    when enabled): verl places each node's share as one STRICT_PACK placement group, so each must fit one node, and
    all must fit the cluster's nodes; otherwise Ray waits forever (`place_pools`);
  * verl's RolloutConfig and DistillationConfig (teacher replicas that tile the teacher pool), the rollout's
    tensor-parallel size dividing the trainer's ranks (engine_workers asserts it);
  * the data: each local parquet file has the prompt column, and the training file holds at least one batch
    (verl drops the last partial batch).
The cluster's shape is taken from the command: trainer.nnodes nodes of trainer.node_gpus GPUs (null: this
machine's GPU count, or 8 in a dry run on a machine without GPUs). The plan (`plan`) lists ranks, pools and their
placement, batches and micro-batches, strategies, backends, checkpoint folder and loggers.
"""

from __future__ import annotations

import os
from typing import Optional

from omegaconf import OmegaConf

DEFAULT_NODE_GPUS = 8  # the GPU nodes our users run (8 x H100/H200); trainer.node_gpus plans others


def node_gpus(config, assume: bool = True) -> tuple[Optional[int], str]:
    """(GPUs per node of the cluster, where the number comes from): trainer.node_gpus, else this machine's GPU
    count, else (`assume`, a dry run on a machine without GPUs) DEFAULT_NODE_GPUS, else None."""
    value = OmegaConf.select(config, "trainer.node_gpus")
    if value:
        return int(value), "trainer.node_gpus"
    from .cpu.platform import gpu_available

    if gpu_available():
        import torch

        if torch.cuda.device_count():
            return torch.cuda.device_count(), "this machine's GPUs"
    if not assume:
        return None, "unknown"
    return DEFAULT_NODE_GPUS, "assumed: no GPU here; trainer.node_gpus=N plans nodes of N GPUs"


def pools(config) -> dict[str, tuple[str, int, int]]:
    """verl's resource pools: {pool: (the key of its GPUs per node, GPUs per node, nodes)} (trainer_base.py's
    init_resource_pool_mgr)."""
    sel = lambda key, default=None: OmegaConf.select(config, key, default=default)  # noqa: E731
    out = {"global_pool": ("trainer.n_gpus_per_node", int(config.trainer.n_gpus_per_node), int(config.trainer.nnodes))}
    if sel("reward.reward_model.enable_resource_pool", False):
        out["reward_pool"] = ("reward.reward_model.n_gpus_per_node", int(sel("reward.reward_model.n_gpus_per_node")),
                              int(sel("reward.reward_model.nnodes")))
    if sel("distillation.enabled", False):
        out["teacher_pool"] = ("distillation.n_gpus_per_node", int(sel("distillation.n_gpus_per_node")),
                               int(sel("distillation.nnodes")))
    return out


def place_pools(spec: dict[str, tuple[str, int, int]], nodes: int, per_node: int) -> list[list[tuple[str, int]]]:
    """Each pool's per-node groups (verl asks Ray for each as one STRICT_PACK placement group: all on one node)
    placed on `nodes` nodes of `per_node` GPUs, largest first: spread over the nodes when that fits, else packed
    (each on the fullest node that holds it); returns [[(pool, GPUs)] per node]. Raises naming the key and a fix
    when a group is larger than a node or the groups do not fit."""
    for name, (key, gpus, count) in spec.items():
        if gpus < 1 or count < 1:
            raise ValueError(f"{name}: {key}={gpus} x {count} nodes: a pool needs at least one GPU on one node. "
                             f"Fix: {key}=1 or more")
        if gpus > per_node:
            whole = -(-gpus * count // per_node)
            raise ValueError(
                f"{key}={gpus}: verl places the {name} on each node as one group, and a node has {per_node} GPUs: "
                f"Ray would wait forever. Fix: {key}={per_node} {key.replace('n_gpus_per_node', 'nnodes')}={whole}, or "
                f"trainer.node_gpus=<the real GPUs per node>")
    groups = sorted(((gpus, name) for name, (_, gpus, count) in spec.items() for _ in range(count)), reverse=True)
    for spread in (True, False):  # spread over the nodes (as a plan reads best), else pack tightly
        free, placed = [per_node] * nodes, [[] for _ in range(nodes)]
        for gpus, name in groups:
            fits = [i for i in range(nodes) if free[i] >= gpus]
            if not fits:
                break
            node = max(fits, key=lambda i: free[i]) if spread else min(fits, key=lambda i: free[i])
            free[node] -= gpus
            placed[node].append((name, gpus))
        else:
            return placed
    need = sum(g for g, _ in groups)
    key, size, _ = spec[name]
    if "teacher_pool" in spec and per_node > 1:  # the trainer and the teacher share each node
        share = min(spec["teacher_pool"][1], per_node // 2)
        fix = (f"trainer.n_gpus_per_node={per_node - share} distillation.n_gpus_per_node={share} "
               f"distillation.nnodes={nodes}")
    else:
        fix = "trainer.node_gpus=<the real GPUs per node>, or smaller pools"
    raise ValueError(
        f"the pools need {need} GPUs ({', '.join(f'{n} {g} x {c}' for n, (_, g, c) in spec.items())}) and "
        f"the cluster has {nodes} node(s) of {per_node} (trainer.nnodes x trainer.node_gpus): the {name} "
        f"group of {size} ({key}) fits no node and Ray would wait forever. Fix: {fix}")


def check_parallelism(config) -> None:
    """verl's later parallelism asserts, before Ray: the actor's mini-batch over the data-parallel ranks (every
    update, with dynamic batch sizes too: engine_workers.py) and the rollout replicas over the trainer's ranks."""
    sel = lambda key, default=None: OmegaConf.select(config, key, default=default)  # noqa: E731
    ranks = int(config.trainer.n_gpus_per_node) * int(config.trainer.nnodes)
    sp = int(sel("actor_rollout_ref.actor.ulysses_sequence_parallel_size", 1) or 1)
    dp = max(1, ranks // sp)
    n = int(sel("actor_rollout_ref.rollout.n", 1))
    mini = int(config.actor_rollout_ref.actor.ppo_mini_batch_size)
    if (mini * n) % dp:
        import math

        step = dp // math.gcd(dp, n)  # prompts per mini-batch must be a multiple of this
        fit = max(step, mini - mini % step)
        raise ValueError(
            f"actor_rollout_ref.actor.ppo_mini_batch_size={mini} x rollout.n={n} = {mini * n} responses do not split "
            f"over {dp} data-parallel ranks: verl would stop at the first update. "
            f"Fix: actor_rollout_ref.actor.ppo_mini_batch_size={fit}")
    tp = int(sel("actor_rollout_ref.rollout.tensor_model_parallel_size", 1) or 1)
    replica = tp * int(sel("actor_rollout_ref.rollout.data_parallel_size", 1) or 1) * int(
        sel("actor_rollout_ref.rollout.pipeline_model_parallel_size", 1) or 1)
    if ranks % replica:
        fit = max(d for d in range(1, tp + 1) if ranks % d == 0)
        raise ValueError(
            f"actor_rollout_ref.rollout.tensor_model_parallel_size={tp}: a rollout replica of {replica} GPUs does not "
            f"tile the trainer's {ranks} ranks (verl asserts it when the workers start). "
            f"Fix: actor_rollout_ref.rollout.tensor_model_parallel_size={fit}")


def verl_configs(config) -> dict:
    """verl's own config classes for what its workers build later (their __post_init__ checks run here):
    RolloutConfig, and DistillationConfig on the server route (the teacher replicas must tile the pool)."""
    from verl.utils.config import omega_conf_to_dataclass

    out = {"rollout": omega_conf_to_dataclass(config.actor_rollout_ref.rollout)}
    if OmegaConf.select(config, "distillation.enabled"):
        out["distillation"] = omega_conf_to_dataclass(config.distillation)
    return out


def check_data(config) -> dict:
    """Each local parquet file's rows, read from its footer (no data loaded): it must have the prompt column
    (data.prompt_key), and the training files at least one batch (verl drops the last partial batch, so fewer
    rows than data.train_batch_size train no step). Returns {key: rows (None for remote files)}."""
    import pyarrow.parquet as pq

    from .integration.config import _REMOTE, _files

    prompt = str(OmegaConf.select(config, "data.prompt_key", default="prompt") or "prompt")
    rows = {}
    for key in ("data.train_files", "data.val_files"):
        total: Optional[int] = 0
        for f in _files(OmegaConf.select(config, key)):
            if f.startswith(_REMOTE) or not f.endswith(".parquet"):
                total = None
                continue
            meta = pq.read_metadata(os.path.expanduser(f))
            columns = meta.schema.to_arrow_schema().names  # top-level (schema.names lists nested leaves)
            if prompt not in columns:
                raise ValueError(f"{key}: {f} has no column {prompt!r} (columns {columns}). Fix: "
                                 f"data.prompt_key=<its prompt column>, or convert it with scripts/prepare_data.py")
            total = None if total is None else total + meta.num_rows
        rows[key] = total
    batch = int(config.data.train_batch_size)
    train = rows["data.train_files"]
    if train is not None and train < batch:
        raise ValueError(f"data.train_files hold {train} prompts, fewer than one batch of data.train_batch_size={batch}"
                         f" (verl drops the last partial batch): no step would train. "
                         f"Fix: data.train_batch_size={max(1, train)}")
    return rows


def _loggers(config) -> list[str]:
    loggers = OmegaConf.select(config, "trainer.logger") or []
    return [loggers] if isinstance(loggers, str) else list(loggers)


def plan(config, prepared, notes: list[str]) -> dict:
    """The checks only a dry run makes (verl's config classes, pools on the cluster's nodes, the data), then what
    the run would be, as a dict (printed by `format_plan`). `prepared`: verl_eopd.main.prepare's result."""
    sel = lambda key, default=None: OmegaConf.select(config, key, default=default)  # noqa: E731
    out: dict = {"device": "cpu" if prepared.on_cpu else "cuda", "notes": list(notes)}
    verl = verl_configs(config)
    nodes = int(config.trainer.nnodes)
    spec = pools(config)
    if prepared.on_cpu:
        per_node, source = int(config.trainer.n_gpus_per_node), "CPU ranks (logical Ray GPUs)"
    else:
        per_node, source = node_gpus(config)
    out["cluster"] = {"nodes": nodes, "gpus_per_node": per_node, "from": source}
    if not prepared.on_cpu:
        out["placement"] = place_pools(spec, nodes, per_node)
    out["pools"] = {name: {"key": key, "gpus_per_node": gpus, "nodes": count} for name, (key, gpus, count) in spec.items()}
    ranks = int(config.trainer.n_gpus_per_node) * nodes
    sp = int(sel("actor_rollout_ref.actor.ulysses_sequence_parallel_size", 1) or 1)
    n = int(sel("actor_rollout_ref.rollout.n", 1))
    mini = int(config.actor_rollout_ref.actor.ppo_mini_batch_size)
    prompts = int(config.data.train_batch_size)
    out["ranks"] = {"trainer": ranks, "data_parallel": ranks // sp, "ulysses_sp": sp}
    out["batches"] = {"prompts_per_step": prompts, "responses_per_step": prompts * n, "mini_batch_prompts": mini,
                      "updates_per_step": prompts // mini * int(sel("actor_rollout_ref.actor.ppo_epochs", 1)),
                      "responses_per_rank_per_update": mini * n // max(1, ranks // sp)}
    if sel("actor_rollout_ref.actor.use_dynamic_bsz"):
        out["micro_batches"] = {"dynamic": True,
                                "actor_tokens_per_gpu": sel("actor_rollout_ref.actor.ppo_max_token_len_per_gpu"),
                                "log_prob_tokens_per_gpu": sel("actor_rollout_ref.rollout.log_prob_max_token_len_per_gpu"),
                                "teacher_tokens_per_gpu": sel("actor_rollout_ref.ref.log_prob_max_token_len_per_gpu")}
    else:
        out["micro_batches"] = {"dynamic": False,
                                "actor": sel("actor_rollout_ref.actor.ppo_micro_batch_size_per_gpu"),
                                "log_prob": sel("actor_rollout_ref.rollout.log_prob_micro_batch_size_per_gpu"),
                                "teacher": sel("actor_rollout_ref.ref.log_prob_micro_batch_size_per_gpu")}
    out["strategy"] = {"actor": sel("actor_rollout_ref.actor.strategy"), "ref": sel("actor_rollout_ref.ref.strategy")}
    rollout = verl["rollout"]
    out["rollout"] = {"name": rollout.name, "tensor_parallel": rollout.tensor_model_parallel_size,
                      "dtype": sel("actor_rollout_ref.rollout.dtype")}
    loss = prepared.loss
    teacher = {"path": sel("distillation.teacher_models.teacher_model.model_path"), "route": loss.teacher_route}
    if "distillation" in verl:
        (t,) = verl["distillation"].teacher_models.values()
        teacher.update(backend=t.inference.name, replicas=t.num_replicas, gpus_per_replica=t.per_replica_world_size)
    else:
        teacher.update(backend="verl's reference worker (FSDP)", replicas=None)
    out["teacher"] = teacher
    out["student"] = sel("actor_rollout_ref.model.path")
    out["loss"] = {"algorithm": None, "topk": loss.topk, "entropy_threshold": loss.entropy_threshold,
                   "fkl_coef": loss.fkl_coef, "use_task_rewards": loss.use_task_rewards,
                   "from_hidden": loss.from_hidden}
    rows = check_data(config)
    epochs = int(sel("trainer.total_epochs", 1))
    steps = sel("trainer.total_training_steps")
    train = rows["data.train_files"]
    out["data"] = {"train_files": sel("data.train_files"), "val_files": sel("data.val_files"), "train_rows": train,
                   "val_rows": rows["data.val_files"],
                   "steps": int(steps) if steps else (train // prompts * epochs if train is not None else None),
                   "epochs": epochs}
    out["checkpoints"] = {"dir": sel("trainer.default_local_dir"), "save_freq": sel("trainer.save_freq"),
                          "keep": sel("trainer.max_actor_ckpt_to_keep"), "resume_mode": sel("trainer.resume_mode")}
    from .report import metrics_path, tensorboard_dir

    loggers = _loggers(config)
    out["loggers"] = {"names": loggers, "file": prepared.env.get("VERL_FILE_LOGGER_PATH") or metrics_path(config)}
    if "tensorboard" in loggers:
        out["loggers"]["tensorboard"] = tensorboard_dir(config)
    return out


def format_plan(p: dict, algorithm: str) -> str:
    """The plan as the lines a dry run prints."""
    c, b, m, r, t, d, k = (p[x] for x in ("cluster", "batches", "micro_batches", "rollout", "teacher", "data",
                                          "checkpoints"))
    lines = [f"[verl_eopd] dry run: every check passed; nothing was started (no Ray, no weights loaded)",
             f"  algorithm     {algorithm} on {p['device']}",
             f"  cluster       {c['nodes']} node(s) x {c['gpus_per_node']} GPUs ({c['from']})"]
    for name, pool in p["pools"].items():
        lines.append(f"  pool          {name}: {pool['gpus_per_node']} GPUs x {pool['nodes']} node(s) ({pool['key']})")
    for i, node in enumerate(p.get("placement", [])):
        lines.append(f"  node {i:<8} " + (", ".join(f"{name} {g}" for name, g in node) or "(unused)"))
    rk = p["ranks"]
    lines.append(f"  ranks         {rk['trainer']} trainer ranks, {rk['data_parallel']} data-parallel (ulysses sp "
                 f"{rk['ulysses_sp']})")
    lines.append(f"  batches       {b['prompts_per_step']} prompts -> {b['responses_per_step']} responses per step, "
                 f"{b['updates_per_step']} update(s) of {b['mini_batch_prompts']} prompts, "
                 f"{b['responses_per_rank_per_update']} responses per rank per update")
    if m["dynamic"]:
        lines.append(f"  micro-batches dynamic: actor {m['actor_tokens_per_gpu']} tokens/GPU, log-probs "
                     f"{m['log_prob_tokens_per_gpu']}, teacher {m['teacher_tokens_per_gpu']}")
    else:
        lines.append(f"  micro-batches actor {m['actor']}, log-probs {m['log_prob']}, teacher {m['teacher']} per GPU")
    lines.append(f"  strategy      actor {p['strategy']['actor']}, ref/teacher {p['strategy']['ref']}")
    lines.append(f"  rollout       {r['name']} (tensor parallel {r['tensor_parallel']}, {r['dtype']})")
    reps = f", {t['replicas']} replica(s) x {t['gpus_per_replica']} GPUs" if t.get("replicas") else ""
    lines.append(f"  teacher       {t['path']} (route {t['route']}: {t['backend']}{reps})")
    lines.append(f"  student       {p['student']}")
    lo = p["loss"]
    lines.append(f"  loss          topk {lo['topk']}, tau {lo['entropy_threshold']}, fkl_coef {lo['fkl_coef']}, "
                 f"task rewards {lo['use_task_rewards']}, from_hidden {lo['from_hidden']}")
    lines.append(f"  data          {d['train_files']} ({d['train_rows']} prompts), validation {d['val_files']} "
                 f"({d['val_rows']}); {d['steps']} steps ({d['epochs']} epochs, before overlong-prompt filtering)")
    lines.append(f"  checkpoints   {k['dir']} (every {k['save_freq']} steps, keep {k['keep']}, resume {k['resume_mode']})")
    lg = p["loggers"]
    where = [f"file {lg['file']}" if lg.get("file") else None,
             f"tensorboard {lg['tensorboard']} (relative to the TaskRunner's directory)" if lg.get("tensorboard") else None]
    lines.append(f"  loggers       {', '.join(lg['names'])}" + "".join(f"; {w}" for w in where if w))
    lines.extend(f"  note          {n}" for n in p["notes"])
    return "\n".join(lines)
