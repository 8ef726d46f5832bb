"""The answers feedback rates, by prompt: read once from the completion shards into a scratch SQLite file, so
the stage looks up one prompt's answers at a time instead of holding every answer's text in memory."""

from __future__ import annotations

from typing import Any

import pyarrow.parquet as pq

from pipeline.core.scratch import Scratch
from pipeline.core.store import RunStore

SCHEMA = ("CREATE TABLE answers (prompt_id TEXT NOT NULL, model_rank INTEGER NOT NULL, model TEXT NOT NULL, "
          "sample_index INTEGER NOT NULL, completion_id TEXT NOT NULL, completion TEXT NOT NULL)",)
COLUMNS = ["completion_id", "prompt_id", "model", "completion", "sample_index"]


class AnswerBook:
    """Completions grouped by prompt, each prompt's in pool order (`order`, then by name) and sample index."""

    def __init__(self) -> None:
        self._scratch = Scratch("answers", SCHEMA)
        self._db = self._scratch.db
        self._count = 0

    def load(self, store: RunStore, stage: str, name: str, order: list[str]) -> AnswerBook:
        """Add the completions of `<stage>/<name>-*.parquet`, a shard at a time."""
        rank = {m: i for i, m in enumerate(order)}
        for path in store.shard_paths(stage, name):
            rows = [(r["prompt_id"], rank.get(r["model"], len(rank)), r["model"], r["sample_index"],
                     r["completion_id"], r["completion"]) for r in _read(store, path)]
            self._count += self._db.executemany("INSERT INTO answers VALUES (?, ?, ?, ?, ?, ?)", rows).rowcount
        self._db.execute("CREATE INDEX IF NOT EXISTS answers_by_prompt ON answers (prompt_id)")
        return self

    def get(self, prompt_id: str) -> list[dict[str, Any]]:
        """One prompt's answers, in order; [] when it has none."""
        rows = self._db.execute("SELECT model, sample_index, completion_id, completion FROM answers "
                                "WHERE prompt_id = ? ORDER BY model_rank, model, sample_index", (prompt_id,))
        return [{"model": m, "sample_index": i, "completion_id": c, "completion": text} for m, i, c, text in rows]

    def __len__(self) -> int:
        return self._count

    def close(self) -> None:
        self._scratch.close()

    def __enter__(self) -> AnswerBook:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _read(store: RunStore, path: str) -> list[dict[str, Any]]:
    with store.fs.open(path, "rb") as fh:
        return pq.read_table(fh, columns=COLUMNS).to_pylist()
