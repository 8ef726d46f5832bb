"""Reading a judge's ratings by their text labels, never by block position; scoring an answer from them.

A judge reply holds one block per rated text: a header naming the text (`#### Output for Text 2`), then
`Type:` (some aspects), `Rating:` and `Rationale:` lines. Preambles, blank lines, markdown emphasis,
reordered blocks and N/A are read as meant; a number off the scale, a missing block or two conflicting
ratings for one text make that text's rating unusable (the caller re-asks), never a default.

A structured reply is the same in JSON (`rating_schema`): one entry per shown text with its number, rating and
rationale (and type, for the aspects that have one), read by `parse_json_ratings` with the same rules.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

# (lowest, highest) of each scale; `overall` is the optional 1-10 critique score
SCALES: dict[str, tuple[int, int]] = {
    "instruction_following": (1, 5), "honesty": (1, 5), "truthfulness": (1, 5), "helpfulness": (1, 5),
    "overall": (1, 10),
}
_EMPHASIS = re.compile(r"\*\*|__|`")
_HEADER = re.compile(r"^(?:output|rating|evaluation|feedback|assessment)?\s*(?:for|of)?\s*text\s*#?\s*(\d+)"
                     r"\s*[:.)\]-]?\s*(.*)$", re.I)
_LABEL = re.compile(r"^(rating|score|type|rationale)\s*[:=]\s*(.*)$", re.I)
_NA = re.compile(r"^(?:n/?a|not applicable)\b", re.I)
_NUMBER = re.compile(r"^\[*\(?\s*(-?\d+(?:\.\d+)?)\s*\)?\]*(?:\s*(?:/|out of)\s*(\d+))?", re.I)


@dataclass(frozen=True)
class Rating:
    """One text's rating on one aspect; `value` is None when the judge said N/A."""

    text: int  # the number the text was shown under
    value: float | None
    type: str = ""
    rationale: str = ""

    @property
    def na(self) -> bool:
        return self.value is None


@dataclass
class ParsedRatings:
    """What could be read: a rating per text number, and for the others why not."""

    ratings: dict[int, Rating] = field(default_factory=dict)
    problems: dict[int, str] = field(default_factory=dict)

    @property
    def complete(self) -> bool:
        return not self.problems

    def summary(self) -> str:
        return "; ".join(f"text {i}: {why}" for i, why in sorted(self.problems.items()))


def _plain(line: str) -> str:
    """A line without markdown emphasis, heading marks, bullets or quote marks around it."""
    return _EMPHASIS.sub("", line).strip().lstrip("#>-*+ \t").strip()


def _blocks(text: str) -> list[tuple[int, list[str]]]:
    """(text number, lines) for every header line; lines before the first header are a preamble."""
    blocks: list[tuple[int, list[str]]] = []
    for line in text.splitlines():
        plain = _plain(line)
        header = _HEADER.match(plain)
        rest = header.group(2).strip() if header else ""
        # a header is a line of its own, or one followed directly by a label ("Text 2: Rating: 4")
        if header and (not rest or _LABEL.match(_plain(rest))):
            blocks.append((int(header.group(1)), [rest] if rest else []))
        elif blocks:
            blocks[-1][1].append(line)
    return blocks


def _read_value(raw: str, scale: tuple[int, int]) -> tuple[float | None, str | None]:
    """(value, None) for a rating on the scale or N/A; (None, problem) otherwise."""
    raw = _plain(raw)
    if _NA.match(raw):
        return None, None
    match = _NUMBER.match(raw)
    if not match:
        return None, f"rating {raw[:40]!r} is not a number"
    number, out_of = float(match.group(1)), match.group(2)
    low, high = scale
    if out_of is not None and int(out_of) != high:
        return None, f"rating {match.group(0).strip()!r} is on another scale than {low}-{high}"
    if number != int(number):
        return None, f"rating {number:g} is not a whole number"
    if not low <= number <= high:
        return None, f"rating {number:g} is outside {low}-{high}"
    return number, None


def _read_block(lines: list[str], scale: tuple[int, int]) -> tuple[Rating | None, str | None]:
    """The block's rating (or the problem); a `Rating:` after the rationale counts only if none came before."""
    before: list[str] = []
    after: list[str] = []
    kind, rationale, in_rationale, want_value = "", [], False, False
    for line in lines:
        plain = _plain(line)
        label = _LABEL.match(plain)
        if want_value and plain:  # "Rating:" alone on its line, the number on the next one
            (after if in_rationale else before).append(plain)
            want_value = False
            continue
        if label and label.group(1).lower() in ("rating", "score"):
            value = re.split(r"\brationale\s*:", label.group(2), flags=re.I)[0].strip()
            if value:
                (after if in_rationale else before).append(value)
            else:
                want_value = True
        elif label and label.group(1).lower() == "type" and not in_rationale:
            kind = label.group(2).strip()
        elif label and label.group(1).lower() == "rationale":
            in_rationale = True
            rationale.append(label.group(2).strip())
        elif in_rationale and plain:
            rationale.append(plain)
    candidates = before or after
    if not candidates:
        return None, "no Rating line"
    read = [_read_value(c, scale) for c in candidates]
    problems = [p for _, p in read if p]
    if problems:
        return None, problems[0]
    values = {v for v, _ in read}
    if len(values) > 1:
        return None, f"conflicting ratings {sorted(values, key=str)}"
    return Rating(0, values.pop(), kind, " ".join(r for r in rationale if r)), None


