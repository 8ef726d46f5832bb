"""The feedback report: margins, length and position bias, per-model win rates, shortcut tokens."""

from __future__ import annotations

import re
from collections import Counter, defaultdict
from collections.abc import Iterable
from typing import Any

from pipeline.stages.feedback.pairs import EPS
from pipeline.teacher.structured import describe

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
    calls = _calls(ratings)
    ratings_at: dict[str, dict[int, list[float]]] = defaultdict(lambda: defaultdict(list))
    offsets_at: dict[str, dict[int, list[float]]] = defaultdict(lambda: defaultdict(list))
    for (_, aspect, _, _), rows in calls.items():
        mean = sum(r["rating"] for r in rows) / len(rows)
        for r in rows:
            ratings_at[aspect][r["position"]].append(r["rating"])
            offsets_at[aspect][r["position"]].append(r["rating"] - mean)
    return {aspect: {str(pos): {"mean_rating": _mean(v), "mean_offset": _mean(offsets_at[aspect][pos]),
                                "ratings": len(v)} for pos, v in sorted(by_pos.items())}
            for aspect, by_pos in sorted(ratings_at.items())}


def _calls(ratings: list[dict[str, Any]]) -> dict[tuple[str, str, int, str], list[dict[str, Any]]]:
    """The ratings of each judge call: one item, aspect, order shown and rater."""
    calls: dict[tuple[str, str, int, str], list[dict[str, Any]]] = defaultdict(list)
    for r in ratings:
        if r["rating"] is not None:
            calls[(r["item_id"], r["aspect"], r.get("order") or 0, r.get("judge_model") or "")].append(r)
    return calls


def first_position_advantage(ratings: list[dict[str, Any]]) -> dict[str, float | None]:
    """Per aspect (and `all`): the mean over judge calls of the first-shown answer's rating minus the mean of the
    others in its call. Orders are shuffled, so for a fair judge it is near 0; a judge that adds d to the first
    text shows about d (less where the scale's top or bottom cuts it off)."""
    gaps: dict[str, list[float]] = defaultdict(list)
    for (_, aspect, _, _), rows in _calls(ratings).items():
        first = [r["rating"] for r in rows if r["position"] == 1]
        others = [r["rating"] for r in rows if r["position"] != 1]
        if first and others:
            gap = first[0] - sum(others) / len(others)
            gaps[aspect].append(gap)
            gaps["all"].append(gap)
    return {aspect: _mean(values) for aspect, values in sorted(gaps.items())}


def feedback_report(pairs: list[dict[str, Any]], ratings: list[dict[str, Any]],
                    mitigations: dict[str, str] | None = None) -> dict[str, Any]:
    """Pair count, margins, length bias, position bias, per-model win rates, shortcut tokens, mitigations."""
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
        "first_position_advantage": first_position_advantage(ratings),
        "models": {m: {"chosen": wins[m], "rejected": losses[m],
                       "win_rate": _round(wins[m] / (wins[m] + losses[m])) if wins[m] + losses[m] else None,
                       "mean_aspect_rating": _mean(by_model.get(m, []))} for m in models},
        "shortcut_tokens": shortcut_tokens(pairs),
        "mitigations": mitigations or {},
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
    if report.get("parsing"):
        lines += ["## Rating replies (mode and parse rate per rater)", "",
                  *[f"- {role}: {describe(tally)}" for role, tally in sorted(report["parsing"].items())], ""]
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
    advantage = report.get("first_position_advantage", {})
    lines += ["", "First-position advantage (first shown minus the others of its call): "
              + (", ".join(f"{a} {v}" for a, v in advantage.items()) or "none")]
    if report.get("mitigations"):
        lines += ["", "## Mitigations", "", *[f"- `{k}`: {v}" for k, v in report["mitigations"].items()]]
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
