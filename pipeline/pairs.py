"""Binarization (rated answers -> one chosen/rejected pair) and the feedback report on the pairs formed."""

from __future__ import annotations

import random
import re
from collections import Counter, defaultdict
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from pipeline.feedback import Item
    from pipeline.recipe import Recipe
    from pipeline.stages import StageReport
    from pipeline.store import RunStore

EPS = 1e-9  # means of small integers: a float error must never let a pair through at the margin


def binarize(scores: list[float | None], strategy: str, min_margin: float,
             rng: random.Random) -> tuple[int, int] | str:
    """(chosen index, rejected index), or why no pair forms: chosen is a highest-scored answer, rejected is
    uniform among those scored more than `min_margin` lower (`best_vs_random`, Zephyr) or the lowest
    (`best_vs_worst`). Unscored answers take no part; ties never form a pair."""
    rated = [(i, s) for i, s in enumerate(scores) if s is not None]
    if len(rated) < 2:
        return "fewer_than_2_rated_answers"
    best = max(s for _, s in rated)
    worst = min(s for _, s in rated)
    if best - worst <= EPS:
        return "tie"
    chosen = rng.choice([i for i, s in rated if s == best])
    lower = [(i, s) for i, s in rated if best - s > min_margin + EPS]
    if not lower:
        return "below_min_margin"
    if strategy == "best_vs_worst":
        if worst not in {s for _, s in lower}:
            return "below_min_margin"
        return chosen, rng.choice([i for i, s in lower if s == worst])
    if strategy == "best_vs_random":
        return chosen, rng.choice([i for i, _ in lower])
    raise ValueError(f"feedback.pairs.strategy: unknown strategy '{strategy}'")


# -- the report ------------------------------------------------------------------------------------
_TOKEN = re.compile(r"[a-z]+|\d+|[^\sa-z\d]", re.I)


def _tokens(text: str) -> set[str]:
    return {t.lower() for t in _TOKEN.findall(text)}


def _histogram(values: Iterable[float], width: float = 0.5) -> dict[str, int]:
    bins: Counter[float] = Counter()
    for v in values:
        bins[int(v / width + EPS) * width] += 1
    return {f"{lo:g}-{lo + width:g}": bins[lo] for lo in sorted(bins)}


def shortcut_tokens(pairs: list[dict[str, Any]], min_pairs: int = 5, min_ratio: float = 3.0,
                    top: int = 15) -> dict[str, list[dict[str, Any]]]:
    """Tokens in far more chosen than rejected answers (and the reverse): what DPO could learn instead of quality."""
    in_chosen: Counter[str] = Counter()
    in_rejected: Counter[str] = Counter()
    for p in pairs:
        in_chosen.update(_tokens(p["chosen"][-1]["content"]))
        in_rejected.update(_tokens(p["rejected"][-1]["content"]))
    floor = max(min_pairs, int(0.05 * len(pairs)))

    def lean(more: Counter[str], less: Counter[str]) -> list[tuple[str, int, int, float]]:
        rows = [(t, more[t], less[t], round((more[t] + 1) / (less[t] + 1), 2)) for t in more if more[t] >= floor]
        return sorted((r for r in rows if r[3] >= min_ratio), key=lambda r: (-r[3], r[0]))[:top]

    return {
        "chosen_over_rejected": [{"token": t, "in_chosen": c, "in_rejected": r, "ratio": x}
                                 for t, c, r, x in lean(in_chosen, in_rejected)],
        "rejected_over_chosen": [{"token": t, "in_chosen": c, "in_rejected": r, "ratio": x}
                                 for t, r, c, x in lean(in_rejected, in_chosen)],
    }


def position_bias(ratings: list[dict[str, Any]]) -> dict[str, dict[str, dict[str, Any]]]:
    """Per aspect and shown position: mean rating, and mean distance from the mean of its own judge call.
    Answers are shuffled before each call, so a position whose distance is far from 0 is one the judge favours."""
    calls: dict[tuple[str, str], list[dict[str, Any]]] = defaultdict(list)
    for r in ratings:
        if r["rating"] is not None:
            calls[(r["item_id"], r["aspect"])].append(r)
    ratings_at: dict[str, dict[int, list[float]]] = defaultdict(lambda: defaultdict(list))
    offsets_at: dict[str, dict[int, list[float]]] = defaultdict(lambda: defaultdict(list))
    for (_, aspect), rows in calls.items():
        mean = sum(r["rating"] for r in rows) / len(rows)
        for r in rows:
            ratings_at[aspect][r["position"]].append(r["rating"])
            offsets_at[aspect][r["position"]].append(r["rating"] - mean)
    return {aspect: {str(pos): {"mean_rating": _mean(v), "mean_offset": _mean(offsets_at[aspect][pos]),
                                "ratings": len(v)} for pos, v in sorted(by_pos.items())}
            for aspect, by_pos in sorted(ratings_at.items())}


