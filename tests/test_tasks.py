"""Task plugins and checkers beyond the toy world: a task of the tests' own, and a checker on a plain file."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest
from capitals_task import CAPITALS, HELDOUT
from test_evaluate import constant_answer_model

from pipeline.core.recipe import recipe_from_dict
from pipeline.core.store import StageState
from pipeline.core.task import load_task
from pipeline.run.registry import fingerprint
from pipeline.run.runner import open_run, run_stage
from pipeline.tasks.toy.teacher_server import ToyTeacher, ToyTeacherConfig
from pipeline.train.student import build_student


@pytest.fixture(scope="module")
def capital_models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A tiny student trained on the task's texts, and two students that always give one answer."""
    root = tmp_path_factory.mktemp("capital-models")
    base = build_student(root / "base", load_task("capitals_task:CapitalsTask").corpus(0, 0))
    return {"base": base, "sft": constant_answer_model(base, root / "paris", "Paris."),
            "dpo": constant_answer_model(base, root / "rome-or-paris", "Rome or Paris.")}


def _run(root: Path, models: dict[str, Path], section: dict[str, Any], teacher_url: str):
    recipe = recipe_from_dict({
        "name": "capitals", "task": "capitals_task:CapitalsTask", "prompts": {"source": "task"},
        "teacher": {"base_url": teacher_url, "api_key_env": None, "max_retries": 1},
        "sft": {"model": str(models["base"])},
        "evaluate": {"max_tokens": 8, "batch_size": 32, **section}, "storage": {"root": str(root / "runs")}})
    store = open_run(recipe, "capitals")
    for stage in ("sft", "dpo"):
        shutil.copytree(models[stage], store.join(stage, "model"))
        store.set_stage_state(stage, StageState(fingerprint=fingerprint(stage, recipe), status="completed"))
    report = run_stage("evaluate", recipe, store)
    assert report.status == "completed", report.message
    return store, json.loads(Path(store.join("evaluate", "report.json")).read_text())["evaluation"]


def test_a_task_plugin_of_our_own_gives_ground_truth_accuracy_per_model(tmp_path: Path, capital_models) -> None:
    n = len(CAPITALS) * len(HELDOUT)
    with ToyTeacher(ToyTeacherConfig()) as judge:
        store, ev = _run(tmp_path, capital_models, {}, judge.base_url)
    assert ev["eval_set"] == "capitals-heldout" and ev["items"] == n and ev["ground_truth"] is True
    acc = {label: m["accuracy"] for label, m in ev["models"].items()}
    assert acc["sft"]["n"] == acc["dpo"]["n"] == acc["base"]["n"] == n
    assert acc["sft"]["mean"] == pytest.approx(len(HELDOUT) / n)  # "Paris." is right on France only
    assert acc["dpo"]["mean"] == pytest.approx(2 * len(HELDOUT) / n)  # "Rome or Paris." on France and Italy
    assert acc["dpo"]["stderr"] > 0
    markdown = Path(store.join("evaluate", "report.md")).read_text()
    assert "capitals-heldout" in markdown and "0.250 ±" in markdown and "0.125 ±" in markdown


def test_a_checker_named_in_the_recipe_grades_a_plain_evaluation_file(tmp_path: Path, capital_models) -> None:
    rows = [{"id": f"q{i}", "prompt": f"Capital of {c}?", "answer": a} for i, (c, a) in enumerate(CAPITALS.items())]
    path = tmp_path / "capitals.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    with ToyTeacher(ToyTeacherConfig()) as judge:
        store, ev = _run(tmp_path, capital_models, {"prompts": str(path), "checker": "capitals_task:check_capital",
                                                    "models": ["sft", "dpo"]}, judge.base_url)
    assert ev["ground_truth"] is True and ev["items"] == len(rows)
    assert ev["models"]["sft"]["accuracy"]["correct"] == 1 and ev["models"]["dpo"]["accuracy"]["correct"] == 2
    # accuracy per model with its standard error, in the report and in the stage's closing line
    n = len(rows)
    for label, right in (("sft", 1), ("dpo", 2)):
        p = right / n
        assert ev["models"][label]["accuracy"]["stderr"] == pytest.approx((p * (1 - p) / (n - 1)) ** 0.5)
    closing = store.stage_state("evaluate").message
    dpo = ev["models"]["dpo"]["accuracy"]
    assert "dpo: judge" in closing and f"accuracy {dpo['mean']:.2f} ± {dpo['stderr']:.2f}" in closing
