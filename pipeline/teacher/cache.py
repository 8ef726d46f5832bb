"""The persistent response cache: every successful teacher response, keyed by model and request, committed
together with its charge in the spend ledger (the same SQLite file)."""

from __future__ import annotations

import hashlib
import json
import sqlite3
from dataclasses import asdict
from pathlib import Path
from typing import Any

from pipeline.core.recipe import Recipe
from pipeline.core.store import RunStore
from pipeline.teacher.ledger import Charge, SpendLedger
from pipeline.teacher.messages import ChatRequest, ChatResult


def cache_key(model: str, request: ChatRequest) -> str:
    blob = json.dumps({"model": model, "messages": request.messages, "params": request.params(),
                       "tag": request.tag}, sort_keys=True, ensure_ascii=False)
    return hashlib.sha256(blob.encode()).hexdigest()


class ResponseCache:
    """SQLite file of successful responses keyed by request; committed per response, so a kill keeps them.

    WAL with synchronous=NORMAL: a commit survives a killed process (only a machine crash could lose the last
    ones); each commit costs tens of microseconds, not an fsync."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._db = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False, timeout=30)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=NORMAL")
        self._db.execute("CREATE TABLE IF NOT EXISTS responses "
                         "(key TEXT PRIMARY KEY, value TEXT NOT NULL, request TEXT)")
        self.ledger = SpendLedger(self._db)

    def get(self, key: str) -> ChatResult | None:
        row = self._db.execute("SELECT value FROM responses WHERE key = ?", (key,)).fetchone()
        return ChatResult(**json.loads(row[0])) if row else None

    def put(self, key: str, result: ChatResult, request: dict[str, Any] | None = None,
            charge: Charge | None = None) -> bool:
        """Store a response and the charge that paid for it in one transaction; False when the charge was
        recorded before (a batch's output read again), which leaves both as they were."""
        value = json.dumps({**asdict(result), "cached": False})
        self._db.execute("BEGIN")
        try:
            if charge is not None and not self.ledger.add(charge):
                self._db.execute("ROLLBACK")
                return False
            self._db.execute("INSERT OR REPLACE INTO responses (key, value, request) VALUES (?, ?, ?)",
                             (key, value, json.dumps(request) if request is not None else None))
            self._db.execute("COMMIT")
        except BaseException:
            self._db.execute("ROLLBACK")
            raise
        return True

    def requests(self) -> list[dict[str, Any]]:
        """Every cached request (model, messages, params): what a rerun will not pay for again."""
        rows = self._db.execute("SELECT request FROM responses WHERE request IS NOT NULL").fetchall()
        return [json.loads(r[0]) for r in rows]

    def __len__(self) -> int:
        return self._db.execute("SELECT COUNT(*) FROM responses").fetchone()[0]

    def close(self) -> None:
        self._db.close()


def cache_path(store: RunStore, recipe: Recipe) -> Path:
    """The response cache (and spend ledger) lives in the run directory, or in a local cache dir when the
    store is remote."""
    return cache_path_for(store, recipe.storage.cache_dir)


def cache_path_for(store: RunStore, cache_dir: str | None) -> Path:
    if store.is_local:
        return Path(store.join("cache", "teacher.sqlite"))
    base = Path(cache_dir or Path.home() / ".cache" / "zephyr-distill")
    return base / store.run_name / "teacher.sqlite"
