"""Item ledgers: `failures.jsonl` (items that did not make it) and `dropped.jsonl` (items a filter removed).

A ledger is appended to, one JSON line an entry, and read as a stream: a stage with a million items neither
rewrites the file per item nor holds it whole to know what is in it. The file is rewritten once, at the end of
a stage, and only when some entry is superseded (an item that failed twice, or failed and then succeeded).
"""

from __future__ import annotations

import json
import os
import time
import uuid
from collections import Counter
from collections.abc import Callable, Container, Iterable, Iterator
from dataclasses import asdict, dataclass, field
from typing import Any, Protocol

from pipeline.core.idset import IdSet


class LedgerStore(Protocol):
    """What a ledger needs of the run store (`pipeline.core.store.RunStore`, which imports this module)."""

    is_local: bool

    def stage_dir(self, stage: str) -> str: ...
    def read_bytes(self, path: str) -> bytes | None: ...
    def write_bytes(self, path: str, data: bytes) -> None: ...


@dataclass
class Failure:
    item_id: str
    stage: str
    reason: str
    attempts: int = 1
    at: float = field(default_factory=time.time)
    detail: dict[str, Any] | None = None  # what a filter matched (e.g. the evaluation file, item and n-gram)


class FailureLedger:
    """`failures.jsonl`: one line per item that did not make it, with the reason and attempt count."""

    def __init__(self, store: LedgerStore, stage: str, name: str = "failures"):
        self.store, self.stage = store, stage
        self.path = f"{store.stage_dir(stage)}/{name}.jsonl"

    def record(self, item_id: str, reason: str, attempts: int = 1, detail: dict[str, Any] | None = None) -> None:
        self.record_many([(item_id, reason, attempts, detail)])

    def record_many(self, entries: Iterable[tuple]) -> None:
        """Append (item_id, reason, attempts[, detail]) entries as whole lines (a killed process leaves at most
        one cut line, which readers skip)."""
        data = "".join(json.dumps(_entry(Failure(e[0], self.stage, e[1], e[2], detail=e[3] if len(e) > 3 else None)))
                       + "\n" for e in entries)
        if not data:
            return
        if self.store.is_local:
            # No fsync: the page cache outlives a killed process; only a machine crash could lose a line.
            with open(self.path, "a+b") as fh:
                end = fh.tell()
                if end:  # a line cut by a kill is closed first, or this append would be glued to it and lost
                    fh.seek(end - 1)
                    data = data if fh.read(1) == b"\n" else "\n" + data
                fh.write(data.encode("utf-8"))
        else:  # object stores cannot append: rewrite the whole ledger
            self.store.write_bytes(self.path, (self.store.read_bytes(self.path) or b"") + data.encode())

    def _lines(self) -> Iterator[bytes]:
        if not self.store.is_local:  # one GET: a writer replacing the object meanwhile gives old or new, whole
            yield from (self.store.read_bytes(self.path) or b"").splitlines()
            return
        try:
            fh = open(self.path, "rb")  # noqa: SIM115 (a generator: closed by the with below)
        except FileNotFoundError:
            return
        with fh:
            yield from fh

    def iter_entries(self) -> Iterator[Failure]:
        """Every entry in file order, read line by line; a line cut short by a crash is skipped."""
        for line in self._lines():
            try:
                yield Failure(**json.loads(line))
            except (json.JSONDecodeError, UnicodeDecodeError, TypeError):
                continue

    def entries(self) -> list[Failure]:
        """All entries; a line cut short by a crash is ignored."""
        return list(self.iter_entries())

    def ids(self) -> IdSet:
        """The ids of every item in the ledger, compactly (for skipping them in a stream of a million items)."""
        return IdSet(item_id for item_id in map(_item_id, self._lines()) if item_id is not None)

    def latest(self) -> dict[str, Failure]:
        """The last failure of each item, with attempts summed over reruns."""
        merged: dict[str, Failure] = {}
        for entry in self.iter_entries():
            prev = merged.get(entry.item_id)
            if prev:
                entry.attempts += prev.attempts
            merged[entry.item_id] = entry
        return merged

    def compact(self, succeeded: Container[str]) -> dict[str, Failure]:
        """Keep one entry per item still failing (items that later succeeded leave the ledger)."""
        self.prune(succeeded)
        return {e.item_id: e for e in self.iter_entries()}

    def prune(self, succeeded: Container[str] = ()) -> bool:
        """Leave one line per item not in `succeeded` (its last reason, attempts summed), in the order items first
        appeared; the file is rewritten only when some line is superseded. Memory: the ids (16 bytes each) and
        the entries of items that appear more than once. True if the file was rewritten."""
        seen, repeated, stale = IdSet(), set(), False
        for item_id in map(_item_id, self._lines()):
            if item_id is None:
                stale = True  # a cut line
                continue
            if not seen.add_new(item_id):
                repeated.add(item_id)
            stale = stale or item_id in succeeded
        if not (stale or repeated):
            return False
        merged = {k: v for k, v in self.latest_of(repeated).items() if k not in succeeded}
        self._rewrite(_pruned_lines(self.iter_entries(), merged, repeated, succeeded))
        return True

    def latest_of(self, item_ids: set[str]) -> dict[str, Failure]:
        """`latest()` for these items only."""
        merged: dict[str, Failure] = {}
        for entry in self.iter_entries():
            if entry.item_id in item_ids:
                if prev := merged.get(entry.item_id):
                    entry.attempts += prev.attempts
                merged[entry.item_id] = entry
        return merged

    def _rewrite(self, lines: Iterator[str]) -> None:
        """Replace the ledger with `lines`, atomically; a local file is written as a stream."""
        if not self.store.is_local:
            self.store.write_bytes(self.path, "".join(lines).encode())
            return
        parent, name = self.path.rsplit("/", 1)
        tmp = f"{parent}/.tmp-{uuid.uuid4().hex}-{name}"
        with open(tmp, "w", encoding="utf-8") as fh:
            fh.writelines(lines)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, self.path)


