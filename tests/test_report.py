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
    (tmp_path / "ckpt" / "global_step_3").mkdir(parents=True)
    monkeypatch.setenv("VERL_FILE_LOGGER_PATH", str(path))
    text = summarize(_config(tmp_path), 125.0, teacher_accuracy=0.967)
    assert "run finished in 2.1 min" in text
    assert f"student 15.8% -> 46.9% (+31.1 points)  [{key}; step 0: 15.8%, 3: 46.9%]" in text
    assert "teacher 96.7% on the same problems" in text
    assert "gate fraction 0.199 -> 0.197" in text and "reverse KL 1.000 -> 0.333 nats" in text
    assert f"checkpoint: {tmp_path / 'ckpt' / 'global_step_3'}" in text and f"metrics:    {path}" in text
