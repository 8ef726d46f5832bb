"""The persistent response cache: every successful teacher response, keyed by model and request, committed
together with its charge in the spend ledger (the same SQLite file). On a remote run store the file is on the
worker's disk and a `RemoteMirror` keeps every entry in the store too, so the cache follows the run.

A reply a stage could not use (an unparseable rating or verdict) is marked so: it stays stored and charged,
but `get` no longer answers with it, and `unusable` gives it back to the stage that asks (its next attempt
then differs, so a rerun pays for new requests, never for the same one twice)."""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import sqlite3
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

from pipeline.core.recipe import Recipe
from pipeline.core.store import RunStore
from pipeline.teacher.ledger import Charge, SpendLedger
from pipeline.teacher.messages import ChatRequest, ChatResult
from pipeline.teacher.mirror import RemoteMirror

log = logging.getLogger(__name__)


def cache_key(model: str, request: ChatRequest) -> str:
    blob = json.dumps({"model": model, "messages": request.messages, "params": request.params(),
                       "tag": request.tag}, sort_keys=True, ensure_ascii=False)
    return hashlib.sha256(blob.encode()).hexdigest()


class ResponseCache:
    """SQLite file of successful responses keyed by request; committed as they come, so a kill keeps them.

    WAL with synchronous=NORMAL: a commit survives a killed process (only a machine crash could lose the last
    ones), and costs no fsync. Inside an event loop answers are committed together, `WINDOW_S` after the first
    of them arrived (or at once when `GROUP` wait, and on `flush` and `close`), each in its own savepoint: a
    kill loses at most that window's answers, as it loses the answers still on the wire. Outside a loop each put
    commits at once."""

    GROUP = 256
    WINDOW_S = 0.01

    def __init__(self, path: str | Path, mirror: RemoteMirror | None = None):
        self.path, self.mirror = Path(path), mirror
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._db = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False, timeout=30)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=NORMAL")
        self._db.execute("CREATE TABLE IF NOT EXISTS responses "
                         "(key TEXT PRIMARY KEY, value TEXT NOT NULL, request TEXT)")
        self._db.execute("CREATE TABLE IF NOT EXISTS imported (segment TEXT PRIMARY KEY)")
        columns = {r[1] for r in self._db.execute("PRAGMA table_info(responses)").fetchall()}
        if "unusable" not in columns:  # a cache file from before replies could be marked unusable
            self._db.execute("ALTER TABLE responses ADD COLUMN unusable TEXT")
        self.ledger = SpendLedger(self._db)
        self._pending = 0  # puts since the last commit
        self._commit_timer: asyncio.TimerHandle | None = None
        self._timer_loop: asyncio.AbstractEventLoop | None = None
        self._closed = False
        if mirror is not None:
            self.pull()

    def get(self, key: str) -> ChatResult | None:
        """The stored answer to a request; None when there is none or it was marked unusable."""
        row = self._db.execute("SELECT value FROM responses WHERE key = ? AND unusable IS NULL", (key,)).fetchone()
        return ChatResult(**json.loads(row[0])) if row else None

    def unusable(self, key: str) -> tuple[ChatResult, str] | None:
        """(the stored reply, why it was unusable) when the request's reply was marked unusable."""
        row = self._db.execute("SELECT value, unusable FROM responses WHERE key = ? AND unusable IS NOT NULL",
                               (key,)).fetchone()
        return (ChatResult(**{**json.loads(row[0]), "cached": True}), row[1]) if row else None

    def mark_unusable(self, key: str, why: str) -> bool:
        """Keep the reply (and its charge) but never answer with it again; False if the key holds no reply."""
        changed = self._db.execute("UPDATE responses SET unusable = ? WHERE key = ?", (why or "unusable", key))
        if changed.rowcount and self.mirror is not None:
            self.mirror.add({"key": key, "unusable": why or "unusable", "at": time.time()})
        return bool(changed.rowcount)

    def put(self, key: str, result: ChatResult, request: dict[str, Any] | None = None,
            charge: Charge | None = None) -> bool:
        """Store a response and the charge that paid for it together (one savepoint, committed within `WINDOW_S`);
        False when the charge was recorded before (a batch's output read again), which leaves both as they were."""
        value = json.dumps({"texts": result.texts, "finish_reasons": result.finish_reasons,  # asdict copies deeply
                            "prompt_tokens": result.prompt_tokens, "completion_tokens": result.completion_tokens,
                            "cached": False})
        if not self._db.in_transaction:
            self._db.execute("BEGIN")
        self._db.execute("SAVEPOINT put")
        try:
            if charge is not None and not self.ledger.add(charge):
                self._db.execute("ROLLBACK TO put")
                self._db.execute("RELEASE put")
                self._commit_soon()
                return False
            self._db.execute("INSERT OR REPLACE INTO responses (key, value, request) VALUES (?, ?, ?)",
                             (key, value, json.dumps(request) if request is not None else None))
            self._db.execute("RELEASE put")
        except BaseException:
            if self._db.in_transaction:
                self._db.execute("ROLLBACK TO put")
                self._db.execute("RELEASE put")
            self._commit_soon()
            raise
        self._pending += 1
        self._commit_soon()
        if self.mirror is not None:
            self.mirror.add({"key": key, "value": value, "request": request,
                             "charge": asdict(charge) if charge is not None else None, "at": time.time()})
        return True

    def _commit_soon(self) -> None:
        """Commit within `WINDOW_S` (at once outside an event loop, or when `GROUP` wait)."""
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            loop = None
        if loop is None or self._pending >= self.GROUP:
            self.commit()
        elif self._commit_timer is None or self._timer_loop is not loop:  # (a timer of an ended loop never fires)
            if self._commit_timer is not None:
                self._commit_timer.cancel()
            self._timer_loop = loop
            self._commit_timer = loop.call_later(self.WINDOW_S, self.commit)

    def commit(self) -> None:
        """Commit what was put and not committed yet."""
        if self._commit_timer is not None:
            self._commit_timer.cancel()
            self._commit_timer = None
        if not self._closed and self._db.in_transaction:
            self._db.execute("COMMIT")
        self._pending = 0

    async def flush(self) -> None:
        """Return once every response put so far is committed and, on a remote run store, in the store too."""
        self.commit()
        if self.mirror is not None:
            await self.mirror.flush()

    def pull(self, max_listings: int = 5) -> int:
        """Import the run store's segments this file has not seen (responses and charges other workers paid
        for); the number of entries imported. A segment folded into a newer one between the listing and the
        read is found by listing again, at most `max_listings` times; what is still missing then (other workers
        folding without pause) comes in with the next pull."""
        assert self.mirror is not None
        imported = 0
        for _ in range(max_listings):
            seen = {r[0] for r in self._db.execute("SELECT segment FROM imported").fetchall()}
            missing = False
            for name in self.mirror.segments():
                if name in seen:
                    continue
                entries = self.mirror.read(name)
                if entries is None:
                    missing = True
                    continue
                imported += self._import(name, entries)
            if not missing:
                return imported
        log.warning("response cache: segments of %s kept changing while read; the rest comes with the next pull",
                    self.mirror.folder)
        return imported

    def _import(self, segment: str, entries: list[dict[str, Any]]) -> int:
        self.commit()
        self._db.execute("BEGIN")
        try:
            for e in entries:
                if "value" not in e:  # a mark: the reply it names was unusable
                    self._db.execute("UPDATE responses SET unusable = ? WHERE key = ?", (e["unusable"], e["key"]))
                    continue
                if e.get("charge"):
                    self.ledger.add(Charge(**e["charge"]), at=e.get("at"))
                self._db.execute("INSERT OR IGNORE INTO responses (key, value, request) VALUES (?, ?, ?)",
                                 (e["key"], e["value"], json.dumps(e["request"]) if e["request"] is not None
                                  else None))
            self._db.execute("INSERT OR IGNORE INTO imported (segment) VALUES (?)", (segment,))
            self._db.execute("COMMIT")
        except BaseException:
            self._db.execute("ROLLBACK")
            raise
        return len(entries)

    def requests(self) -> list[dict[str, Any]]:
        """Every cached request (model, messages, params) with a usable reply: what a rerun will not pay for again."""
        rows = self._db.execute("SELECT request FROM responses WHERE request IS NOT NULL AND unusable IS NULL"
                                ).fetchall()
        return [json.loads(r[0]) for r in rows]

    def __len__(self) -> int:
        return self._db.execute("SELECT COUNT(*) FROM responses").fetchone()[0]

    def close(self) -> None:
        try:
            self.commit()
            if self.mirror is not None:
                self.mirror.fold()
        finally:
            self._closed = True
            self._db.close()


def open_cache(store: RunStore, cache_dir: str | None) -> ResponseCache:
    """The run's response cache: the file in the run directory, or on a remote store the worker's local copy,
    brought up to date from the store and mirrored to it."""
    return ResponseCache(cache_path_for(store, cache_dir), None if store.is_local else RemoteMirror(store))


def cache_path(store: RunStore, recipe: Recipe) -> Path:
    """The response cache (and spend ledger) lives in the run directory, or in a local cache dir when the
    store is remote."""
    return cache_path_for(store, recipe.storage.cache_dir)


def cache_path_for(store: RunStore, cache_dir: str | None) -> Path:
    if store.is_local:
        return Path(store.join("cache", "teacher.sqlite"))
    base = Path(cache_dir or Path.home() / ".cache" / "zephyr-distill")
    return base / store.run_name / "teacher.sqlite"
