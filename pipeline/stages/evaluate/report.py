"""The run report: evaluation numbers, DPO training curves, preference-pair scores, cost and time per stage.

Written to `<run>/evaluate/` as report.json, report.md and PNG plots; rebuilt from the store alone, so
`distill report RUN` regenerates it at any time (missing inputs are noted, never fatal).
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections import defaultdict
from typing import Any

from pipeline.core.store import RunStore
from pipeline.stages.evaluate.judge import win_rate
from pipeline.stages.evaluate.markdown import render_markdown
from pipeline.stages.evaluate.plots import PLOT_FILES, draw_plots
from pipeline.stages.evaluate.records import (
    ANSWERS,
    PAIRWISE,
    SINGLE,
    STAGE,
    answer_id,
    pairwise_id,
    single_id,
)
from pipeline.stages.evaluate.stats import (
    answer_lengths,
    by_category,
    judge_bias,
    mean_se,
    versus_length_controlled,
)
from pipeline.teacher.spend import spend_summary

log = logging.getLogger(__name__)
DPO_CURVES = ("loss", "rewards/margins", "rewards/accuracies")


# -- evaluation ------------------------------------------------------------------------------------
def summarize_evaluation(plan: dict[str, Any], answers: list[dict[str, Any]], singles: list[dict[str, Any]],
                         pairs: list[dict[str, Any]], failed: set[str]) -> dict[str, Any]:
    """Per model: judge score, ground-truth accuracy and win rate against the baseline (raw and length-controlled),
    each with its error; per category; the judge's own biases."""
    items = plan["items"]
    by_spec = {m["spec"]: m for m in plan["models"]}
    baseline = by_spec[plan["baseline_spec"]]
    lengths = answer_lengths(answers)
    models: dict[str, Any] = {}
    for m in plan["models"]:
        rows = [a for a in answers if a["spec"] == m["spec"]]
        ratings = [s for s in singles if s["model"] == m["label"]]
        ids = {answer_id(it["item_id"], m["spec"]) for it in items}
        single_failed = sum(single_id(r["answer_id"], t) in failed for r in rows for t in range(len(r["answers"])))
        by_cat, by_turn = defaultdict(list), defaultdict(list)
        for s in ratings:
            by_cat[s["category"]].append(s["rating"])
            by_turn[str(s["turn"])].append(s["rating"])
        truth = [float(r["correct"]) for r in rows if r["correct"] is not None]
        models[m["label"]] = {
            "spec": m["spec"], "path": rows[0]["model_path"] if rows else None, "answers": len(rows),
            "answer_failures": len(ids & failed),
            "truncated": sum("length" in r["finish_reasons"] for r in rows) / len(rows) if rows else None,
            "mean_answer_tokens": sum(r["completion_tokens"] for r in rows) / len(rows) if rows else None,
            "judge": {**mean_se(s["rating"] for s in ratings), "failed": single_failed,
                      "by_category": {k: sum(v) / len(v) for k, v in sorted(by_cat.items())},
                      "by_turn": {k: sum(v) / len(v) for k, v in sorted(by_turn.items())}},
            "accuracy": {**mean_se(truth), "correct": sum(truth)} if truth else None,
            "vs_baseline": None if m is baseline else _versus(m, baseline, items, pairs, failed, lengths),
        }
    report = {"eval_set": plan["eval_set"], "items": len(items), "requested_items": plan["requested_items"],
              "turns": sum(len(it["turns"]) for it in items), "ground_truth": bool(plan.get("checked")),
              "judge": plan["judge"], "baseline": baseline["label"], "baseline_spec": baseline["spec"],
              "candidate": plan["candidate"], "promote_min_win_rate": plan["promote_min_win_rate"],
              "promote_stderr_k": plan.get("promote_stderr_k", 2.0), "outputs_generator": plan.get("outputs_generator"),
              "references_hidden": sum(1 for it in items if any(it.get("references") or [])
                                       and not it.get("reference_shown", True)),
              "models": models, "categories": by_category(items, plan["models"], answers, singles, pairs),
              "judge_bias": judge_bias(pairs, lengths)}
    if report["ground_truth"]:
        report["judge_vs_truth"] = judge_vs_truth(models, answers, singles)
    return report