@dataclass
class LedgerTally:
    """A ledger counted in one pass: its items, by reason kind, and the evaluation files that contaminated ones
    matched (from their `detail`)."""

    items: int = 0
    by_reason: Counter[str] = field(default_factory=Counter)
    by_file: Counter[str] = field(default_factory=Counter)


def tally(ledger: FailureLedger, kind: Callable[[str], str], succeeded: Container[str] = ()) -> LedgerTally:
    """Prune the ledger to one line per item not in `succeeded`, then count it as a stream."""
    ledger.prune(succeeded)
    out = LedgerTally()
    for entry in ledger.iter_entries():
        out.items += 1
        out.by_reason[kind(entry.reason)] += 1
        if entry.detail and "eval_file" in entry.detail:
            out.by_file[entry.detail["eval_file"]] += 1
    return out


def _item_id(line: bytes) -> str | None:
    """A line's item id without building its entry; None for a line cut short."""
    try:
        item_id = json.loads(line)["item_id"]
    except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError):
        return None
    return item_id if isinstance(item_id, str) else None


def _pruned_lines(entries: Iterable[Failure], merged: dict[str, Failure], repeated: set[str],
                  succeeded: Container[str]) -> Iterator[str]:
    """The lines of a pruned ledger: an item seen once as it was, a repeated one merged at its first place."""
    written: set[str] = set()
    for entry in entries:
        if entry.item_id in repeated:
            if entry.item_id in merged and entry.item_id not in written:
                written.add(entry.item_id)
                yield json.dumps(_entry(merged[entry.item_id])) + "\n"
        elif entry.item_id not in succeeded:
            yield json.dumps(_entry(entry)) + "\n"


def _entry(failure: Failure) -> dict[str, Any]:
    """A ledger line; `detail` only where a filter left one."""
    entry = asdict(failure)
    if entry["detail"] is None:
        del entry["detail"]
    return entry
