"""Fault injection for tests/test_faults.py, loaded in every process of a run through VERL_USE_EXTERNAL_MODULES
(driver, TaskRunner, workers) and as the run's custom reward function. Inert unless its variables are set.

EOPD_TEST_PROMPT_LOG       the reward function appends "split index" of every scored training prompt (the
                           order in which verl's trainer consumed the dataloader)
EOPD_TEST_HANG_AFTER       with the log: once that many training prompts are scored, touch EOPD_TEST_MARKER and
                           hang (the run is then killed mid-step from outside)
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


if os.environ.get("EOPD_TEST_HANG_IN_SAVE"):
    _install_save_fault(int(os.environ["EOPD_TEST_HANG_IN_SAVE"]))
