"""Training curves where people look: `report_to: [tensorboard]` in sft.args / dpo.args writes TensorBoard event
files into the run store (`<stage>/tensorboard`, uploaded with the stage on S3), and the stage's Prefect artifact
says where they are."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from test_train_toyworld import toy_recipe, write_dialogues, write_pairs

from pipeline.core.stage import StageReport
from pipeline.core.store import RunStore
from pipeline.run.runner import open_run, run_stage

TINY = {"max_steps": 4, "per_device_train_batch_size": 4, "logging_steps": 1, "save_steps": 2}


def tensorboard_losses(logdir: Path) -> dict[int, float]:
    """{step: train/loss} as TensorBoard itself reads the event files under `logdir`."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    files = sorted(logdir.glob("events.out.tfevents.*"))
    assert files, f"no event files in {logdir}: {sorted(p.name for p in logdir.parent.rglob('*'))}"
    events = EventAccumulator(str(logdir))
    events.Reload()
    assert "train/loss" in events.Tags()["scalars"], events.Tags()
    return {e.step: e.value for e in events.Scalars("train/loss")}


def tensorboard_args(logdir: Path) -> dict[str, Any]:
    """The training arguments the run wrote to TensorBoard (its `args` text)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(logdir))
    events.Reload()
    text = events.Tensors("args/text_summary")[0].tensor_proto.string_val[0].decode()
    return json.loads(text)


def logged_losses(metrics_path: Path) -> dict[int, float]:
    """{step: loss} the trainer logged, from the stage's metrics.json."""
    history = json.loads(metrics_path.read_text())["history"]
    return {h["step"]: h["loss"] for h in history if "loss" in h and "train_runtime" not in h}


def tiny_recipe(root: str, report_to: Any) -> Any:
    """The quickstart with 16 prompts and 4 logged steps of sft and dpo on the tiny student."""
    dpo = {"beta": 0.1, "loss_type": ["sigmoid"], "args": {**TINY, "max_length": 64, "report_to": report_to}}
    return toy_recipe(root, prompts={"source": "task", "count": 16},
                      sft={"model": "builtin:tiny", "args": {**TINY, "report_to": report_to}}, dpo=dpo)


@pytest.mark.slow
def test_sft_and_dpo_write_their_loss_curves_to_tensorboard_in_the_run_store(tmp_path: Path) -> None:
    recipe = tiny_recipe(str(tmp_path), ["tensorboard"])
    store = open_run(recipe, "curves")
    write_dialogues(store, recipe)
    sft = run_stage("sft", recipe, store)
    write_pairs(store, recipe)
    dpo = run_stage("dpo", recipe, store)

    for stage, report in (("sft", sft), ("dpo", dpo)):
        stage_dir = Path(store.join(stage))
        assert report.outputs["tensorboard"] == str(stage_dir / "tensorboard"), report.outputs
        curve = tensorboard_losses(stage_dir / "tensorboard")
        assert sorted(curve) == [1, 2, 3, 4], curve
        assert curve == pytest.approx(logged_losses(stage_dir / "metrics.json"), rel=1e-5)
        assert not list((stage_dir / "checkpoints").rglob("events.out.tfevents.*"))  # not among checkpoints
        assert tensorboard_args(stage_dir / "tensorboard")["run_name"] == f"curves-{stage}"


@pytest.mark.slow
def test_on_s3_the_event_files_are_uploaded_with_the_stage(s3, tmp_path: Path) -> None:
    import uuid

    recipe = tiny_recipe(f"s3://{s3.bucket}/curves-{uuid.uuid4().hex[:8]}", ["tensorboard"])
    store = open_run(recipe, "remote")
    write_dialogues(store, recipe)
    report = run_stage("sft", recipe, store)

    remote = store.join("sft", "tensorboard")
    assert report.outputs["tensorboard"] == remote
    local = tmp_path / "downloaded"
    store.download_dir(local, "sft", "tensorboard")
    curve = tensorboard_losses(local)
    metrics = tmp_path / "metrics.json"
    metrics.write_bytes(store.fs.cat_file(store.join("sft", "metrics.json")))
    assert sorted(curve) == [1, 2, 3, 4] and curve == pytest.approx(logged_losses(metrics), rel=1e-5)


def test_the_stage_artifact_links_the_tensorboard_curves(tmp_path: Path) -> None:
    from pipeline.flows.artifacts import stage_markdown

    store = RunStore(str(tmp_path / "runs"), "r")
    curves = store.join("sft", "tensorboard")
    report = StageReport("sft", counts={"output": 3}, outputs={"model": store.join("sft", "model"),
                                                               "tensorboard": curves})
    text = stage_markdown("sft", store, report)
    assert f"[{curves}](file://{curves})" in text and f"`tensorboard --logdir {curves}`" in text
    plain = stage_markdown("sft", store, StageReport("sft", outputs={"model": store.join("sft", "model")}))
    assert "tensorboard" not in plain.lower()
