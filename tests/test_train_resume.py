"""A killed training run continues from its last checkpoint on rerun, and a finished one is skipped."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from test_train_toyworld import QUICKSTART, write_dialogues

from pipeline.core.recipe import load_recipe
from pipeline.run.runner import open_run, run_stage
from pipeline.train.outputs import checkpoint_step, last_checkpoint

REPO = Path(__file__).resolve().parents[1]


def small_sft_recipe(tmp_path: Path) -> Path:
    """Quickstart with 64 prompts and 120 SFT steps, a checkpoint every 5."""
    data = yaml.safe_load(QUICKSTART.read_text())
    data["storage"] = {"root": str(tmp_path / "runs")}
    data["prompts"]["count"] = 64
    data["sft"]["args"].update(num_train_epochs=15, per_device_train_batch_size=8, save_steps=5,
                               save_total_limit=3, logging_steps=5)
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def wait_for_checkpoint(proc: subprocess.Popen, checkpoints: Path, timeout: float = 300) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = last_checkpoint(checkpoints)
        if found:
            return found
        if proc.poll() is not None:
            raise AssertionError(f"`distill stage sft` ended (code {proc.returncode}) before its first checkpoint")
        time.sleep(0.05)
    raise AssertionError(f"no checkpoint in {checkpoints} after {timeout}s")


@pytest.mark.slow
def test_killed_sft_continues_from_its_checkpoint_and_then_is_skipped(tmp_path: Path) -> None:
    recipe_path = small_sft_recipe(tmp_path)
    recipe = load_recipe(recipe_path)
    store = open_run(recipe, "resume")
    write_dialogues(store, recipe)
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "pipeline.cli", "stage", "sft", str(recipe_path),
                             "--run-name", "resume"], cwd=REPO, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        first = wait_for_checkpoint(proc, Path(store.join("sft", "checkpoints")))
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.kill()
        proc.wait()
    killed_at = checkpoint_step(last_checkpoint(Path(store.join("sft", "checkpoints"))))
    assert checkpoint_step(first) >= 5 and killed_at < 120
    assert store.stage_state("sft").status == "running"  # the killed process had no chance to record anything
    assert not Path(store.join("sft", "model")).exists()

    report = run_stage("sft", recipe, store)

    metrics = json.loads(Path(store.join("sft", "metrics.json")).read_text())
    assert metrics["resumed_from_step"] == killed_at
    assert metrics["global_step"] == 120
    assert report.status == "completed" and Path(store.join("sft", "model", "model.safetensors")).is_file()
    assert run_stage("sft", recipe, store).skipped
