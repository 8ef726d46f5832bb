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
from collections.abc import Iterable
from typing import Any

from pipeline.core.stage import STAGE_NAMES
from pipeline.core.store import RunStore
from pipeline.stages.evaluate.judge import win_rate
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
from pipeline.teacher.spend import spend_summary

log = logging.getLogger(__name__)
DPO_CURVES = ("loss", "rewards/margins", "rewards/accuracies")


def mean_se(values: Iterable[float]) -> dict[str, float | int | None]:
    """Mean, standard error of the mean and n (None for an empty list)."""
    values = [float(v) for v in values]
    if not values:
        return {"mean": None, "stderr": None, "n": 0}
    mean, se = win_rate(values)  # the same mean / standard-error arithmetic
    return {"mean": mean, "stderr": se, "n": len(values)}


# -- evaluation ------------------------------------------------------------------------------------
def summarize_evaluation(plan: dict[str, Any], answers: list[dict[str, Any]], singles: list[dict[str, Any]],
                         pairs: list[dict[str, Any]], failed: set[str]) -> dict[str, Any]:
    """Per model: judge score, ground-truth accuracy and win rate against the baseline, each with its error."""
    items = plan["items"]
    by_spec = {m["spec"]: m for m in plan["models"]}
    baseline = by_spec[plan["baseline_spec"]]
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
            "vs_baseline": None if m is baseline else _versus(m, baseline, items, pairs, failed),
        }
    report = {"eval_set": plan["eval_set"], "items": len(items), "requested_items": plan["requested_items"],
              "turns": sum(len(it["turns"]) for it in items), "ground_truth": bool(plan.get("checked")),
              "judge": plan["judge"], "baseline": baseline["label"], "baseline_spec": baseline["spec"],
              "candidate": plan["candidate"], "promote_min_win_rate": plan["promote_min_win_rate"],
              "models": models}
    if report["ground_truth"]:
        report["judge_vs_truth"] = judge_vs_truth(models, answers, singles)
    return report


def _versus(model: dict[str, Any], baseline: dict[str, Any], items: list[dict[str, Any]],
            pairs: list[dict[str, Any]], failed: set[str]) -> dict[str, Any]:
    rows = [p for p in pairs if p["model"] == model["label"] and p["baseline"] == baseline["label"]]
    scores = [p["score"] for p in rows]
    rate, se = win_rate(scores) if scores else (None, None)
    ids = {pairwise_id(it["item_id"], model["spec"], baseline["spec"]) for it in items}
    return {"baseline": baseline["label"], "win_rate": rate, "stderr": se, "n": len(scores),
            "wins": sum(s == 1.0 for s in scores), "ties": sum(s == 0.5 for s in scores),
            "losses": sum(s == 0.0 for s in scores),
            "disagreements": sum(p["score"] == 0.5 and p["verdict_first"] != p["verdict_second"] for p in rows),
            "identical": sum(bool(p["identical"]) for p in rows), "failed": len(ids & failed)}


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


