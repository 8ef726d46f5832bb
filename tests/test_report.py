"""The run report: report.json, report.md and PNG plots rebuilt from the store; missing inputs are notes."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner

from pipeline.cli import main
from pipeline.core.recipe import Recipe
from pipeline.core.store import RunStore, StageState
from pipeline.run.runner import open_run
from pipeline.stages.evaluate.records import answer_id, pairwise_id, single_id
from pipeline.stages.evaluate.report import PLOT_FILES, write_report

PNG = b"\x89PNG\r\n\x1a\n"


def finished_run(root: Path) -> RunStore:
    """A run as the stages leave it: stage states, DPO metrics, feedback pairs and an evaluation."""
    store = open_run(Recipe.model_validate({"task": "toy", "storage": {"root": str(root)}}), "done")
    for i, stage in enumerate(["generate", "sft", "sample", "feedback", "dpo", "evaluate"]):
        store.set_stage_state(stage, StageState(fingerprint="f", status="completed", seconds=10.0 * (i + 1),
                                                counts={"output": 100, "failed": i},
                                                cost={"usd": 0.01 * i, "prompt_tokens": 1000.0 * i}))
    history = [{"step": s, "loss": 0.7 - 0.05 * s, "rewards/margins": 0.1 * s, "rewards/accuracies": min(1, 0.1 * s),
                "epoch": s / 10} for s in range(1, 11)]
    history.append({"step": 10, "train_runtime": 12.0, "train_loss": 0.5})
    store.write_json(store.join("dpo", "metrics.json"), {"global_step": 10, "final": history[-2], "history": history,
                                                          "summary": history[-1], "wall_seconds": 14.0})
    store.write_json(store.join("sft", "metrics.json"), {"global_step": 5, "final": {"loss": 1.2},
                                                          "history": [{"step": 5, "loss": 1.2}]})
    with store.shard_writer("feedback", "pairs") as writer:
        for i in range(40):
            writer.add({"prompt_id": str(i), "score_chosen": 4.0 + (i % 3) / 2, "score_rejected": 1.0 + (i % 4) / 2})
    write_evaluation(store)
    return store


def write_evaluation(store: RunStore) -> None:
    """Two models on four one-turn toy items: sft right on 1, dpo right on 3; dpo beats sft twice, ties twice."""
    items = [{"item_id": f"i{k}", "category": "toy", "turns": [f"What is {k} + 1?"], "reference": None}
             for k in range(4)]
    models = [{"label": "sft", "spec": "sft"}, {"label": "dpo", "spec": "dpo"}]
    store.write_json(store.join("evaluate", "plan.json"), {
        "eval_set": "toy-heldout", "checked": True, "requested_items": 4, "items": items, "models": models, "baseline": "sft",
        "baseline_spec": "sft", "candidate": "dpo", "promote_min_win_rate": 0.5, "judge": "toy-teacher"})
    right = {"sft": {0}, "dpo": {0, 1, 2}}
    answers, singles = [], []
    for m in models:
        for k, it in enumerate(items):
            aid = answer_id(it["item_id"], m["spec"])
            ok = k in right[m["label"]]
            answers.append({"answer_id": aid, "item_id": it["item_id"], "model": m["label"], "spec": m["spec"],
                            "model_path": f"/x/{m['spec']}", "category": "toy", "turns": it["turns"],
                            "answers": [f"The answer is {k + 1 if ok else 0}."], "finish_reasons": ["stop"],
                            "completion_tokens": 6, "correct": float(ok),
                            "check_error": None})
            singles.append({"judgment_id": single_id(aid, 0), "item_id": it["item_id"], "model": m["label"],
                            "category": "toy", "turn": 1, "rating": 9.0 if ok else 2.0, "explanation": "",
                            "attempts": 1})
    pairs = [{"judgment_id": pairwise_id(it["item_id"], "dpo", "sft"), "item_id": it["item_id"], "model": "dpo",
              "baseline": "sft", "category": "toy", "verdict_first": v1, "verdict_second": v2, "score": score,
              "identical": False, "explanation_first": "", "explanation_second": "", "attempts": 2}
             for it, (v1, v2, score) in zip(items, [("C", "C", 0.5), ("A", "B", 1.0), ("A", "B", 1.0),
                                                    ("C", "C", 0.5)], strict=True)]
    for name, rows, key in (("answers", answers, "answer_id"), ("single", singles, "judgment_id"),
                            ("pairwise", pairs, "judgment_id")):
        with store.shard_writer("evaluate", name, id_key=key) as writer:
            writer.extend(rows)


def test_report_writes_numbers_markdown_and_plots(tmp_path: Path) -> None:
    store = finished_run(tmp_path)
    report = write_report(store)

    assert set(report["plots"]) == set(PLOT_FILES)
    for file in PLOT_FILES.values():
        data = Path(store.join("evaluate", file)).read_bytes()
        assert data.startswith(PNG) and len(data) > 5000, file
    saved = json.loads(Path(store.join("evaluate", "report.json")).read_text())
    ev = saved["evaluation"]
    assert ev["models"]["dpo"]["accuracy"]["mean"] == 0.75 and ev["models"]["sft"]["accuracy"]["mean"] == 0.25
    assert ev["models"]["dpo"]["judge"]["mean"] == (9 * 3 + 2) / 4
    vs = ev["models"]["dpo"]["vs_baseline"]
    assert (vs["wins"], vs["ties"], vs["losses"], vs["win_rate"]) == (2, 2, 0, 0.75)
    assert vs["stderr"] > 0 and ev["models"]["sft"]["vs_baseline"] is None
    assert ev["judge_vs_truth"]["agree"] is True
    # four prompts: 0.75 ± 0.14 is no evidence that dpo beats sft; the gate asks win rate - 2 s.e. > 0.5
    promotion = saved["promotion"]
    assert promotion["promote"] is False and promotion["win_rate"] == 0.75 and promotion["k"] == 2.0
    assert promotion["lower_bound"] == pytest.approx(0.75 - 2 * vs["stderr"]) and "not above 0.5" in promotion["reason"]
    loss = saved["training"]["dpo"]["curves"]["loss"]
    assert [p[0] for p in loss[:2]] == [1, 2] and [p[1] for p in loss[:2]] == pytest.approx([0.65, 0.6])
    assert len(saved["training"]["dpo"]["curves"]["rewards/margins"]) == 10  # the summary entry is no step
    assert saved["pairs"]["count"] == 40
    assert [r["stage"] for r in saved["stages"]][-1] == "evaluate" and saved["totals"]["seconds"] == 210.0
    assert saved["notes"] == []
    md = Path(store.join("evaluate", "report.md")).read_text()
    assert "| dpo | 7.25 ± " in md and "| 2 / 2 / 0 |" in md and "![win_rate](win_rate.png)" in md
    assert "| evaluate | completed | 100 | 5 |" in md


def test_report_of_a_run_without_evaluation_or_training_notes_what_is_missing(tmp_path: Path) -> None:
    store = open_run(Recipe.model_validate({"task": "toy", "storage": {"root": str(tmp_path)}}), "bare")
    store.set_stage_state("generate", StageState(fingerprint="f", status="completed", seconds=3.0))
    report = write_report(store)
    assert "evaluation" not in report and report["pairs"] is None
    assert set(report["plots"]) == {"cost_time"}
    assert any("evaluate/plan.json missing" in n for n in report["notes"])
    assert any("dpo/metrics.json missing" in n for n in report["notes"])
    assert "## Notes" in Path(store.join("evaluate", "report.md")).read_text()


def numbers_and_text(store: RunStore) -> tuple[dict[str, Any], str]:
    """report.json without the times it was written and decided at, and report.md."""
    report = json.loads(Path(store.join("evaluate", "report.json")).read_text())
    report.pop("generated_at")
    report["promotion"].pop("decided_at")
    return report, Path(store.join("evaluate", "report.md")).read_text()


def test_distill_report_regenerates_from_the_store(tmp_path: Path) -> None:
    store = finished_run(tmp_path)
    result = CliRunner().invoke(main, ["report", store.url])
    assert result.exit_code == 0, result.output
    assert "win rate vs sft 0.750" in result.output and "promotion gate: keep" in result.output
    assert "accuracy 0.750 ± 0.250" in result.output
    outputs = [Path(store.join("evaluate", f)) for f in ["report.json", "report.md", *PLOT_FILES.values()]]
    assert all(f.stat().st_size > 0 for f in outputs)
    first = numbers_and_text(store)
    for f in outputs:
        f.unlink()
    by_name = CliRunner().invoke(main, ["report", "done", "--root", str(tmp_path)])
    assert by_name.exit_code == 0 and "report:" in by_name.output
    # rebuilt from the store alone: the same numbers and text, every plot again
    assert numbers_and_text(store) == first
    assert all(f.read_bytes().startswith(PNG) for f in outputs if f.suffix == ".png")
    missing = CliRunner().invoke(main, ["report", "nope", "--root", str(tmp_path)])
    assert missing.exit_code == 2 and "no manifest.json" in missing.output