def _versus(model: dict[str, Any], baseline: dict[str, Any], items: list[dict[str, Any]],
            pairs: list[dict[str, Any]], failed: set[str], lengths: dict[tuple[str, str], int]) -> dict[str, Any]:
    rows = [p for p in pairs if p["model"] == model["label"] and p["baseline"] == baseline["label"]]
    scores = [p["score"] for p in rows]
    rate, se = win_rate(scores) if scores else (None, None)
    ids = {pairwise_id(it["item_id"], model["spec"], baseline["spec"]) for it in items}
    return {"baseline": baseline["label"], "win_rate": rate, "stderr": se, "n": len(scores),
            "wins": sum(s == 1.0 for s in scores), "ties": sum(s == 0.5 for s in scores),
            "losses": sum(s == 0.0 for s in scores),
            "disagreements": sum(p["score"] == 0.5 and p["verdict_first"] != p["verdict_second"] for p in rows),
            "identical": sum(bool(p["identical"]) for p in rows), "failed": len(ids & failed),
            "length_controlled": versus_length_controlled(rows, lengths)}


def judge_vs_truth(models: dict[str, Any], answers: list[dict[str, Any]],
                   singles: list[dict[str, Any]]) -> dict[str, Any]:
    """Whether the judge points the way the ground truth does: ratings of right vs wrong answers, model order
    by judge score vs by accuracy, and each win rate's side of 0.5 vs the accuracy difference."""
    correct = {(a["item_id"], a["model"]): a["correct"] for a in answers if a["correct"] is not None}
    # a checker may give partial credit: an answer scoring at least half counts as right here
    right = [s["rating"] for s in singles if (c := correct.get((s["item_id"], s["model"]))) is not None and c >= 0.5]
    wrong = [s["rating"] for s in singles if (c := correct.get((s["item_id"], s["model"]))) is not None and c < 0.5]
    scored = {k: m for k, m in models.items() if m["accuracy"] and m["judge"]["n"]}
    order_pairs = [(a, b) for a in scored for b in scored if a < b
                   and scored[a]["accuracy"]["mean"] != scored[b]["accuracy"]["mean"]]
    ordered = [(scored[a]["accuracy"]["mean"] > scored[b]["accuracy"]["mean"])
               == (scored[a]["judge"]["mean"] > scored[b]["judge"]["mean"]) for a, b in order_pairs]
    win_dirs = {}
    for label, m in models.items():
        vs = m["vs_baseline"]
        if vs and vs["n"] and m["accuracy"] and models[vs["baseline"]]["accuracy"]:
            gap = m["accuracy"]["mean"] - models[vs["baseline"]]["accuracy"]["mean"]
            win_dirs[label] = _sign(vs["win_rate"] - 0.5) == _sign(gap)
    return {"mean_rating_correct": sum(right) / len(right) if right else None,
            "mean_rating_wrong": sum(wrong) / len(wrong) if wrong else None,
            "score_order_agrees": all(ordered), "model_pairs_compared": len(ordered),
            "win_rate_direction_agrees": win_dirs,
            "agree": all(ordered) and all(win_dirs.values())}


def _sign(x: float, eps: float = 1e-9) -> int:
    return 0 if abs(x) < eps else (1 if x > 0 else -1)


# -- the other inputs ------------------------------------------------------------------------------
def training_summary(store: RunStore) -> dict[str, Any]:
    """Final metrics of sft and dpo (metrics.json, as the trainers write it) and the DPO curves."""
    out: dict[str, Any] = {}
    for stage in ("sft", "dpo"):
        metrics = _read_json(store, stage, "metrics.json")
        if not metrics:
            continue
        final = {k: v for k, v in (metrics.get("final") or {}).items() if isinstance(v, int | float)}
        history = [h for h in metrics.get("history") or [] if "train_runtime" not in h]
        out[stage] = {"global_step": metrics.get("global_step"), "wall_seconds": metrics.get("wall_seconds"),
                      "final": final,
                      "curves": {key: [[h.get("step", i + 1), h[key]] for i, h in enumerate(history) if key in h]
                                 for key in (DPO_CURVES if stage == "dpo" else ("loss",))}}
    return out


def pair_scores(store: RunStore) -> tuple[dict[str, Any] | None, dict[str, list[float]]]:
    """Summary of the feedback pairs' chosen/rejected scores, and the raw values for the histogram."""
    raw: dict[str, list[float]] = {"score_chosen": [], "score_rejected": []}
    for row in store.read_records("feedback", "pairs", columns=list(raw)):
        if row["score_chosen"] is not None and row["score_rejected"] is not None:
            raw["score_chosen"].append(float(row["score_chosen"]))
            raw["score_rejected"].append(float(row["score_rejected"]))
    if not raw["score_chosen"]:
        return None, raw
    margins = [c - r for c, r in zip(raw["score_chosen"], raw["score_rejected"], strict=False)]
    return {"count": len(raw["score_chosen"]), "score_chosen": mean_se(raw["score_chosen"]),
            "score_rejected": mean_se(raw["score_rejected"]), "margin": mean_se(margins)}, raw


