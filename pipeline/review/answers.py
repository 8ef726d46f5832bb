"""A review's answers: recorded in the round's store (`feedback/review/answers.json`), turned into verdicts with
respect to the judge's pick (agree, swap, drop) and applied to the pairs dpo trains on."""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Iterable
from typing import Any

from pipeline.core.store import RunStore
from pipeline.review.sample import ReviewItem

ANSWERS = ("A", "B", "drop")
# what a person may write for each answer, in the form or a file: the UI's labels and the short forms
SPELLINGS = {"a": "A", "a is better": "A", "b": "B", "b is better": "B", "drop": "drop"}


class ReviewError(ValueError):
    """A review that cannot be used (a form with a missing or unknown answer, answers for other pairs)."""


class ReviewPending(RuntimeError):
    """dpo would train on pairs a person has not reviewed yet; the message says how to review them."""


class ReviewTimedOut(RuntimeError):
    """Nobody answered the review within feedback.review.timeout_s and on_timeout is fail."""


def review_path(store: RunStore, name: str) -> str:
    """A file of the round's review, next to the pairs it is about (so a new feedback run drops it with them)."""
    return store.join("feedback", "review", name)


def normalize_answer(value: Any) -> str | None:
    """`A`, `B` or `drop` for what a person wrote (`a`, `A is better`, `Drop`); None for anything else."""
    return SPELLINGS.get(str(value).strip().lower()) if value is not None else None


def verdict(item: ReviewItem, answer: str) -> str:
    """The answer with respect to the judge: agree (the person picked the judge's side), swap or drop."""
    if answer == "drop":
        return "drop"
    return "agree" if answer == item.judge_pick else "swap"


def record_review(store: RunStore, items: list[ReviewItem], answers: dict[int, tuple[str, str]], by: str,
                  pairs_total: int, where: str) -> dict[str, Any]:
    """Check that every item has an answer (`where` names the form in errors) and record the review."""
    missing = [i.number for i in items if i.number not in answers]
    if missing:
        raise ReviewError(f"{where}: pair{'s' if len(missing) > 1 else ''} {', '.join(map(str, missing))} "
                          f"{'have' if len(missing) > 1 else 'has'} no answer; answer each with A, B or drop")
    rows = []
    for item in items:
        answer, note = answers[item.number]
        if answer not in ANSWERS:
            raise ReviewError(f"{where}: pair {item.number}: answer '{answer}' is not one of A, B, drop")
        rows.append({**item.to_dict(), "answer": answer, "verdict": verdict(item, answer), "note": note or ""})
    return _write(store, {"status": "answered", "by": by, "pairs_total": pairs_total, "items": rows})


def record_timeout(store: RunStore, items: list[ReviewItem], by: str, pairs_total: int,
                   waited_s: int) -> dict[str, Any]:
    """Record that nobody answered (on_timeout: continue): dpo trains on the judge's pairs as they are."""
    rows = [{**item.to_dict(), "answer": None, "verdict": None, "note": ""} for item in items]
    return _write(store, {"status": "timed_out", "by": by, "pairs_total": pairs_total, "items": rows,
                          "waited_s": waited_s})


def _write(store: RunStore, review: dict[str, Any]) -> dict[str, Any]:
    review = {**review, "round": store.round, "recorded_at": time.time()}
    store.write_json(review_path(store, "answers.json"), review)
    return review


def read_review(store: RunStore) -> dict[str, Any] | None:
    """The round's recorded review, or None when there is none yet."""
    return store.read_json(review_path(store, "answers.json"))


def review_digest(review: dict[str, Any] | None) -> str | None:
    """What of a review decides dpo's training: which pairs got which verdict (notes do not); None for none."""
    if review is None:
        return None
    verdicts = sorted((i["pair_id"], i["verdict"]) for i in review["items"])
    payload = json.dumps({"status": review["status"], "verdicts": verdicts}, sort_keys=True)
    return hashlib.sha256(payload.encode()).hexdigest()[:16]


def swapped(record: dict[str, Any]) -> dict[str, Any]:
    """The pair with its chosen and rejected sides exchanged: answers, scores, models, per-aspect ratings."""
    out = dict(record)
    for key in record:
        if key.startswith("chosen"):
            other = "rejected" + key.removeprefix("chosen")
            if other in record:
                out[key], out[other] = record[other], record[key]
    if "messages" in record:  # ultrafeedback_binarized: `messages` is the chosen conversation
        out["messages"] = out["chosen"]
    return out


def apply_review(records: Iterable[dict[str, Any]], review: dict[str, Any] | None, where: str,
                 prefix: str = "") -> tuple[list[dict[str, Any]], dict[str, str], dict[str, str]]:
    """(the records dpo trains on: swapped pairs exchanged, dropped ones out; {prefix + pair_id: why dropped};
    {pair_id: verdict} of every reviewed pair). A review that timed out changes nothing."""
    records = list(records)
    if review is None or review["status"] != "answered":
        return records, {}, {}
    by_id = {i["pair_id"]: i for i in review["items"]}
    unknown = sorted(by_id.keys() - {r.get("pair_id") for r in records})
    if unknown:
        raise ReviewError(f"{where}: the review names {len(unknown)} pair(s) feedback does not hold (first: "
                          f"{unknown[0]}); review the current pairs again with `distill review`")
    kept, dropped, applied = [], {}, {}
    for record in records:
        item = by_id.get(record.get("pair_id"))
        if item is not None:
            applied[record["pair_id"]] = item["verdict"]
        if item is not None and item["verdict"] == "drop":
            note = f": {item['note']}" if item.get("note") else ""
            dropped[prefix + record["pair_id"]] = f"dpo: dropped in review (pair {item['number']}){note}"
            continue
        kept.append(swapped(record) if item is not None and item["verdict"] == "swap" else record)
    return kept, dropped, applied
