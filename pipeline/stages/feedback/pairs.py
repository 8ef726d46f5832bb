"""Binarization: rated answers become one chosen/rejected pair (Zephyr: the best vs a random lower one)."""

from __future__ import annotations

import random
from collections.abc import Callable

EPS = 1e-9  # means of small integers: a float error must never let a pair through at the margin


def binarize(scores: list[float | None], strategy: str, min_margin: float, rng: random.Random,
             why_not: Callable[[int, int], str | None] | None = None) -> tuple[int, int] | str:
    """(chosen index, rejected index), or why no pair forms: chosen is a highest-scored answer, rejected is
    uniform among those scored more than `min_margin` lower (`best_vs_random`, Zephyr) or the lowest
    (`best_vs_worst`), leaving out those `why_not` objects to. Unscored answers take no part; ties never pair."""
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
    if why_not is not None:
        reasons = [why_not(chosen, i) for i, _ in lower]
        if all(reasons):
            return reasons[0]
        lower = [pair for pair, reason in zip(lower, reasons, strict=True) if reason is None]
    if strategy == "best_vs_worst":
        lowest = min(s for _, s in lower)
        return chosen, rng.choice([i for i, s in lower if s == lowest])
    if strategy == "best_vs_random":
        return chosen, rng.choice([i for i, _ in lower])
    raise ValueError(f"feedback.pairs.strategy: unknown strategy '{strategy}'")


def correction_pair(scores: list[float | None], min_margin: float,
                    why_not: Callable[[int, int], str | None] | None = None) -> tuple[int, int] | str:
    """(rewrite, draft) when the rewrite scores more than min_margin above the draft (and `why_not` agrees)."""
    draft, rewrite = scores
    if draft is None or rewrite is None:
        return "fewer_than_2_rated_answers"
    if rewrite - draft <= min_margin + EPS:
        return "correction_not_better"
    return (why_not and why_not(1, 0)) or (1, 0)
