"""Strict parsers for judge verdicts (MT-Bench style): a single 1-10 rating, or a pairwise [[A]]/[[B]]/[[C]]; and
their structured form, a JSON object with an explanation and the rating or verdict (`SINGLE_SCHEMA`,
`PAIRWISE_SCHEMA`)."""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

# Text the judge quotes back from the answers is the assistants' words, never a verdict.
_QUOTED = re.compile(r"<answer(?: [AB])?>.*?</answer(?: [AB])?>", re.IGNORECASE | re.DOTALL)
_RATING = re.compile(r"\[\[\s*(\d+(?:\.\d+)?)\s*\]\]")
_CHOICE = re.compile(r"\[\[\s*([ABC])\s*\]\]")


class VerdictError(ValueError):
    """The judge's output holds no verdict, or more than one different verdict."""


@dataclass(frozen=True)
class PairwiseOutcome:
    """A pair judged in both orders: 1 = the candidate wins, 0 = it loses, 0.5 = tie (incl. disagreement)."""

    score: float
    first: str  # verdict with the candidate shown as A
    second: str  # verdict with the candidate shown as B


def _unquoted(text: str) -> str:
    return _QUOTED.sub(" ", text)


def parse_single(text: str, low: int = 1, high: int = 10) -> float:
    """The judge's [[N]] rating; several different ratings, none, or one out of range is an error."""
    found = {float(m) for m in _RATING.findall(_unquoted(text))}
    if not found:
        raise VerdictError("no rating in [[N]] form in the judge output")
    if len(found) > 1:
        raise VerdictError(f"conflicting ratings {sorted(found)} in the judge output")
    value = found.pop()
    if not low <= value <= high:
        raise VerdictError(f"rating {value:g} is outside {low}..{high}")
    return value


def parse_pairwise(text: str) -> str:
    """'A', 'B' or 'C' (tie); no verdict or conflicting verdicts is an error."""
    found = set(_CHOICE.findall(_unquoted(text)))
    if not found:
        raise VerdictError("no [[A]]/[[B]]/[[C]] verdict in the judge output")
    if len(found) > 1:
        raise VerdictError(f"conflicting verdicts {sorted(found)} in the judge output")
    return found.pop()


SINGLE_SCHEMA = {"type": "object", "additionalProperties": False, "required": ["explanation", "rating"],
                 "properties": {"explanation": {"type": "string"},
                                "rating": {"type": "integer", "enum": list(range(1, 11))}}}
PAIRWISE_SCHEMA = {"type": "object", "additionalProperties": False, "required": ["explanation", "verdict"],
                   "properties": {"explanation": {"type": "string"},
                                  "verdict": {"type": "string", "enum": ["A", "B", "C"]}}}


def bounded(schema: dict[str, Any], max_tokens: int) -> dict[str, Any]:
    """The schema with its explanation held to what fits in `max_tokens` (at one token a character at worst,
    with room for the JSON around it), so a constrained reply reaches its verdict: held to an unbounded string a
    small judge explains on until max_tokens and never gives one."""
    explanation = {**schema["properties"]["explanation"], "maxLength": max(16, max_tokens - 24)}
    return {**schema, "properties": {**schema["properties"], "explanation": explanation}}


def parse_single_json(value: Any, low: int = 1, high: int = 10) -> float:
    """The `rating` of a structured single grading; a missing, non-numeric or out-of-range one is an error."""
    rating = value.get("rating") if isinstance(value, dict) else None
    if isinstance(rating, str) and re.fullmatch(r"\s*\d+(?:\.\d+)?\s*", rating):
        rating = float(rating)
    if isinstance(rating, bool) or not isinstance(rating, int | float):
        raise VerdictError("no numeric rating in the judge's JSON reply")
    if not low <= rating <= high:
        raise VerdictError(f"rating {rating:g} is outside {low}..{high}")
    return float(rating)


def parse_pairwise_json(value: Any) -> str:
    """The `verdict` (A, B or C) of a structured pairwise comparison; anything else is an error."""
    verdict = value.get("verdict") if isinstance(value, dict) else None
    verdict = verdict.strip().strip("[]").strip().upper() if isinstance(verdict, str) else verdict
    if verdict not in ("A", "B", "C"):
        raise VerdictError(f"no A/B/C verdict in the judge's JSON reply (got {verdict!r})")
    return verdict


def combine_orders(candidate_first: str, candidate_second: str) -> PairwiseOutcome:
    """Candidate shown as A, then as B: a win only if both orders agree; disagreement is a tie."""
    won_first = {"A": 1.0, "B": 0.0, "C": 0.5}[candidate_first]
    won_second = {"A": 0.0, "B": 1.0, "C": 0.5}[candidate_second]
    score = won_first if won_first == won_second else 0.5
    return PairwiseOutcome(score, candidate_first, candidate_second)


def win_rate(scores: list[float]) -> tuple[float, float]:
    """(wins + ties/2) / n and its standard error."""
    n = len(scores)
    if n == 0:
        return float("nan"), float("nan")
    mean = sum(scores) / n
    var = sum((s - mean) ** 2 for s in scores) / (n - 1) if n > 1 else 0.0
    return mean, (var / n) ** 0.5
