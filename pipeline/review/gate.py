"""What dpo waits for when `feedback.review` is on: a recorded review of every round whose pairs it trains on.
The runner stops before dpo with what to do; dpo's fingerprint holds the reviews' verdicts."""

from __future__ import annotations

from typing import Any

from pipeline.core.recipe import Recipe, ReviewConfig
from pipeline.core.rounds import round_store
from pipeline.core.store import RunStore
from pipeline.review.answers import ReviewPending, read_review, record_review, review_digest
from pipeline.review.form import form_path, form_text, parse_form
from pipeline.review.report import write_report
from pipeline.review.sample import ReviewItem, draw_review


def reviewed_rounds(recipe: Recipe, round_: int) -> list[int]:
    """The rounds whose pairs dpo of round `round_` trains on (dpo.train_on: all reads every round so far)."""
    return list(range(1, round_ + 1)) if recipe.dpo.train_on == "all" and round_ > 1 else [round_]


def review_inputs(recipe: Recipe, store: RunStore | None, round_: int) -> dict[str, str | None] | None:
    """dpo's fingerprint part: {round: digest of its review's verdicts}; None when feedback.review is off. Without
    a store (`distill validate`) the reviews are unknown: None each."""
    if recipe.feedback.review is None:
        return None
    return {str(q): review_digest(read_review(round_store(store, q))) if store is not None else None
            for q in reviewed_rounds(recipe, round_)}


def record_answers(view: RunStore, items: list[ReviewItem], answers: dict[int, tuple[str, str]], by: str,
                   pairs_total: int, where: str) -> dict[str, Any]:
    """Record a round's review (`view` is the round's store) and write its report; the report."""
    return write_report(view, record_review(view, items, answers, by, pairs_total, where))


def record_form(view: RunStore, cfg: ReviewConfig, text: str, origin: str) -> dict[str, Any]:
    """Record a filled-in file form for the round's current draw; errors name the form and the pair."""
    items, total = draw_review(view, cfg)
    return record_answers(view, items, parse_form(text, origin, items), f"file {origin}", total, origin)


def write_form(view: RunStore, cfg: ReviewConfig, path: str | None = None) -> tuple[str, int]:
    """Write the round's form (prefilled with a recorded review's answers) to `path` or the store; (where, pairs)."""
    items, total = draw_review(view, cfg)
    text = form_text(items, view, total, read_review(view))
    if path is None:
        path = form_path(view)
        view.write_bytes(path, text.encode())
    else:
        with open(path, "w", encoding="utf-8") as fh:
            fh.write(text)
    return path, len(items)


def review_command(view: RunStore) -> str:
    return f"distill review {view.url}" + (f" --round {view.round}" if view.round > 1 else "")


def require_review(recipe: Recipe, store: RunStore, round_: int) -> None:
    """Raise ReviewPending, with the form written and what to do, when a round dpo reads has no review yet; a
    round without pairs has nothing to review and is recorded as such."""
    cfg = recipe.feedback.review
    if cfg is None:
        return
    for q in reviewed_rounds(recipe, round_):
        view = round_store(store, q)
        if read_review(view) is not None:
            continue
        items, total = draw_review(view, cfg)
        if not items:
            record_answers(view, [], {}, "nobody: no pairs to review", 0, "feedback")
            continue
        path = form_path(view)
        if not view.fs.exists(path):
            write_form(view, cfg)
        raise ReviewPending(
            f"dpo trains on reviewed pairs (feedback.review) and round {q}'s review is not in yet: fill in the "
            f"form {path} ({len(items)} pairs: set each `answer:` to A, B or drop), record it with "
            f"`{review_command(view)}`, then run the same command again")
