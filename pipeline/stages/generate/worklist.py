"""generate's work list: the prompts that passed selection (and those expansion grew), in input order.

Kept in a scratch SQLite file rather than a list, so a 200 000-prompt input costs a bounded page cache; the
stage streams it to the teacher and looks ranks up in it when it orders dialogues for deduplication.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator

from pipeline.core.scratch import Scratch
from pipeline.core.sources import SeedPrompt

SCHEMA = ("CREATE TABLE prompts (rank INTEGER PRIMARY KEY, prompt TEXT NOT NULL, prompt_id TEXT NOT NULL, "
          "source TEXT NOT NULL, root_prompt_id TEXT, parent_prompt_id TEXT, depth INTEGER NOT NULL)",)
_FIELDS = "prompt, prompt_id, source, root_prompt_id, parent_prompt_id, depth"
_CHUNK = 2000


class PromptList:
    """An append-only, ordered list of `SeedPrompt`s on local disk; `get(prompt_id)` gives a prompt's rank."""

    def __init__(self) -> None:
        self._scratch = Scratch("prompts", SCHEMA)
        self._db = self._scratch.db
        self._len = 0
        self._indexed = False

    def extend(self, prompts: Iterable[SeedPrompt]) -> None:
        rows = ((p.prompt, p.prompt_id, p.source, p.root_prompt_id, p.parent_prompt_id, p.depth) for p in prompts)
        self._len += self._db.executemany(f"INSERT INTO prompts ({_FIELDS}) VALUES (?, ?, ?, ?, ?, ?)", rows).rowcount

    def append(self, prompt: SeedPrompt) -> None:
        self.extend([prompt])

    def __len__(self) -> int:
        return self._len

    def __iter__(self) -> Iterator[SeedPrompt]:
        """The prompts in order, read a chunk at a time (by rank, so appends meanwhile are safe)."""
        last = 0
        while True:
            rows = self._db.execute(f"SELECT rank, {_FIELDS} FROM prompts WHERE rank > ? ORDER BY rank LIMIT ?",
                                    (last, _CHUNK)).fetchall()
            if not rows:
                return
            for row in rows:
                yield SeedPrompt(*row[1:])
            last = rows[-1][0]

    def get(self, prompt_id: str, default: int | None = None) -> int | None:
        """The 0-based position of the prompt with this id (the last, if it came twice), or `default`."""
        if not self._indexed:
            self._db.execute("CREATE INDEX prompts_by_id ON prompts (prompt_id, rank)")
            self._indexed = True
        row = self._db.execute("SELECT MAX(rank) FROM prompts WHERE prompt_id = ?", (prompt_id,)).fetchone()
        return default if row[0] is None else row[0] - 1

    def close(self) -> None:
        self._scratch.close()

    def __enter__(self) -> PromptList:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
