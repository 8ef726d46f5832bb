"""Evaluation statistics beyond the raw means: the length-controlled win rate (AlpacaEval 2), the judge's own
biases (position, length) and scores per category."""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from pipeline.stages.evaluate.judge import win_rate

RIDGE = 1e-3  # keeps the length coefficient finite when length alone separates wins from losses
MAX_LOGIT = 20.0  # an intercept past this is a certain outcome: stop there instead of diverging


def mean_se(values: Any) -> dict[str, float | int | None]:
    """Mean, standard error of the mean and n (None for an empty list)."""
    values = [float(v) for v in values]
    if not values:
        return {"mean": None, "stderr": None, "n": 0}
    mean, se = win_rate(values)  # the same mean / standard-error arithmetic
    return {"mean": mean, "stderr": se, "n": len(values)}


def _fit_logistic(x: np.ndarray, y: np.ndarray, iterations: int = 100) -> tuple[np.ndarray, np.ndarray]:
    """Coefficients and their sandwich covariance for P(y) = sigmoid(x @ beta), y in [0, 1] (ties are 0.5)."""
    n, k = x.shape
    beta = np.zeros(k)
    penalty = np.diag([0.0] + [RIDGE * n] * (k - 1))  # the intercept is never shrunk
    for _ in range(iterations):
        p = 1 / (1 + np.exp(-(x @ beta)))
        hessian = x.T @ (x * (p * (1 - p))[:, None]) + penalty
        step = np.linalg.solve(hessian + 1e-12 * np.eye(k), x.T @ (y - p) - penalty @ beta)
        beta = np.clip(beta + step, -MAX_LOGIT, MAX_LOGIT)
        if np.max(np.abs(step)) < 1e-10:
            break
    p = 1 / (1 + np.exp(-(x @ beta)))
    bread = np.linalg.pinv(x.T @ (x * (p * (1 - p))[:, None]) + penalty)
    meat = x.T @ (x * ((y - p) ** 2)[:, None])
    # HC1: with the intercept alone this is exactly the raw win rate's standard error
    cov = bread @ meat @ bread * (n / (n - k) if n > k else 1.0)
    return beta, cov


def length_controlled(scores: list[float], length_diffs: list[float]) -> dict[str, Any]:
    """AlpacaEval 2's length control: a logistic regression of the pairwise outcome on the (standardised, tanh-
    squashed) length difference, read at zero difference. Equal lengths give back the raw win rate."""
    n = len(scores)
    if n == 0:
        return {"win_rate": None, "stderr": None, "length_coef": None, "n": 0}
    y, d = np.asarray(scores, float), np.asarray(length_diffs, float)
    spread = float(d.std())
    columns = [np.ones(n)] + ([np.tanh(d / spread)] if spread > 0 else [])
    beta, cov = _fit_logistic(np.column_stack(columns), y)
    rate = float(1 / (1 + math.exp(-beta[0])))
    se = rate * (1 - rate) * math.sqrt(max(float(cov[0, 0]), 0.0))  # the delta method
    return {"win_rate": rate, "stderr": se, "length_coef": float(beta[1]) if spread > 0 else 0.0, "n": n}


def judge_bias(pairs: list[dict[str, Any]], lengths: dict[tuple[str, str], int]) -> dict[str, Any]:
    """The evaluation judge's own biases, from its verdicts in both orders: how often a verdict flips when the
    order swaps, how often the answer shown first wins, and how often the longer answer wins."""
    judged = [p for p in pairs if not p["identical"]]
    won = {"A": 1.0, "B": 0.0, "C": 0.5}
    # verdict_first shows the candidate as A, verdict_second as B: a consistent judge names the same answer
    flips = [won[p["verdict_first"]] != 1.0 - won[p["verdict_second"]] for p in judged]
    verdicts = [v for p in judged for v in (p["verdict_first"], p["verdict_second"]) if v in "AB"]
    longer: list[bool] = []
    for p in judged:
        mine, theirs = lengths.get((p["item_id"], p["model"])), lengths.get((p["item_id"], p["baseline"]))
        if p["score"] != 0.5 and mine is not None and theirs is not None and mine != theirs:
            longer.append((p["score"] == 1.0) == (mine > theirs))
    return {"pairs": len(judged), "flipped": sum(flips), "flip_share": _share(flips),
            "decisive_verdicts": len(verdicts), "first_shown_win_share": _share([v == "A" for v in verdicts]),
            "decided_with_length_difference": len(longer), "longer_win_share": _share(longer)}


def _share(flags: list[bool]) -> float | None:
    return sum(flags) / len(flags) if flags else None


def by_category(items: list[dict[str, Any]], models: list[dict[str, Any]], answers: list[dict[str, Any]],
                singles: list[dict[str, Any]], pairs: list[dict[str, Any]]) -> dict[str, Any]:
    """Per category and model: the judge's score, the win rate against the baseline and the accuracy, each
    with its standard error."""
    category = {it["item_id"]: it["category"] for it in items}
    out: dict[str, Any] = {}
    for cat in sorted(set(category.values())):
        rows: dict[str, Any] = {}
        for m in models:
            label = m["label"]
            ratings = [s["rating"] for s in singles if s["model"] == label and category.get(s["item_id"]) == cat]
            truth = [a["correct"] for a in answers if a["model"] == label and a["correct"] is not None
                     and category.get(a["item_id"]) == cat]
            vs = [p["score"] for p in pairs if p["model"] == label and category.get(p["item_id"]) == cat]
            rows[label] = {"judge": mean_se(ratings), "accuracy": mean_se(truth) if truth else None,
                           "win_rate": mean_se(vs) if vs else None}
        out[cat] = {"items": sum(c == cat for c in category.values()), "models": rows}
    return out


def answer_lengths(answers: list[dict[str, Any]]) -> dict[tuple[str, str], int]:
    """(item id, model label) -> characters in the model's answers to all turns of the item."""
    return {(a["item_id"], a["model"]): sum(len(t) for t in a["answers"]) for a in answers}


def versus_length_controlled(rows: list[dict[str, Any]], lengths: dict[tuple[str, str], int]) -> dict[str, Any]:
    """The length-controlled win rate of the pairwise rows of one model against its baseline."""
    usable = [p for p in rows if (p["item_id"], p["model"]) in lengths and (p["item_id"], p["baseline"]) in lengths]
    diffs = [lengths[(p["item_id"], p["model"])] - lengths[(p["item_id"], p["baseline"])] for p in usable]
    return length_controlled([p["score"] for p in usable], diffs)