def stage_costs(store: RunStore, evaluate_status: str | None = None) -> list[dict[str, Any]]:
    """Status, items, failures, seconds and counts from the manifest, dollars and tokens from
    the spend ledger (every attempt, killed and reset ones included); `evaluate_status` is the
    outcome of the evaluate stage writing this report (the manifest still says it is running)."""
    stages = store.read_manifest().get("stages", {})
    paid = spend_summary(store)["stages"]
    rows = []
    for name in store.stage_names():
        st = stages.get(name) or {}
        status = st.get("status", "pending")
        seconds = float(st.get("seconds") or 0.0)
        if name == STAGE and status == "running":  # the stage writing this report: not yet recorded
            seconds = time.time() - float(st.get("started_at") or time.time())
            stats = (_read_json(store, STAGE, "stats.json") or {})
            st = {**st, "counts": stats.get("counts") or st.get("counts")}
            status = evaluate_status or status
        rows.append({"stage": name, "status": status, "seconds": seconds,
                     "cost_usd": float(paid[name]["usd"]),
                     "teacher_tokens": int(paid[name]["prompt_tokens"] + paid[name]["completion_tokens"]),
                     "items": (st.get("counts") or {}).get("output", 0),
                     "failures": (st.get("counts") or {}).get("failed", 0)})
    return rows


def _read_json(store: RunStore, *parts: str) -> Any:
    try:
        return store.read_json(store.join(*parts))
    except json.JSONDecodeError as exc:
        log.warning("report: %s is not valid JSON (%s); left out", store.join(*parts), exc)
        return None


# -- the report ------------------------------------------------------------------------------------
def build_report(store: RunStore, evaluate_status: str | None = None) -> tuple[dict[str, Any], dict[str, list[float]]]:
    """The report dict and the raw pair scores the histogram needs."""
    from pipeline.series.promotion import decide

    notes: list[str] = []
    report: dict[str, Any] = {"run": store.run_name, "run_dir": store.url, "generated_at": time.time()}
    plan = _read_json(store, STAGE, "plan.json")
    if plan:
        answers, singles, pairs = (list(store.read_records(STAGE, name)) for name in (ANSWERS, SINGLE, PAIRWISE))
        done = {a["answer_id"] for a in answers} | {j["judgment_id"] for j in singles + pairs}
        failed = set(store.ledger(STAGE).latest()) - done  # a ledgered item that later succeeded is not failed
        evaluation = summarize_evaluation(plan, answers, singles, pairs, failed)
        report.update(evaluation=evaluation, counts=(_read_json(store, STAGE, "stats.json") or {}).get("counts"))
        report["promotion"] = decide(evaluation, evaluation["promote_min_win_rate"], k=evaluation["promote_stderr_k"])
        if evaluation["references_hidden"]:
            notes.append(f"{evaluation['references_hidden']} items have reference answers the judge did not see: "
                         "their category is not in evaluate.reference_categories")
    else:
        notes.append("no evaluation yet (evaluate/plan.json missing): run `distill stage evaluate`")
    report["training"] = training_summary(store)
    for stage in ("sft", "dpo"):
        if stage not in report["training"]:
            notes.append(f"{stage}/metrics.json missing: no {stage} training numbers")
    report["pairs"], raw = pair_scores(store)
    if report["pairs"] is None:
        notes.append("no feedback pairs: no pair score histogram")
    report["parsing"] = {f"{stage}: {role}": tally for stage in ("feedback", STAGE)
                         for role, tally in ((_read_json(store, stage, "stats.json") or {}).get("parsing") or {}).items()}
    report["stages"] = stage_costs(store, evaluate_status)
    report["totals"] = {"seconds": sum(r["seconds"] for r in report["stages"]),
                        "cost_usd": sum(r["cost_usd"] for r in report["stages"])}
    report["notes"] = notes
    return report, raw


def write_report(store: RunStore, evaluate_status: str | None = None) -> dict[str, Any]:
    """Build the report and write report.json, report.md and the plots into `<run>/evaluate/`."""
    report, raw = build_report(store, evaluate_status)
    report["plots"] = draw_plots(report, raw, store, PLOT_FILES)
    store.write_json(store.join(STAGE, "report.json"), _finite(report))
    store.write_bytes(store.join(STAGE, "report.md"), render_markdown(report).encode())
    return report


def _finite(obj: Any) -> Any:
    """JSON has no NaN: an undefined number is null."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_finite(v) for v in obj]
    return obj