def stage_costs(store: RunStore) -> list[dict[str, Any]]:
    """Status, items, failures and seconds per stage from the manifest; dollars and tokens from the spend ledger
    (what every attempt paid, killed and reset ones included)."""
    stages = store.read_manifest().get("stages", {})
    paid = spend_summary(store)["stages"]
    rows = []
    for name in STAGE_NAMES:
        st = stages.get(name) or {}
        seconds = float(st.get("seconds") or 0.0)
        if name == STAGE and st.get("status") == "running":  # the stage writing this report: not yet recorded
            seconds = time.time() - float(st.get("started_at") or time.time())
        rows.append({"stage": name, "status": st.get("status", "pending"), "seconds": seconds,
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
def build_report(store: RunStore) -> tuple[dict[str, Any], dict[str, list[float]]]:
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
        report["promotion"] = decide(evaluation, evaluation["promote_min_win_rate"])
    else:
        notes.append("no evaluation yet (evaluate/plan.json missing): run `distill stage evaluate`")
    report["training"] = training_summary(store)
    for stage in ("sft", "dpo"):
        if stage not in report["training"]:
            notes.append(f"{stage}/metrics.json missing: no {stage} training numbers")
    report["pairs"], raw = pair_scores(store)
    if report["pairs"] is None:
        notes.append("no feedback pairs: no pair score histogram")
    report["stages"] = stage_costs(store)
    report["totals"] = {"seconds": sum(r["seconds"] for r in report["stages"]),
                        "cost_usd": sum(r["cost_usd"] for r in report["stages"])}
    report["notes"] = notes
    return report, raw


def write_report(store: RunStore) -> dict[str, Any]:
    """Build the report and write report.json, report.md and the plots into `<run>/evaluate/`."""
    report, raw = build_report(store)
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


def _pm(stat: dict[str, Any] | None, digits: int = 2) -> str:
    if not stat or stat.get("mean") is None:
        return "–"
    return f"{stat['mean']:.{digits}f} ± {stat['stderr']:.{digits}f}"


def render_markdown(report: dict[str, Any]) -> str:
    """report.md: the evaluation table first, then training, pairs, cost and time, the plots."""
    lines = [f"# Run report: {report['run']}", ""]
    ev = report.get("evaluation")
    if ev:
        lines += [f"Evaluation set **{ev['eval_set']}**: {ev['items']} prompts, {ev['turns']} turns; judge "
                  f"`{ev['judge']}`; baseline **{ev['baseline']}**"
                  + ("; ground truth by the set's checker." if ev["ground_truth"] else "."), ""]
        if ev["requested_items"] > ev["items"]:
            lines += [f"({ev['requested_items']} prompts asked for; the set has only {ev['items']}.)", ""]
        lines += ["| model | judge score (1-10) | accuracy | win rate vs baseline | W / T / L | failed |",
                  "|---|---|---|---|---|---|"]
        for label, m in ev["models"].items():
            vs = m["vs_baseline"]
            wtl = f"{vs['wins']} / {vs['ties']} / {vs['losses']}" if vs else "(baseline)"
            rate = _pm({"mean": vs["win_rate"], "stderr": vs["stderr"]}, 3) if vs else "–"
            nfail = m["answer_failures"] + m["judge"]["failed"] + (vs["failed"] if vs else 0)
            lines.append(f"| {label} | {_pm(m['judge'])} | {_pm(m['accuracy'], 3)} | {rate} | {wtl} | {nfail} |")
        lines += _category_lines(ev)
        lines += ["", "± is one standard error. Pairwise verdicts are judged in both orders; disagreement is a tie; "
                  "win rate = (wins + ties/2) / n.", ""]
        agree = ev.get("judge_vs_truth")
        if agree:
            lines += [f"Judge vs ground truth: mean rating {_num(agree['mean_rating_correct'])} for correct answers, "
                      f"{_num(agree['mean_rating_wrong'])} for wrong ones; the judge "
                      f"{'agrees' if agree['agree'] else 'DISAGREES'} in direction with the ground truth.", ""]
        promo = report.get("promotion")
        if promo:
            lines += [f"Promotion gate: **{'promote' if promo['promote'] else 'keep the current model'}** "
                      f"({promo['reason']}).", ""]
    lines += _training_lines(report)
    pairs = report.get("pairs")
    if pairs:
        lines += ["## Preference pairs", "", f"{pairs['count']} pairs; score chosen {_pm(pairs['score_chosen'])}, "
                  f"rejected {_pm(pairs['score_rejected'])}, margin {_pm(pairs['margin'])}.", ""]
    lines += ["## Cost and time per stage", "", "| stage | status | items | failures | teacher tokens | cost $ | time s |",
              "|---|---|---|---|---|---|---|"]
    lines += [f"| {r['stage']} | {r['status']} | {r['items']} | {r['failures']} | {r['teacher_tokens']} | "
              f"{r['cost_usd']:.4f} | {r['seconds']:.1f} |" for r in report["stages"]]
    lines += [f"| total | | | | | {report['totals']['cost_usd']:.4f} | {report['totals']['seconds']:.1f} |", ""]
    if report.get("plots"):
        lines += ["## Plots", ""] + [f"![{name}]({file})" for name, file in report["plots"].items()] + [""]
    if report["notes"]:
        lines += ["## Notes", ""] + [f"- {n}" for n in report["notes"]] + [""]
    return "\n".join(lines)


def _category_lines(ev: dict[str, Any]) -> list[str]:
    """Mean judge score per category and model, for sets with several categories."""
    cats = sorted({c for m in ev["models"].values() for c in m["judge"]["by_category"]})
    if len(cats) < 2:
        return []
    labels = list(ev["models"])
    lines = ["", "| category | " + " | ".join(labels) + " |", "|---" * (len(labels) + 1) + "|"]
    for cat in cats:
        lines.append(f"| {cat} | " + " | ".join(_num(ev["models"][m]["judge"]["by_category"].get(cat), 2)
                                              for m in labels) + " |")
    return lines


def _training_lines(report: dict[str, Any]) -> list[str]:
    training = report.get("training") or {}
    if not training:
        return []
    lines = ["## Training", "", "| stage | steps | final loss | reward margin | reward accuracy |", "|---|---|---|---|---|"]
    for stage, t in training.items():
        f = t["final"]
        lines.append(f"| {stage} | {t['global_step']} | {_num(f.get('loss'))} | {_num(f.get('rewards/margins'))} | "
                     f"{_num(f.get('rewards/accuracies'))} |")
    return lines + [""]


def _num(value: Any, digits: int = 3) -> str:
    return "–" if value is None else f"{value:.{digits}f}"
