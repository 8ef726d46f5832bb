"""The spend ledger: one row per paid response (endpoint, stage, role, model, tokens, dollars, live or batch).

It is a table in the response cache's SQLite file and each row is written in the same transaction as the
cached response it paid for, so money is never recorded without its answer nor an answer without its money,
a killed stage's spend is kept, and resetting a stage (`--force`, a changed fingerprint) forgets nothing.
The run's spend is the ledger's sum. Cache hits are free; they are counted per stage, endpoint and role.
Beside the charges it keeps, per stage and endpoint, the concurrency the stage's last run that sent requests
ran at (where `max_concurrency: auto` settled) and the 429/503 answers it got.
"""

from __future__ import annotations

import json
import sqlite3
import time
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

SCHEMA = (
    "CREATE TABLE IF NOT EXISTS spend (charge_id TEXT PRIMARY KEY, at REAL NOT NULL, endpoint TEXT NOT NULL, "
    "stage TEXT NOT NULL, role TEXT NOT NULL, model TEXT NOT NULL, prompt_tokens INTEGER NOT NULL, "
    "completion_tokens INTEGER NOT NULL, usd REAL NOT NULL, mode TEXT NOT NULL, batch_id TEXT)",
    "CREATE TABLE IF NOT EXISTS cache_hits (stage TEXT NOT NULL, endpoint TEXT NOT NULL, role TEXT NOT NULL, "
    "hits INTEGER NOT NULL, PRIMARY KEY (stage, endpoint, role))",
    "CREATE TABLE IF NOT EXISTS concurrency (stage TEXT NOT NULL, endpoint TEXT NOT NULL, at REAL NOT NULL, "
    "summary TEXT NOT NULL, PRIMARY KEY (stage, endpoint))",
    # covers `summary`'s GROUP BY, so `distill status` reads an index in order instead of sorting every row
    "CREATE INDEX IF NOT EXISTS spend_by_stage ON spend (stage, endpoint, mode, prompt_tokens, completion_tokens, usd)",
)


@dataclass(frozen=True)
class Charge:
    """One paid response. `charge_id` is unique: a live response's own id, or `batch id:custom id` for a batch
    line, so reading a batch's output twice never charges it twice."""

    charge_id: str
    endpoint: str
    stage: str
    role: str
    model: str
    prompt_tokens: int
    completion_tokens: int
    usd: float
    mode: str = "live"  # live | batch
    batch_id: str | None = None


class SpendLedger:
    """The ledger's table in an open SQLite connection (the response cache's); the caller owns transactions."""

    def __init__(self, db: sqlite3.Connection):
        self._db = db
        for statement in SCHEMA:
            db.execute(statement)

    @classmethod
    def open(cls, path: str | Path) -> SpendLedger:
        """The ledger of an existing cache file, for reading (status, reports, tests)."""
        db = sqlite3.connect(str(path), isolation_level=None, check_same_thread=False, timeout=30)
        return cls(db)

    def add(self, charge: Charge, at: float | None = None) -> bool:
        """Insert a charge (inside the caller's transaction); False if this charge is recorded already."""
        cur = self._db.execute(
            "INSERT OR IGNORE INTO spend VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (charge.charge_id, time.time() if at is None else at, charge.endpoint, charge.stage, charge.role, charge.model,
             charge.prompt_tokens, charge.completion_tokens, charge.usd, charge.mode, charge.batch_id))
        return cur.rowcount == 1

    def add_hits(self, stage: str, endpoint: str, role: str, hits: int) -> None:
        if hits:
            self._db.execute("INSERT INTO cache_hits VALUES (?, ?, ?, ?) ON CONFLICT (stage, endpoint, role) "
                             "DO UPDATE SET hits = hits + excluded.hits", (stage, endpoint, role, hits))

    def set_concurrency(self, stage: str, endpoint: str, summary: dict[str, Any]) -> None:
        """What a stage's run of an endpoint's client ran at (`TeacherClient.concurrency_summary`); replaces the
        stage's earlier run's."""
        self._db.execute("INSERT OR REPLACE INTO concurrency VALUES (?, ?, ?, ?)",
                         (stage, endpoint, time.time(), json.dumps(summary)))

    def total(self, endpoint: str | None = None) -> float:
        """Dollars paid: the whole run's, or one endpoint's."""
        if endpoint is None:
            row = self._db.execute("SELECT COALESCE(SUM(usd), 0) FROM spend").fetchone()
        else:
            row = self._db.execute("SELECT COALESCE(SUM(usd), 0) FROM spend WHERE endpoint = ?", (endpoint,)).fetchone()
        return float(row[0])

    def totals_by_endpoint(self) -> dict[str, float]:
        rows = self._db.execute("SELECT endpoint, SUM(usd) FROM spend GROUP BY endpoint").fetchall()
        return {name: float(usd) for name, usd in rows}

    def rows(self) -> list[Charge]:
        cols = "charge_id, endpoint, stage, role, model, prompt_tokens, completion_tokens, usd, mode, batch_id"
        return [Charge(*row) for row in self._db.execute(f"SELECT {cols} FROM spend ORDER BY at").fetchall()]

    def summary(self) -> dict[str, Any]:
        """Per stage (and within it per endpoint) and per endpoint: requests, tokens, dollars, cached hits, and
        the concurrency it ran at where recorded."""
        stages: dict[str, dict[str, Any]] = defaultdict(_empty_with_endpoints)
        endpoints: dict[str, dict[str, Any]] = defaultdict(_empty)
        total = _empty()
        for stage, endpoint, mode, n, p, c, usd in self._db.execute(
                "SELECT stage, endpoint, mode, COUNT(*), SUM(prompt_tokens), SUM(completion_tokens), SUM(usd) "
                "FROM spend GROUP BY stage, endpoint, mode").fetchall():
            for bucket in (stages[stage], stages[stage]["endpoints"].setdefault(endpoint, _empty()),
                           endpoints[endpoint], total):
                bucket["requests"] += n
                bucket["batch_requests"] += n if mode == "batch" else 0
                bucket["prompt_tokens"] += p
                bucket["completion_tokens"] += c
                bucket["usd"] += usd
        for stage, endpoint, hits in self._db.execute(
                "SELECT stage, endpoint, SUM(hits) FROM cache_hits GROUP BY stage, endpoint").fetchall():
            for bucket in (stages[stage], stages[stage]["endpoints"].setdefault(endpoint, _empty()),
                           endpoints[endpoint], total):
                bucket["cached"] += hits
        for stage, endpoint, blob in self._db.execute(
                "SELECT stage, endpoint, summary FROM concurrency ORDER BY at").fetchall():
            settled = json.loads(blob)
            stages[stage]["endpoints"].setdefault(endpoint, _empty())["concurrency"] = settled
            endpoints[endpoint]["concurrency"] = {**settled, "stage": stage}  # the latest stage's
        return {"stages": dict(stages), "endpoints": dict(endpoints), "total": total}

    @staticmethod
    def empty_totals() -> dict[str, Any]:
        return _empty()

    def close(self) -> None:
        self._db.close()


def _empty() -> dict[str, Any]:
    return {"requests": 0, "batch_requests": 0, "prompt_tokens": 0, "completion_tokens": 0, "usd": 0.0, "cached": 0}


def _empty_with_endpoints() -> dict[str, Any]:
    return {**_empty(), "endpoints": {}}
