"""Whole-dialogue duplicates: after all dialogues are simulated, exact and near copies (MinHash over word
shingles of every turn) are removed, keeping the one whose prompt comes first in the stage's input order.

Deciding after the fact, in input order, gives the same data whatever order the teacher answered in. The
dropped ledger is written before the shards are rewritten (each atomically): a run killed in between
repeats the same decisions when it resumes.
"""

from __future__ import annotations

import io
import logging

import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.core.store import RunStore
from pipeline.stages.generate.textsim import NearDuplicateIndex

log = logging.getLogger(__name__)
SHINGLE = 5  # words: dialogues are long, 3-word shingles would tie unrelated ones through stock phrases


def dialogue_text(messages: list[dict[str, str]]) -> str:
    return "\n".join(f"{m['role']}: {m['content']}" for m in messages)


def find_duplicates(records: list[dict], rank: dict[str, int], threshold: float) -> dict[str, tuple[str, str]]:
    """{prompt_id: (reason, kept prompt_id)} for every dialogue that copies (or nearly copies) an earlier one."""
    index = NearDuplicateIndex(threshold, shingle=SHINGLE)
    seen_sha: dict[str, str] = {}
    dups: dict[str, tuple[str, str]] = {}
    for r in sorted(records, key=lambda r: (rank.get(r["prompt_id"], len(rank)), r["prompt_id"])):
        pid, sha = r["prompt_id"], r["dialogue_sha"]
        if sha in seen_sha:
            dups[pid] = ("duplicate_dialogue", seen_sha[sha])
            continue
        if (near := index.match_or_add(pid, dialogue_text(r["messages"]))) is not None:
            dups[pid] = ("near_duplicate_dialogue", near)
            continue
        seen_sha[sha] = pid
    return dups


def remove_duplicate_dialogues(store: RunStore, stage: str, rank: dict[str, int], threshold: float) -> int:
    """Ledger and remove duplicate dialogues from the stage's shards; returns how many were removed."""
    records = list(store.read_records(stage, columns=["prompt_id", "dialogue_sha", "messages"]))
    dups = find_duplicates(records, rank, threshold)
    if not dups:
        return 0
    ledger = store.ledger(stage, "dropped")
    known = {e.item_id for e in ledger.entries()}
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