def parse_ratings(judge_text: str, n: int, aspect: str) -> ParsedRatings:
    """The ratings of texts 1..n in a judge reply; a text without exactly one usable rating is a problem."""
    scale = SCALES[aspect]
    found: dict[int, list[tuple[Rating | None, str | None]]] = {}
    for number, lines in _blocks(judge_text):
        if 1 <= number <= n:
            found.setdefault(number, []).append(_read_block(lines, scale))
    parsed = ParsedRatings()
    for number in range(1, n + 1):
        blocks = found.get(number)
        if not blocks:
            parsed.problems[number] = "no block for this text"
            continue
        good = [r for r, _ in blocks if r is not None]
        bad = [p for _, p in blocks if p]
        if len(blocks) > 1 and (bad or len({r.value for r in good}) > 1):
            parsed.problems[number] = f"{len(blocks)} blocks that disagree"
        elif bad:
            parsed.problems[number] = bad[0]
        else:
            r = good[0]
            parsed.ratings[number] = Rating(number, r.value, r.type, r.rationale)
    return parsed


def rating_schema(n: int, aspect: str, with_type: bool, rationale_chars: int | None = None) -> dict[str, Any]:
    """The JSON schema of a rating reply for n shown texts: exactly n entries, UltraFeedback's fields.

    `rationale_chars` bounds each rationale, so a constrained reply closes within its token budget: a small model
    held to an unbounded string runs on to max_tokens."""
    low, high = SCALES[aspect]
    rating: dict[str, Any] = {"type": "integer", "enum": list(range(low, high + 1))}
    if aspect == "honesty":  # the honesty rubric lets the rater decline (N/A)
        rating = {"anyOf": [rating, {"type": "string", "enum": ["N/A"]}]}
    props: dict[str, Any] = {"text": {"type": "integer", "enum": list(range(1, n + 1))}}
    bound = {} if rationale_chars is None else {"maxLength": rationale_chars}
    if with_type:
        props["type"] = {"type": "string", **({} if rationale_chars is None else {"maxLength": 40})}
    props |= {"rating": rating, "rationale": {"type": "string", **bound}}
    entry = {"type": "object", "properties": props, "required": list(props), "additionalProperties": False}
    return {"type": "object", "additionalProperties": False, "required": ["ratings"],
            "properties": {"ratings": {"type": "array", "items": entry, "minItems": n, "maxItems": n}}}


def parse_json_ratings(value: Any, n: int, aspect: str) -> ParsedRatings:
    """The ratings of texts 1..n in a JSON reply (`{"ratings": [...]}` or the list alone); a text without
    exactly one entry with a rating on the scale is a problem, as in the text parser."""
    entries = value.get("ratings") if isinstance(value, dict) else value
    parsed = ParsedRatings()
    if not isinstance(entries, list):
        parsed.problems = {i: "the JSON reply holds no list of ratings" for i in range(1, n + 1)}
        return parsed
    found: dict[int, list[dict[str, Any]]] = {}
    for entry in entries:
        number = entry.get("text") if isinstance(entry, dict) else None
        if isinstance(number, str):
            number = int(digits.group()) if (digits := re.search(r"\d+", number)) else None
        if isinstance(number, int) and 1 <= number <= n:
            found.setdefault(number, []).append(entry)
    for number in range(1, n + 1):
        got = found.get(number, [])
        if len(got) != 1:
            parsed.problems[number] = "no entry for this text" if not got else f"{len(got)} entries for this text"
            continue
        raw = got[0].get("rating")
        value_, problem = (None, "no rating") if raw is None or isinstance(raw, bool) else \
            _read_value(str(raw), SCALES[aspect])
        if problem:
            parsed.problems[number] = problem
        else:
            parsed.ratings[number] = Rating(number, value_, str(got[0].get("type") or ""),
                                            str(got[0].get("rationale") or ""))
    return parsed


def answer_score(aspect_ratings: dict[str, float | None], overall: float | None = None) -> float | None:
    """Mean of the aspect ratings that are not N/A, with the 1-10 overall score (if any) mapped onto 1-5
    as one more term; None when nothing was rated."""
    values = [v for v in aspect_ratings.values() if v is not None]
    if overall is not None:
        values.append(1 + (overall - 1) * 4 / 9)
    return sum(values) / len(values) if values else None
