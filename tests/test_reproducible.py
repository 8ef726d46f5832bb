"""The same recipe and seed give the same numbers: two runs of a downsized quickstart, each in a fresh run directory,
produce the same dialogues, answers, pairs, final losses and held-out accuracies on the CPU."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from pipeline.core.recipe import load_recipe
from pipeline.core.store import RunStore
from pipeline.run.runner import run_pipeline

QUICKSTART = Path(__file__).resolve().parents[1] / "configs" / "quickstart.yaml"
DOWNSIZED = ["prompts.count=96", "generate.max_rounds=2", "sft.args.num_train_epochs=4",
             "dpo.args.num_train_epochs=2", "evaluate.heldout_count=24", "evaluate.max_tokens=16"]


def records(store: RunStore, stage: str, name: str, key: str) -> list[dict[str, Any]]:
    return sorted(store.read_records(stage, name), key=lambda r: r[key])


def one_run(root: Path) -> dict[str, Any]:
    recipe = load_recipe(QUICKSTART, [*DOWNSIZED, f"storage.root={root}"])
    store, _ = run_pipeline(recipe, "repro")
    report = json.loads(Path(store.join("evaluate", "report.json")).read_text())
    return {
        "dialogues": records(store, "generate", "data", "prompt_id"),
        "answers": [{k: v for k, v in r.items() if k != "model_path"}
                    for r in records(store, "sample", "completions", "completion_id")],
        "pairs": records(store, "feedback", "pairs", "pair_id"),
        "sft_loss": json.loads(Path(store.join("sft", "metrics.json")).read_text())["final"]["loss"],
        "dpo_loss": json.loads(Path(store.join("dpo", "metrics.json")).read_text())["final"]["loss"],
        "accuracy": {name: m["accuracy"]["mean"] for name, m in report["evaluation"]["models"].items()},
    }


@pytest.mark.slow
def test_two_runs_of_one_recipe_give_the_same_data_pairs_losses_and_accuracies(tmp_path):
    first, second = one_run(tmp_path / "first"), one_run(tmp_path / "second")
    assert len(first["pairs"]) > 20 and set(first["accuracy"]) == {"base", "sft", "dpo"}
    for key in ("dialogues", "answers", "pairs", "sft_loss", "dpo_loss", "accuracy"):
        assert first[key] == second[key], key
