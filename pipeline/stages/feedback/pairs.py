"""Binarization: rated answers become one chosen/rejected pair (Zephyr: the best vs a random lower one)."""

from __future__ import annotations

import random

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


def correction_pair(scores: list[float | None], min_margin: float) -> tuple[int, int] | str:
    """(rewrite, draft) when the rewrite scores more than min_margin above the draft."""
    draft, rewrite = scores
    if draft is None or rewrite is None:
        return "fewer_than_2_rated_answers"
    return (1, 0) if rewrite - draft > min_margin + EPS else "correction_not_better"
