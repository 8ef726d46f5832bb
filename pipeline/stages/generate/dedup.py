"""Whole-dialogue duplicates: after all dialogues are simulated, exact and near copies (MinHash over word
shingles of every turn) are removed, keeping the one whose prompt comes first in the stage's input order.

Deciding after the fact, in input order, gives the same data whatever order the teacher answered in. The
dropped ledger is written before the shards are rewritten (each atomically): a run killed in between
repeats the same decisions when it resumes. Dialogues are shingled as they are written (those of an earlier,
killed attempt are read from its shards at the end); their signatures wait in a scratch file, sorted there into
input order, so memory holds neither the dialogues nor the index (see `neardup`), only the duplicates found.
"""

from __future__ import annotations

import io
import logging
from collections.abc import Iterable
from typing import Protocol

import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.core.idset import IdSet
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


class DialogueDedup:
    """Finds the duplicate dialogues of a set given one at a time (`add`), in any order: each is shingled as it
    comes (generate adds each dialogue as it is written, while the teacher still answers others), so the pass
    after the last one only orders and compares."""

    def __init__(self, rank: Ranks, threshold: float):
        self.rank = rank
        self._index = NearDuplicateIndex(threshold, shingle=SHINGLE)
        self._scratch = Scratch("dialogues", ORDER_SCHEMA)
        self._added = IdSet()  # (prompt id, dialogue sha) of every dialogue added

    def add(self, record: dict) -> None:
        """A dialogue (`prompt_id`, `dialogue_sha`, `messages`) of the set; one added twice counts once."""
        if not self._added.add_new(_entry(record)):
            return
        item = self._index.shingle_text(dialogue_text(record["messages"]))
        self._scratch.db.execute("INSERT INTO dialogues VALUES (?, ?, ?, ?, ?)", (
            self.rank.get(record["prompt_id"], len(self.rank)), record["prompt_id"], record["dialogue_sha"],
            item.norm, item.sig.tobytes()))

    def __contains__(self, record: dict) -> bool:
        return _entry(record) in self._added

    def duplicates(self) -> dict[str, tuple[str, str]]:
        """{prompt_id: (reason, kept prompt_id)} for every dialogue that copies (or nearly copies) one whose prompt
        comes earlier in the input; call once, after the last `add`."""
        db, index = self._scratch.db, self._index
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

    def close(self) -> None:
        self._index.close()
        self._scratch.close()

    def __enter__(self) -> DialogueDedup:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _entry(record: dict) -> str:
    return f"{record['prompt_id']}\0{record['dialogue_sha']}"


def find_duplicates(records: Iterable[dict], rank: Ranks, threshold: float) -> dict[str, tuple[str, str]]:
    """{prompt_id: (reason, kept prompt_id)} for every dialogue that copies (or nearly copies) an earlier one."""
    with DialogueDedup(rank, threshold) as dedup:
        for r in records:
            dedup.add(r)
        return dedup.duplicates()


def remove_duplicate_dialogues(store: RunStore, stage: str, rank: Ranks, threshold: float,
                               dedup: DialogueDedup | None = None) -> int:
    """Ledger and remove duplicate dialogues from the stage's shards; returns how many were removed. `dedup`
    holds the dialogues added as they were written; the shards' others (an earlier attempt's) are added here."""
    columns = ["prompt_id", "dialogue_sha", "messages"]
    if dedup is None:
        dups = find_duplicates(store.read_records(stage, columns=columns), rank, threshold)
    else:
        if any(r not in dedup for r in store.read_records(stage, columns=columns[:2])):
            for r in store.read_records(stage, columns=columns):
                dedup.add(r)
        dups = dedup.duplicates()
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
