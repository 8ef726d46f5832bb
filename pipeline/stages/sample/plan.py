"""sample's plan: every answer to produce (a prompt, the pool model that answers it, its principle), drawn once per
run and kept in a scratch SQLite file, so that the stage streams its input and each model's share of the work
instead of holding k assignments per prompt in memory."""

from __future__ import annotations

import itertools
from collections import Counter
from collections.abc import Container, Iterable, Iterator

from pipeline.backends.answers import Assignment
from pipeline.core.scratch import Scratch
from pipeline.core.sources import SeedPrompt

SCHEMA = ("CREATE TABLE plan (rank INTEGER PRIMARY KEY, model TEXT NOT NULL, prompt TEXT NOT NULL, "
          "prompt_id TEXT NOT NULL, source TEXT NOT NULL, principle TEXT NOT NULL, completion_id TEXT NOT NULL)",)
_CHUNK = 2000


class Plan:
    """The assignments in plan order (prompt by prompt, each prompt's models in pool order)."""

    def __init__(self, seed: int) -> None:
        self.seed = seed
        self._scratch = Scratch("sample-plan", SCHEMA)
        self._db = self._scratch.db
        self.prompts = 0  # prompts planned (each has k assignments)
        self.by_model: Counter[str] = Counter()
        self._indexed = False

    def add(self, assignments: Iterable[Assignment]) -> None:
        rows = [(a.model, a.prompt.prompt, a.prompt.prompt_id, a.prompt.source, a.principle, a.completion_id)
                for a in assignments]
        self._db.executemany("INSERT INTO plan (model, prompt, prompt_id, source, principle, completion_id) "
                             "VALUES (?, ?, ?, ?, ?, ?)", rows)
        self.by_model.update(r[0] for r in rows)

    def __len__(self) -> int:
        return sum(self.by_model.values())

    def assignments(self, model: str | None = None, skip: Container[str] = ()) -> Iterator[Assignment]:
        """The assignments (of one model, or all) whose completion id is not in `skip`, in plan order, read a
        chunk at a time."""
        if model is not None and not self._indexed:
            self._db.execute("CREATE INDEX plan_by_model ON plan (model, rank)")
            self._indexed = True
        where, args = ("model = ? AND ", [model]) if model is not None else ("", [])
        last = 0
        while rows := self._db.execute(
                f"SELECT rank, model, prompt, prompt_id, source, principle, completion_id FROM plan "
                f"WHERE {where}rank > ? ORDER BY rank LIMIT ?", [*args, last, _CHUNK]).fetchall():
            for _, name, prompt, prompt_id, source, principle, cid in rows:
                if cid not in skip:
                    yield Assignment(SeedPrompt(prompt, prompt_id, source), name, principle, 0, self.seed)
            last = rows[-1][0]

    def answers_per_prompt(self, answered: Container[str]) -> Counter[int]:
        """How many prompts got 1, 2, ... of their answers (those with none are not counted); a prompt's
        assignments are next to each other in plan order, so one pass holds one prompt's."""
        counts: Counter[int] = Counter()
        for _, group in itertools.groupby(self.assignments(), key=lambda a: a.prompt.prompt_id):
            if n := sum(a.completion_id in answered for a in group):
                counts[n] += 1
        return counts

    def close(self) -> None:
        self._scratch.close()

    def __enter__(self) -> Plan:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
