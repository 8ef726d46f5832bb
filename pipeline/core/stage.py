"""The shape every stage shares: its report, how item outcomes are streamed and ledgered, how it concludes."""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from typing import Any, TypeVar

from pipeline.core.store import FailureLedger
from pipeline.core.work import stream_map

T = TypeVar("T")
R = TypeVar("R")


@dataclass
class StageReport:
    """What a stage hands back: counts, cost and where its outputs are."""

    stage: str
    status: str = "completed"
    counts: dict[str, int] = field(default_factory=dict)
    cost: dict[str, float] = field(default_factory=dict)
    outputs: dict[str, str] = field(default_factory=dict)
    message: str = ""
    skipped: bool = False


class ItemFailed(Exception):
    """One item failed for good (after its retries or re-asks): it goes to the failure ledger with the reason."""

    def __init__(self, reason: str, attempts: int = 1):
        super().__init__(reason)
        self.reason, self.attempts = reason, attempts


class ItemDropped(Exception):
    """One item removed on purpose by a filter (not a failure): it goes to the dropped ledger with the reason."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


class StageStopped(RuntimeError):
    """Nothing more can start (a budget cap, a refused key): work in flight finishes, everything is saved."""


class ItemStream:
    """Runs a coroutine per item with bounded concurrency and sorts the outcomes: successes are yielded,
    failures and drops are ledgered under the item's id, a stop lets what is in flight finish and starts nothing."""

    def __init__(self, failures: FailureLedger, item_id: Callable[[Any], str], dropped: FailureLedger | None = None,
                 progress: Any = None, reason_prefix: str | Callable[[Any], str] = ""):
        self.failures, self.dropped, self.item_id, self.progress = failures, dropped, item_id, progress
        self._prefix = reason_prefix if callable(reason_prefix) else (lambda _item: reason_prefix)
        self.stopped = ""  # why the stream stopped early, once it has

    async def results(self, items: Iterable[T], fn: Callable[[T], Awaitable[R]],
                      concurrency: int) -> AsyncIterator[tuple[T, R]]:
        async for item, result in stream_map(items, fn, concurrency, stop=lambda: bool(self.stopped)):
            if self.progress is not None:
                self.progress.update(1)
            if isinstance(result, StageStopped):
                self.stopped = self.stopped or str(result)
            elif isinstance(result, ItemDropped) and self.dropped is not None:
                self.dropped.record(self.item_id(item), result.reason)
            elif isinstance(result, ItemFailed):
                self.failures.record(self.item_id(item), self._prefix(item) + result.reason, result.attempts)
            elif isinstance(result, BaseException):
                self.failures.record(self.item_id(item), f"{self._prefix(item)}{type(result).__name__}: {result}")
            else:
                yield item, result


def conclude(stage: str, *, stop: str, pending: int, failed: int, total: int, max_failure_rate: float,
             ledger: str, saved: str, done: str, retry: str = "rerun to retry them") -> tuple[str, str]:
    """(status, message) of a stage from its accounting: stopped early, items unaccounted for, too many
    failures (with `retry`, what a rerun would do about them), or completed with `done` as its closing line."""
    if stop:
        return "failed", f"stopped early: {stop} ({saved} saved); rerun the same command to continue"
    if pending:
        return "failed", f"{pending} items neither done nor recorded as failed; rerun to resume"
    if failed / max(1, total) > max_failure_rate:
        return "failed", (f"{failed} of {total} items failed (> {stage}.max_failure_rate={max_failure_rate}); "
                          f"see {ledger}; {retry}")
    return "completed", done


# A filter or failure reason that takes more than this share of a stage's items is said in its summary.
LOUD_SHARE = 0.2
DROP_HINTS = {
    "truncated_assistant_turn": "raise generate.max_tokens (the teacher ran out of tokens mid-answer)",
    "contaminated": "check decontamination.eval_files and decontamination.ngram",
}


# reasons whose text carries an aspect, a model or a count: matched by a part of their text
UNPARSED = ("the replies do not parse: set `structured: auto` (or json_schema) on the rater's/judge's endpoint, "
            "or use a model that follows the format (see the ledger for the replies' reasons)")
PART_HINTS = dict.fromkeys(("unusable", "judge output", "verdict"), UNPARSED)


def loud_drops(stage: str, by_reason: dict[str, int], total: int) -> list[str]:
    """One warning per reason that took more than LOUD_SHARE of `total` items, with the setting to change."""
    warnings = []
    for reason, n in sorted(by_reason.items(), key=lambda kv: -kv[1]):
        if total and n / total > LOUD_SHARE:
            hint = DROP_HINTS.get(reason) or next(
                (h for part, h in PART_HINTS.items() if part in reason),
                f"see {stage}'s dropped/failures ledgers for the items and the setting that decides this reason")
            warnings.append(f"WARNING: {reason} took {n} of {total} items ({n / total:.0%}); {hint}")
    return warnings


def reason_kind(reason: str) -> str:
    """A ledger reason without its item-specific detail (what follows ' (' or '; last reply'), for counting."""
    return reason.split(" (", 1)[0].split("; last reply", 1)[0][:80]


def say_loud_drops(stage: str, message: str, reasons: Iterable[str], total: int) -> tuple[str, list[str]]:
    """The stage's message with a warning per reason that took more than LOUD_SHARE of its items, each also
    logged (the Prefect run log and the console); the warnings, for stats.json."""
    warnings = loud_drops(stage, dict(Counter(reason_kind(r) for r in reasons)), total)
    for warning in warnings:
        logging.getLogger("pipeline").warning("%s: %s", stage, warning.removeprefix("WARNING: "))
    return "\n".join([message, *warnings]), warnings