def feedback_report(pairs: list[dict[str, Any]], ratings: list[dict[str, Any]]) -> dict[str, Any]:
    """Pair count, margins, length bias, position bias, per-model win rates and shortcut tokens."""
    margins = [p["score_chosen"] - p["score_rejected"] for p in pairs]
    chosen_len = [len(p["chosen"][-1]["content"]) for p in pairs]
    rejected_len = [len(p["rejected"][-1]["content"]) for p in pairs]
    wins: Counter[str] = Counter(p["chosen_model"] for p in pairs)
    losses: Counter[str] = Counter(p["rejected_model"] for p in pairs)
    by_model: dict[str, list[float]] = defaultdict(list)
    for r in ratings:
        if r["rating"] is not None and r["aspect"] != "overall":
            by_model[r["model"]].append(r["rating"])
    models = sorted(set(wins) | set(losses) | set(by_model))
    return {
        "pairs": len(pairs),
        "pairs_by_source": dict(Counter(p["source"] for p in pairs)),
        "margin": {"mean": _mean(margins), "min": _round(min(margins, default=None)),
                   "max": _round(max(margins, default=None)), "histogram": _histogram(margins)},
        "length_bias": {
            "chosen_longer_share": _mean([c > r for c, r in zip(chosen_len, rejected_len, strict=True)]),
            "mean_length_ratio": _mean([c / max(1, r) for c, r in zip(chosen_len, rejected_len, strict=True)]),
            "mean_chosen_chars": _mean(chosen_len), "mean_rejected_chars": _mean(rejected_len)},
        "position_bias": position_bias(ratings),
        "models": {m: {"chosen": wins[m], "rejected": losses[m],
                       "win_rate": _round(wins[m] / (wins[m] + losses[m])) if wins[m] + losses[m] else None,
                       "mean_aspect_rating": _mean(by_model.get(m, []))} for m in models},
        "shortcut_tokens": shortcut_tokens(pairs),
    }


def _mean(values: list[Any]) -> float | None:
    return round(sum(values) / len(values), 4) if values else None


def _round(value: float | None) -> float | None:
    return None if value is None else round(value, 4)


def report_markdown(report: dict[str, Any], stats: dict[str, Any]) -> str:
    """The short human summary of report.json and stats.json."""
    counts = stats["counts"]
    lines = ["# Feedback report", "",
             f"{report['pairs']} pairs from {counts['input']} items ({counts['prompts']} prompts): "
             f"{counts['failed']} failed, {counts['dropped']} dropped, {counts['pending']} pending.", ""]
    if stats.get("dropped_by_reason"):
        lines += ["Dropped: " + ", ".join(f"{k} {v}" for k, v in sorted(stats["dropped_by_reason"].items())), ""]
    m, lb = report["margin"], report["length_bias"]
    lines += ["## Margins", "", f"mean {m['mean']}, min {m['min']}, max {m['max']}", "",
              "| margin | pairs |", "|---|---|", *[f"| {k} | {v} |" for k, v in m["histogram"].items()], "",
              "## Length bias", "",
              f"chosen longer in {lb['chosen_longer_share']} of pairs; mean chosen/rejected length ratio "
              f"{lb['mean_length_ratio']}", "",
              "## Position bias (mean rating offset from its judge call's mean, by shown position)", "",
              "| aspect | " + " | ".join(f"pos {p}" for p in _positions(report)) + " |",
              "|---|" + "---|" * len(_positions(report))]
    for aspect, by_pos in report["position_bias"].items():
        lines.append(f"| {aspect} | " + " | ".join(str(by_pos.get(p, {}).get("mean_offset", ""))
                                                   for p in _positions(report)) + " |")
    lines += ["", "## Models", "", "| model | chosen | rejected | win rate | mean rating |", "|---|---|---|---|---|"]
    for name, row in report["models"].items():
        lines.append(f"| {name} | {row['chosen']} | {row['rejected']} | {row['win_rate']} | "
                     f"{row['mean_aspect_rating']} |")
    short = report["shortcut_tokens"]["chosen_over_rejected"]
    lines += ["", "## Shortcut tokens (in far more chosen than rejected answers)", "",
              ", ".join(f"`{r['token']}` {r['in_chosen']}:{r['in_rejected']}" for r in short) or "none", ""]
    return "\n".join(lines)


