"""Mitigations of a biased rater: every aspect rated in several orders and averaged, pairs whose preference
flips with the order dropped, and length-aware pair selection (a chosen answer may not win by length alone)."""

from __future__ import annotations

import random
from collections import defaultdict
from collections.abc import Callable
from typing import Any

from pipeline.core.recipe import FeedbackConfig
from pipeline.stages.feedback.pairs import EPS
from pipeline.stages.feedback.ratings import answer_score

ORDER_FLIP = "order_flip"
LENGTH_ONLY = "won_by_length_only"
PANEL_SPLIT = "panel_split"


def shown_order(seed: int, item_id: str, aspect: str, attempt: int, n: int, order: int, orders: int) -> list[int]:
    """Answer indices in the order shown: a seeded shuffle (order 0, as UltraFeedback), then rotations of it by
    `order * n / orders`, so with `orders = n` every answer is shown first exactly once."""
    base = list(range(n))
    random.Random(f"{seed}:{item_id}:{aspect}:{attempt}").shuffle(base)
    if order == 0:
        return base
    if order >= n:  # more orders than answers: fresh shuffles beyond the n rotations
        random.Random(f"{seed}:{item_id}:{aspect}:{attempt}:order-{order}").shuffle(base)
        return base
    shift = order * n // orders if orders <= n else order
    return base[shift:] + base[:shift]


def words(text: str) -> int:
    return len(text.split())


def pair_filter(order_scores: list[list[float | None]], lengths: list[int], scores: list[float | None],
                drop_order_flips: bool, min_margin: float, length_margin_per_word: float,
                rater_scores: list[list[float | None]] | None = None) -> Callable[[int, int], str | None] | None:
    """Why (chosen, rejected) may not form a pair, or None when it may: its preference flips in some order; the
    chosen answer is longer and its lead does not clear the margin plus the per-word length margin; or (a panel
    voting by majority, `rater_scores` one list per rater) no more than half the raters prefer the chosen one."""
    if not drop_order_flips and not length_margin_per_word and not rater_scores:
        return None

    def why_not(c: int, r: int) -> str | None:
        if rater_scores and 2 * sum(s[c] is not None and s[r] is not None and s[c] > s[r] + EPS
                                    for s in rater_scores) <= len(rater_scores):
            return PANEL_SPLIT
        if drop_order_flips and any(s[c] is None or s[r] is None or s[c] <= s[r] + EPS for s in order_scores):
            return ORDER_FLIP
        extra = max(0, lengths[c] - lengths[r])
        if length_margin_per_word and scores[c] - scores[r] <= min_margin + length_margin_per_word * extra + EPS:
            return LENGTH_ONLY
        return None

    return why_not


def _order_scores(ratings: list[dict[str, Any]]) -> dict[tuple[str, str, int], float | None]:
    """(item, completion, order) -> the answer's score from that order's ratings alone."""
    by_answer: dict[tuple[str, str, int], dict[str, float | None]] = defaultdict(dict)
    for r in ratings:
        by_answer[(r["item_id"], r["completion_id"], r.get("order") or 0)][r["aspect"]] = r["rating"]
    return {key: answer_score({a: v for a, v in aspects.items() if a != "overall"}, aspects.get("overall"))
            for key, aspects in by_answer.items()}


def mitigation_effects(cfg: FeedbackConfig, pairs: list[dict[str, Any]], ratings: list[dict[str, Any]],
                       dropped_by_reason: dict[str, int]) -> dict[str, str]:
    """One line per mitigation in use saying what it changed in this run (report.json and report.md)."""
    lines: dict[str, str] = {}
    if cfg.orders > 1:
        first = _order_scores([r for r in ratings if not r.get("order")])
        overturned = 0
        for p in pairs:
            c = first.get((p["pair_id"], p["chosen_completion_id"], 0))
            r = first.get((p["pair_id"], p["rejected_completion_id"], 0))
            overturned += c is None or r is None or c <= r + EPS
        lines["orders"] = (f"every aspect rated in {cfg.orders} orders and averaged ({cfg.orders}x the rating "
                           f"requests); the first order alone would have tied or reversed {overturned} of "
                           f"{len(pairs)} pairs kept")
    if cfg.drop_order_flips:
        lines["drop_order_flips"] = (f"{dropped_by_reason.get(ORDER_FLIP, 0)} items dropped: every pair they could "
                                     f"form flips its preference in some order")
    if cfg.pairs.length_margin_per_word:
        longer = sum(len(p["chosen"][-1]["content"].split()) > len(p["rejected"][-1]["content"].split())
                     for p in pairs)
        lines["length_margin_per_word"] = (
            f"{dropped_by_reason.get(LENGTH_ONLY, 0)} items dropped: the chosen answer led by no more than its "
            f"extra length x {cfg.pairs.length_margin_per_word:g}; chosen has more words in {longer} of "
            f"{len(pairs)} pairs")
    if len(cfg.panel) > 1:
        lines["panel"] = (f"{len(cfg.panel)} raters ({', '.join(cfg.panel)}), {cfg.aggregate}: their top-rated "
                          f"answers share none on {_panel_disagreements(ratings)} items"
                          + (f"; {dropped_by_reason.get(PANEL_SPLIT, 0)} items dropped: no majority for any pair"
                             if cfg.aggregate == "majority" else ""))
    return lines or {"none": "no mitigation in use: one order, no flip or length filter, one rater"}


def _panel_disagreements(ratings: list[dict[str, Any]]) -> int:
    """Items on which no answer is top-rated (mean of aspects and orders) by every rater of the panel."""
    sums: dict[str, dict[str, dict[str, list[float]]]] = defaultdict(lambda: defaultdict(lambda: defaultdict(list)))
    for r in ratings:
        if r["rating"] is not None:
            sums[r["item_id"]][r.get("judge_model") or ""][r["completion_id"]].append(r["rating"])
    split = 0
    for by_rater in sums.values():
        tops = []
        for by_answer in by_rater.values():
            means = {c: sum(v) / len(v) for c, v in by_answer.items()}
            tops.append({c for c, m in means.items() if m >= max(means.values()) - EPS})
        split += len(tops) > 1 and not set.intersection(*tops)
    return split
