"""Output versions: bumping a stage's version re-runs it and what reads it, nothing upstream; and a change to a
stage's code cannot land without a decision on its version (the recorded sources below)."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import sys
from pathlib import Path

import pytest

from pipeline.core.recipe import load_recipe
from pipeline.core.stage import StageReport
from pipeline.run import registry, runner
from pipeline.run.registry import STAGE_NAMES, STAGES

ROOT = Path(__file__).resolve().parents[1]
RECORD = Path(__file__).parent / "data" / "stage_sources.json"


def stage_sources(stage: str) -> str:
    """A hash of the stage package's code (what decides its outputs beside the recipe and its inputs)."""
    digest = hashlib.sha256()
    for path in sorted((ROOT / "pipeline" / "stages" / stage).rglob("*.py")):
        digest.update(path.relative_to(ROOT).as_posix().encode() + b"\0" + path.read_bytes() + b"\0")
    return digest.hexdigest()[:16]


def recorded() -> dict[str, dict[str, object]]:
    return {name: {"version": STAGES[name].version, "sources": stage_sources(name)} for name in STAGE_NAMES}


def _recording_registry(monkeypatch: pytest.MonkeyPatch, calls: list[str]) -> None:
    """Every stage's run replaced by one that records its call: the runner's decisions alone are under test."""
    def fake(name: str):
        def run(recipe, store) -> StageReport:
            calls.append(name)
            return StageReport(name, counts={"output": 1})
        return run

    patched = {name: dataclasses.replace(spec, run=fake(name)) for name, spec in STAGES.items()}
    monkeypatch.setattr(registry, "STAGES", patched)
    monkeypatch.setattr(runner, "STAGES", patched)


def test_bumping_a_stage_version_reruns_it_and_downstream_only(monkeypatch: pytest.MonkeyPatch,
                                                               tmp_path: Path) -> None:
    recipe = load_recipe(ROOT / "configs/quickstart.yaml", [f"storage.root={tmp_path}"])
    calls: list[str] = []
    _recording_registry(monkeypatch, calls)
    runner.run_pipeline(recipe, "r")
    assert calls == list(STAGE_NAMES)
    calls.clear()
    runner.run_pipeline(recipe, "r")
    assert calls == []  # every fingerprint unchanged: all skipped
    bumped = {**registry.STAGES, "feedback": dataclasses.replace(registry.STAGES["feedback"], version=2)}
    monkeypatch.setattr(registry, "STAGES", bumped)
    monkeypatch.setattr(runner, "STAGES", bumped)
    runner.run_pipeline(recipe, "r")
    assert calls == ["feedback", "dpo", "evaluate"]


def test_a_change_to_a_stage_package_comes_with_a_decision_on_its_output_version() -> None:
    want = json.loads(RECORD.read_text())
    stale = [f"pipeline/stages/{name}" for name, now in recorded().items() if want.get(name) != now]
    assert not stale, (
        f"{', '.join(stale)} changed since their sources were recorded. If the change alters what the stage "
        "writes for the same inputs, bump its `version` in pipeline/run/registry.py (completed runs then redo it "
        "and what reads it); either way record the sources: python tests/test_output_versions.py --record")


if __name__ == "__main__" and sys.argv[1:] == ["--record"]:
    RECORD.write_text(json.dumps(recorded(), indent=2, sort_keys=True) + "\n")
    print(f"recorded {RECORD}")
