"""Whole-dialogue duplicates: after all dialogues are simulated, exact and near copies (MinHash over word
shingles of every turn) are removed, keeping the one whose prompt comes first in the stage's input order.

Deciding after the fact, in input order, gives the same data whatever order the teacher answered in. The
dropped ledger is written before the shards are rewritten (each atomically): a run killed in between
repeats the same decisions when it resumes. Dialogues are read a shard at a time and shingled in whatever order
they come; their signatures wait in a scratch file, sorted there into input order, so memory holds neither
the dialogues nor the index (see `neardup`), only the duplicates found.
"""

from __future__ import annotations

import io
import logging
from collections.abc import Iterable
from typing import Protocol

import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.core.scratch import Scratch
from pipeline.core.store import RunStore
from pipeline.stages.generate.neardup import NearDuplicateIndex

log = logging.getLogger(__name__)
SHINGLE = 5  # words: dialogues are long, 3-word shingles would tie unrelated ones through stock phrases


def dialogue_text(messages: list[dict[str, str]]) -> str:
    return "\n".join(f"{m['role']}: {m['content']}" for m in messages)


ORDER_SCHEMA = (
    "CREATE TABLE dialogues (rank INTEGER NOT NULL, prompt_id TEXT NOT NULL, sha TEXT NOT NULL, norm BLOB NOT NULL, "
    "sig BLOB NOT NULL)",
    "CREATE TABLE kept_sha (sha TEXT PRIMARY KEY, prompt_id TEXT NOT NULL) WITHOUT ROWID",
)


class Ranks(Protocol):
    """A prompt's position in the stage's input (a dict, or generate's `PromptList`)."""

    def get(self, prompt_id: str, default: int | None = None) -> int | None: ...
    def __len__(self) -> int: ...


def find_duplicates(records: Iterable[dict], rank: Ranks, threshold: float) -> dict[str, tuple[str, str]]:
    """{prompt_id: (reason, kept prompt_id)} for every dialogue that copies (or nearly copies) an earlier one."""
    with NearDuplicateIndex(threshold, shingle=SHINGLE) as index, Scratch("dialogues", ORDER_SCHEMA) as scratch:
        db, last = scratch.db, len(rank)
        for r in records:
            item = index.shingle_text(dialogue_text(r["messages"]))
            db.execute("INSERT INTO dialogues VALUES (?, ?, ?, ?, ?)", (rank.get(r["prompt_id"], last), r["prompt_id"],
                       r["dialogue_sha"], item.norm, item.sig.tobytes()))
        dups: dict[str, tuple[str, str]] = {}
        # rowid last: records of equal rank and id keep the order they came in, as a stable sort would
        ordered = db.execute("SELECT prompt_id, sha, norm, sig FROM dialogues ORDER BY rank, prompt_id, rowid")
        for pid, sha, norm, sig in ordered:
            if (kept := db.execute("SELECT prompt_id FROM kept_sha WHERE sha = ?", (sha,)).fetchone()) is not None:
                dups[pid] = ("duplicate_dialogue", kept[0])
                continue
            if (near := index.match_or_add_shingled(pid, index.unpack(norm, sig))) is not None:
                dups[pid] = ("near_duplicate_dialogue", near)
                continue
            db.execute("INSERT INTO kept_sha VALUES (?, ?)", (sha, pid))
    return dups


def remove_duplicate_dialogues(store: RunStore, stage: str, rank: Ranks, threshold: float) -> int:
    """Ledger and remove duplicate dialogues from the stage's shards; returns how many were removed."""
    dups = find_duplicates(store.read_records(stage, columns=["prompt_id", "dialogue_sha", "messages"]), rank,
                           threshold)
    if not dups:
        return 0
    ledger = store.ledger(stage, "dropped")
    known = ledger.ids()
    ledger.record_many((pid, f"{reason}: same as {kept}", 1, {"kept": kept})
                       for pid, (reason, kept) in dups.items() if pid not in known)
    for path in store.shard_paths(stage):
        with store.fs.open(path, "rb") as fh:
            table = pq.read_table(fh)
        keep = [pid not in dups for pid in table.column("prompt_id").to_pylist()]
        if all(keep):
            continue
        if not any(keep):
            store.fs.rm(path)
            continue
        sink = io.BytesIO()
        pq.write_table(table.filter(pa.array(keep)), sink)
        store.write_bytes(path, sink.getvalue())
    log.info("generate: removed %d duplicate dialogues", len(dups))
    return len(dups)
