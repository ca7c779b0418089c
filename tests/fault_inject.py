"""Fault injection for tests/test_faults.py, loaded in every process of a run through VERL_USE_EXTERNAL_MODULES
(driver, TaskRunner, workers) and as the run's custom reward function. Inert unless its variables are set.

EOPD_TEST_PROMPT_LOG       the reward function appends "split index" of every scored training prompt (the
                           order in which verl's trainer consumed the dataloader)
EOPD_TEST_HANG_AFTER       with the log: once that many training prompts are scored, touch EOPD_TEST_MARKER and
                           hang (the run is then killed mid-step from outside)
EOPD_TEST_STATE_LOG        verl's FSDP checkpoint manager appends one JSON line per save (after writing, the state it
                           saved) and per load (after reading, the state it restored): SHA-256 digests of the
                           actor's model and optimizer state (this rank's shards) and the learning rates
EOPD_TEST_HANG_IN_SAVE     a global step: verl's FSDP checkpoint save of that step makes room as verl does
                           (ensure_checkpoint_capacity), writes a torn model file, touches EOPD_TEST_MARKER and
                           hangs (the run is then killed during the save)
"""

from __future__ import annotations

import os
import time


def _hang() -> None:
    open(os.environ["EOPD_TEST_MARKER"], "w").close()
    while True:
        time.sleep(60)


def compute_score(data_source, solution_str, ground_truth, extra_info=None):
    from verl_eopd.cpu.embedded import compute_score as score

    log = os.environ.get("EOPD_TEST_PROMPT_LOG")
    if log and extra_info and extra_info.get("split") == "train":
        with open(log, "a") as f:
            f.write(f"train {extra_info['index']}\n")
        with open(log) as f:
            seen = sum(1 for _ in f)
        hang_after = int(os.environ.get("EOPD_TEST_HANG_AFTER", "0"))
        if hang_after and seen >= hang_after:
            _hang()
    return score(data_source, solution_str, ground_truth, extra_info)


def _install_save_fault(step: int) -> None:
    from verl.utils.checkpoint.fsdp_checkpoint_manager import FSDPCheckpointManager

    original = FSDPCheckpointManager.save_checkpoint

    def save_checkpoint(self, local_path, hdfs_path=None, global_step=0, max_ckpt_to_keep=None, **kwargs):
        if global_step != step:
            return original(self, local_path, hdfs_path=hdfs_path, global_step=global_step,
                            max_ckpt_to_keep=max_ckpt_to_keep, **kwargs)
        self.ensure_checkpoint_capacity(max_ckpt_to_keep)  # what verl deletes before it writes
        os.makedirs(local_path, exist_ok=True)
        with open(os.path.join(local_path, "model_world_size_1_rank_0.pt"), "wb") as f:
            f.write(b"torn write")
        _hang()

    FSDPCheckpointManager.save_checkpoint = save_checkpoint


def state_digest(manager) -> dict:
    """Digests of the model parameters and the optimizer state the manager holds (local shards, in key order)."""
    import hashlib

    import torch

    def update(h, value) -> None:
        if isinstance(value, torch.Tensor):
            t = value.to_local() if hasattr(value, "to_local") else value
            h.update(str((tuple(t.shape), t.dtype)).encode())
            h.update(t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
        else:
            h.update(repr(value).encode())

    model = hashlib.sha256()
    for name, value in sorted(manager.model.state_dict().items()):
        model.update(name.encode())
        update(model, value)
    opt_state = manager.optimizer.state_dict()
    optim = hashlib.sha256()
    for pid in sorted(opt_state["state"]):
        for key, value in sorted(opt_state["state"][pid].items()):
            optim.update(f"{pid}.{key}".encode())
            update(optim, value)
    return {"model": model.hexdigest(), "optimizer": optim.hexdigest(), "n_optimizer_states": len(opt_state["state"]),
            "lr": [g["lr"] for g in opt_state["param_groups"]]}


def _install_state_log(path: str) -> None:
    import json

    from verl.utils.checkpoint.fsdp_checkpoint_manager import FSDPCheckpointManager

    save, load = FSDPCheckpointManager.save_checkpoint, FSDPCheckpointManager.load_checkpoint

    def log(event: dict) -> None:
        with open(path, "a") as f:
            f.write(json.dumps(event) + "\n")

    def save_checkpoint(self, local_path, hdfs_path=None, global_step=0, max_ckpt_to_keep=None, **kwargs):
        out = save(self, local_path, hdfs_path=hdfs_path, global_step=global_step, max_ckpt_to_keep=max_ckpt_to_keep,
                   **kwargs)
        if self.model is not None and self.optimizer is not None:
            log({"event": "save", "step": int(global_step), "path": local_path, **state_digest(self)})
        return out

    def load_checkpoint(self, local_path, *args, **kwargs):
        out = load(self, local_path, *args, **kwargs)
        if local_path is not None and self.model is not None and self.optimizer is not None:
            log({"event": "load", "path": local_path, **state_digest(self)})
        return out

    FSDPCheckpointManager.save_checkpoint = save_checkpoint
    FSDPCheckpointManager.load_checkpoint = load_checkpoint


if os.environ.get("EOPD_TEST_STATE_LOG"):
    _install_state_log(os.environ["EOPD_TEST_STATE_LOG"])
if os.environ.get("EOPD_TEST_HANG_IN_SAVE"):
    _install_save_fault(int(os.environ["EOPD_TEST_HANG_IN_SAVE"]))
