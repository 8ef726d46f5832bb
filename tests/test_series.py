"""Series that build on each other: earlier runs' data joins a run's training (or not), a warm start from the
series' current model, and a gate that a tie never passes. The flow-level runs are in test_flows.py."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from test_evaluate import build_students, live, toy_run
from test_train_toyworld import mark_completed, toy_recipe, write_pairs

from pipeline.core.store import RunStore, StageState
from pipeline.run.runner import open_run, run_stage
from pipeline.series.data import SeriesDataError
from pipeline.series.promotion import promotion_for_run
from pipeline.series.series import Series
from pipeline.stages.sft.stage import series_dialogues
from pipeline.tasks.toy.task import corpus
from pipeline.tasks.toy.teacher_server import ToyTeacher, ToyTeacherConfig
from pipeline.train.student import build_student


def _prompts(path: Path, n: int) -> Path:
    path.write_text("".join(json.dumps({"prompt": f"What is {i // 10} + {i % 10}?"}) + "\n" for i in range(n)))
    return path


def _completed_run(series: Series, recipe: Any, name: str, model: bool = True) -> tuple[Any, RunStore]:
    store = open_run(recipe, name)
    prepared = series.prepare_run(recipe, store)
    if model:
        Path(store.join("sft", "model")).mkdir(parents=True)
        mark_completed(store, "sft", prepared, 1)
    series.record(store, "completed", promotion=promotion_for_run(store, series.current_model))
    return prepared, store


def test_accumulate_trains_on_every_earlier_completed_run_new_only_on_none(tmp_path: Path) -> None:
    recipe = toy_recipe(tmp_path / "runs", prompts={"source": str(_prompts(tmp_path / "p.jsonl", 10))})
    series = Series(recipe, "grow")
    first, store1 = _completed_run(series, recipe, "grow-1")
    assert first.series.previous_runs == []  # nothing earlier yet
    _prompts(tmp_path / "p.jsonl", 20)
    second, store2 = _completed_run(series, recipe, "grow-2")
    assert second.series.previous_runs == [store1.url] and second.sft.model == recipe.sft.model
    _prompts(tmp_path / "p.jsonl", 30)
    store3 = open_run(recipe, "grow-3")
    third = series.prepare_run(recipe, store3)
    assert third.series.previous_runs == [store1.url, store2.url]
    entry = series.entries()[-1]
    assert (entry.data, entry.trained_on, entry.warm_start_from) == ("accumulate", [store1.url, store2.url], None)

    only_new = recipe.model_copy(update={"series": recipe.series.model_copy(update={"data": "new_only",
                                                                                     "warm_start": True})})
    _prompts(tmp_path / "p.jsonl", 40)
    store4 = open_run(recipe, "grow-4")
    fourth = series.prepare_run(only_new, store4)
    assert fourth.series.previous_runs == [] and fourth.sft.model == series.current_model == store1.join("sft", "model")
    assert series.entries()[-1].warm_start_from == store1.join("sft", "model")


def test_dpo_of_a_series_run_trains_on_the_earlier_runs_pairs_too(tmp_path: Path) -> None:
    small = {"dpo": {"beta": 0.1, "args": {"num_train_epochs": 1, "per_device_train_batch_size": 8,
                                           "max_length": 64}}}
    earlier_recipe = toy_recipe(tmp_path / "runs", prompts={"source": "task", "count": 24, "seed": 1}, **small)
    earlier = open_run(earlier_recipe, "earlier")
    write_pairs(earlier, earlier_recipe)
    recipe = toy_recipe(tmp_path / "runs", prompts={"source": "task", "count": 24, "seed": 2},
                        series={"previous_runs": [earlier.url]}, **small)
    store = open_run(recipe, "later")
    build_student(Path(store.join("sft", "model")), corpus(200, 0))
    mark_completed(store, "sft", recipe, 1)
    write_pairs(store, recipe)
    report = run_stage("dpo", recipe, store)
    mine = {r["prompt_id"] for r in store.read_records("feedback", "pairs")}
    theirs = {r["prompt_id"] for r in earlier.read_records("feedback", "pairs")} - mine  # a shared prompt counts once
    assert report.counts == {"input": 24 + len(theirs), "output": 24 + len(theirs), "failed": 0, "new": 24,
                             "earlier": len(theirs), "earlier_runs": 1}
    metrics = json.loads(Path(store.join("dpo", "metrics.json")).read_text())
    assert metrics["pairs"] == 24 + len(theirs)


def test_a_series_run_whose_earlier_run_failed_its_stage_says_so(tmp_path: Path) -> None:
    earlier_recipe = toy_recipe(tmp_path / "runs")
    earlier = open_run(earlier_recipe, "broken")
    earlier.set_stage_state("generate", StageState(fingerprint="f", status="failed"))
    recipe = toy_recipe(tmp_path / "runs", series={"previous_runs": [earlier.url]})
    with pytest.raises(SeriesDataError, match="the generate stage of .*broken is failed"):
        series_dialogues(recipe, open_run(recipe, "now"))


def test_a_candidate_that_only_ties_the_current_model_is_not_promoted(tmp_path: Path) -> None:
    students = build_students(tmp_path / "models")
    current = str(students["dpo"])  # the series' current model: the candidate is the same model
    recipe, store = toy_run(tmp_path, students, models=["dpo"], baseline=current)
    with ToyTeacher(ToyTeacherConfig()) as toy:
        result = run_stage("evaluate", live(recipe, toy.base_url), store)
    assert result.status == "completed", result.message
    decision = promotion_for_run(store, current)
    assert decision["promote"] is False and decision["win_rate"] == 0.5 and decision["ties"] == decision["n"] > 0
    assert decision["lower_bound"] == 0.5 and "not above 0.5" in decision["reason"]


def test_a_warm_start_model_on_shared_storage_is_copied_locally_once(tmp_path: Path) -> None:
    from pipeline.train.models import download_model

    remote = tmp_path / "store" / "run-1" / "dpo" / "model"
    remote.mkdir(parents=True)
    (remote / "config.json").write_text("{}")
    (remote / "model.safetensors").write_bytes(b"weights")
    local = Path(download_model(f"file://{remote}"))
    assert local != remote and (local / "model.safetensors").read_bytes() == b"weights"
    (remote / "model.safetensors").write_bytes(b"changed")  # the copy is reused, not fetched again
    assert download_model(f"file://{remote}") == str(local) and (local / "model.safetensors").read_bytes() == b"weights"