def _positions(report: dict[str, Any]) -> list[str]:
    return sorted({p for by_pos in report["position_bias"].values() for p in by_pos}, key=int)


# -- the stage's accounting ------------------------------------------------------------------------
def account_feedback(recipe: Recipe, store: RunStore, items: list[Item], cost: dict[str, float],
                     stop: str) -> StageReport:
    """Every item is a pair, failed or dropped (or pending); stats.json, report.json and report.md from the store."""
    from pipeline.sample import read_columns
    from pipeline.stages import StageReport

    stage = "feedback"
    pairs = list(store.read_records(stage, "pairs"))
    pair_ids = {p["pair_id"] for p in pairs}
    dropped = store.ledger(stage, "dropped").latest()
    failed = store.ledger(stage).compact(pair_ids | set(dropped))
    item_ids = {i.item_id for i in items}
    pending = item_ids - pair_ids - set(failed) - set(dropped)
    by_source: dict[str, Counter[str]] = defaultdict(Counter)
    for item in items:
        outcome = ("pairs" if item.item_id in pair_ids else "failed" if item.item_id in failed else
                   "dropped" if item.item_id in dropped else "pending")
        by_source[item.source]["items"] += 1
        by_source[item.source][outcome] += 1
    ratings = list(read_columns(store, ["item_id", "aspect", "position", "rating", "model", "attempt"], stage,
                                "ratings"))
    margin = recipe.feedback.pairs.min_margin
    counts = {"input": len(item_ids), "prompts": len({i.prompt_id for i in items}), "output": len(pair_ids),
              "failed": len(failed), "dropped": len(dropped), "pending": len(pending)}
    stats = {
        "counts": counts,
        "by_source": {s: dict(c) for s, c in sorted(by_source.items())},
        "dropped_by_reason": dict(Counter(d.reason for d in dropped.values())),
        "failed_by_reason": dict(Counter(f.reason.split(" (", 1)[0][:80] for f in failed.values())),
        "ratings": len(ratings),
        "ratings_after_reask": sum(r["attempt"] > 1 for r in ratings),
        "margin_violations": sum(p["score_chosen"] <= p["score_rejected"] + margin for p in pairs),
        "on_policy_samples": store.count_records(stage, "on_policy"),
        "on_policy_failed": len(store.ledger(stage, "on_policy_failures").compact(
            {r["completion_id"] for r in read_columns(store, ["completion_id"], stage, "on_policy")})),
        "teacher": cost,
    }
    report = feedback_report(pairs, ratings)
    store.write_json(store.join(stage, "stats.json"), stats)
    store.write_json(store.join(stage, "report.json"), report)
    store.write_bytes(store.join(stage, "report.md"), report_markdown(report, stats).encode())
    failure_rate = len(failed) / max(1, len(item_ids) - len(dropped))
    if stop:
        status, message = "failed", f"stopped early: {stop} ({len(pair_ids)} pairs saved)"
    elif pending:
        status, message = "failed", f"{len(pending)} items neither judged nor recorded as failed; rerun to resume"
    elif failure_rate > recipe.feedback.max_failure_rate:
        status, message = "failed", (f"{len(failed)} of {len(item_ids)} items failed (> feedback.max_failure_rate="
                                     f"{recipe.feedback.max_failure_rate}); see "
                                     f"{store.join(stage, 'failures.jsonl')}; rerun to retry them")
    else:
        status = "completed"
        message = (f"{len(pair_ids)} pairs from {len(item_ids)} items, {len(failed)} failed, {len(dropped)} dropped; "
                   f"mean margin {report['margin']['mean']}")
    return StageReport(stage, status, counts, cost, {"pairs": store.join(stage), "report": store.join(stage, "report.md")},
                       message)
