"""sft and dpo say how long they trained and warn when it is too short to trust, naming the settings."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from pipeline.train.outputs import MIN_STEPS, training_size

ROOT = Path(__file__).resolve().parent.parent


def test_enough_steps_give_no_warning():
    text = training_size("dpo", {"global_step": MIN_STEPS, "epoch": 2.0, "effective_batch": 8}, 80)
    assert text == "20 steps, 2.00 epochs, effective batch 8"


def test_short_sft_run_warns_with_its_batch_settings_in_the_cli_and_metrics(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1"}
    base = [sys.executable, "-m", "pipeline.cli", "run", str(ROOT / "configs/quickstart.yaml"), "--no-prefect",
            "--run-name", "short", "--stages", "generate,sft", "--set", f"storage.root={tmp_path}",
            "--set", "prompts.count=8", "--set", "sft.args.num_train_epochs=1"]
    proc = subprocess.run(base, capture_output=True, text=True, timeout=400, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "effective batch 16" in proc.stdout
    assert "WARNING: sft trained only 1 steps" in proc.stdout
    assert "sft.args.per_device_train_batch_size=16" in proc.stdout
    assert "sft.args.gradient_accumulation_steps=1" in proc.stdout
    assert "WARNING pipeline: sft trained only 1 steps" in proc.stderr  # logged too, for the Prefect run log
    metrics = json.loads((tmp_path / "short/sft/metrics.json").read_text())
    assert metrics["effective_batch"] == 16 and metrics["global_step"] == 1


def test_short_dpo_run_warns_with_its_batch_settings_in_the_cli_and_the_log(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run(
        [sys.executable, "-m", "pipeline.cli", "run", str(ROOT / "configs/quickstart.yaml"), "--no-prefect",
         "--run-name", "short", "--stages", "generate,sft,sample,feedback,dpo", "--set", f"storage.root={tmp_path}",
         "--set", "prompts.count=8", "--set", "sft.args.num_train_epochs=1", "--set", "dpo.args.num_train_epochs=1"],
        capture_output=True, text=True, timeout=600, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    dpo_line = next(line for line in proc.stdout.splitlines() if line.startswith("dpo:"))
    assert "steps" in dpo_line and "effective batch" in dpo_line
    assert "WARNING: dpo trained only" in proc.stdout and "dpo.args.per_device_train_batch_size=" in proc.stdout
    assert "WARNING pipeline: dpo trained only" in proc.stderr
