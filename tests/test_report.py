"""The run's header and end-of-run summary (verl_eopd/report.py), on hand-made configs and metric logs."""

from __future__ import annotations

import json

import pytest
from omegaconf import OmegaConf

from verl_eopd.report import header, summarize

pytestmark = pytest.mark.unit


def _config(tmp_path, logger=("console", "file")):
    return OmegaConf.create({
        "actor_rollout_ref": {"model": {"path": "/m/student"}, "rollout": {"name": "hf", "val_kwargs": {"do_sample": False}}},
        "distillation": {"teacher_models": {"teacher_model": {"model_path": "/m/teacher"}}},
        "data": {"train_files": "/d/train.parquet", "val_files": "/d/val.parquet"},
        "trainer": {"n_gpus_per_node": 2, "nnodes": 1, "total_training_steps": 60, "logger": list(logger),
                    "project_name": "p", "experiment_name": "e", "default_local_dir": str(tmp_path / "ckpt"),
                    "console": "compact"},
    })


def test_header_names_models_device_outputs_and_the_console_switch(tmp_path, monkeypatch):
    monkeypatch.setenv("VERL_FILE_LOGGER_PATH", str(tmp_path / "m.jsonl"))
    text = header(_config(tmp_path), "eopd", on_cpu=True)
    assert text.splitlines()[0] == "[verl_eopd] algorithm=eopd on CPU (2 ranks), rollout hf"
    for part in ("student /m/student", "teacher /m/teacher", "data    /d/train.parquet (validation /d/val.parquet)",
                 f"checkpoints {tmp_path / 'ckpt'}", f"metrics {tmp_path / 'm.jsonl'}", "trainer.console=full"):
        assert part in text, part
    assert "on 2 GPUs" in header(_config(tmp_path), "opd", on_cpu=False)
    monkeypatch.delenv("VERL_FILE_LOGGER_PATH")
    assert "no file logger" in header(_config(tmp_path, logger=("console",)), "eopd", on_cpu=True)


def test_summary_reads_verls_log_before_and_after(tmp_path, monkeypatch):
    path = tmp_path / "m.jsonl"
    key = "val-core/eopd_tiny_add/acc/mean@1"
    records = [{"step": 0, "data": {key: 0.158}}]
    records += [{"step": s, "data": {"actor/eopd/gate_frac": 0.2 - s / 1000, "actor/eopd/rkl_mean": 1.0 / s}} for s in (1, 2, 3)]
    records += [{"step": 3, "data": {key: 0.469}}]
    path.write_text("\n".join(json.dumps(r) for r in records) + "\n")
    (tmp_path / "ckpt" / "global_step_3" / "actor").mkdir(parents=True)
    (tmp_path / "ckpt" / "latest_checkpointed_iteration.txt").write_text("3")
    monkeypatch.setenv("VERL_FILE_LOGGER_PATH", str(path))
    text = summarize(_config(tmp_path), 125.0, teacher_accuracy=0.967)
    assert "run finished in 2.1 min" in text
    assert f"student 15.8% -> 46.9% (+31.1 points)  [{key}; step 0: 15.8%, 3: 46.9%]" in text
    assert "teacher 96.7% on the same problems" in text
    assert "gate fraction 0.199 -> 0.197" in text and "reverse KL 1.000 -> 0.333 nats" in text
    assert f"checkpoint: {tmp_path / 'ckpt' / 'global_step_3'} (step 3," in text and f"metrics:    {path}" in text
    assert (f"export:     python -m verl.model_merger merge --backend fsdp --local_dir "
            f"{tmp_path / 'ckpt' / 'global_step_3' / 'actor'} --target_dir {tmp_path / 'ckpt' / 'hf' / 'global_step_3'}"
            in text)


def _ckpt(tmp_path, steps, tracker):
    for step in steps:
        (tmp_path / "ckpt" / f"global_step_{step}" / "actor").mkdir(parents=True)
    if tracker is not None:
        (tmp_path / "ckpt" / "latest_checkpointed_iteration.txt").write_text(tracker)


def _line(text, start):
    return next(line.strip() for line in text.splitlines() if line.strip().startswith(start))


def test_the_last_checkpoint_is_the_step_verls_tracker_names_not_the_newest_folder(tmp_path):
    """A save cut short leaves global_step_6 on disk without the tracker moving past 4 (verl writes the tracker
    after the shards); the step also need not be total_training_steps (60) or any computed figure."""
    _ckpt(tmp_path, [2, 4, 6], tracker="4")
    text = summarize(_config(tmp_path), 60.0)
    root = tmp_path / "ckpt"
    assert _line(text, "checkpoint:") == f"checkpoint: {root / 'global_step_4'} (step 4, from latest_checkpointed_iteration.txt)"
    assert _line(text, "export:") == (f"export:     python -m verl.model_merger merge --backend fsdp --local_dir "
                                      f"{root / 'global_step_4' / 'actor'} --target_dir {root / 'hf' / 'global_step_4'}")
    assert _line(text, "HF folder:").startswith(f"HF folder:  {root / 'hf' / 'global_step_4'} (after the export")


@pytest.mark.parametrize("steps,tracker,expected", [
    ([], None, "none saved; trainer.save_freq"),
    ([3], "3x", "holds '3x', not a step number"),
    ([1], "5", "names step 5, but"),
])
def test_missing_or_broken_checkpoints_are_said_not_guessed(tmp_path, steps, tracker, expected):
    _ckpt(tmp_path, steps, tracker)
    text = summarize(_config(tmp_path), 60.0)
    assert expected in _line(text, "checkpoint:")
    assert "model_merger" not in text


def test_a_checkpoint_saved_with_hf_model_points_at_its_own_folder(tmp_path):
    _ckpt(tmp_path, [3], tracker="3")
    hf = tmp_path / "ckpt" / "global_step_3" / "actor" / "huggingface"
    hf.mkdir()
    (hf / "config.json").write_text("{}")  # config and tokenizer only: verl's default save
    assert "model_merger" in summarize(_config(tmp_path), 60.0)
    (hf / "model.safetensors").write_bytes(b"")  # save_contents=[model,optimizer,extra,hf_model]
    text = summarize(_config(tmp_path), 60.0)
    assert "model_merger" not in text and _line(text, "HF folder:").startswith(f"HF folder:  {hf} (saved with")


@pytest.mark.parametrize("logger", [("console",), ("console", "tensorboard"), ("console", "wandb"),
                                    ("console", "file")])
def test_summary_without_a_metrics_file_still_prints_the_export_and_where_metrics_went(tmp_path, monkeypatch, logger):
    monkeypatch.delenv("TENSORBOARD_DIR", raising=False)
    _ckpt(tmp_path, [2], tracker="2")
    text = summarize(_config(tmp_path, logger=logger), 60.0)  # the file logger's file was never written
    assert "--local_dir " + str(tmp_path / "ckpt" / "global_step_2" / "actor") in _line(text, "export:")
    assert "add trainer.logger='[console,file]'" in text
    if "tensorboard" in logger:
        assert f"tensorboard --logdir {tmp_path / 'tensorboard_log' / 'p' / 'e'}" in text
    if "wandb" in logger:
        assert "wandb: project p, run e" in text
    if "file" in logger:
        assert "does not exist" in text
