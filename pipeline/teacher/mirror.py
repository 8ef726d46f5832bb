"""The response cache and spend ledger of a run on a remote store, kept in the store itself.

A run on `s3://` keeps its SQLite cache on the worker's own disk (SQLite cannot live on an object store), so a
stage resumed on another worker would find an empty cache and pay for every answer again. The mirror writes
each paid response, with its ledger charge, to the run store as well: entries are gathered into segment
objects (`cache/segments/<time>-<uuid>.jsonl`), and a request's answer is handed to the stage only after the
segment holding it is stored. A worker opening the run imports the segments it has not seen into its local
cache, so after a kill on one worker the other repeats only the requests that were in flight.

Group commit: a segment holds every entry added while the previous one was being written, so at high
concurrency one PUT carries many answers. A session folds the segments it wrote into one when it closes;
a reader that lists a segment a moment before it is folded lists again and reads the folded one.
"""

from __future__ import annotations

import asyncio
import json
import threading
import time
import uuid
from typing import Any

from pipeline.core.store import RunStore

SEGMENT_DIR = ("cache", "segments")


class RemoteMirror:
    """Cache entries (response + charge) written to the run store in segments."""

    def __init__(self, store: RunStore):
        self.store = store
        self.folder = store.join(*SEGMENT_DIR)
        self._pending: list[dict[str, Any]] = []
        self._added = self._stored = 0
        self._lock: asyncio.Lock | None = None
        self._guard = threading.Lock()  # `add` may come from the event loop's thread or a sync caller
        self.written: list[str] = []  # the segments this mirror wrote (folded into one on close)

    def add(self, entry: dict[str, Any]) -> None:
        """Queue an entry; it is stored by the next `flush`."""
        with self._guard:
            self._pending.append(entry)
            self._added += 1

    async def flush(self) -> None:
        """Return once every entry added before this call is in the store (one PUT for all that wait)."""
        target = self._added
        if self._stored >= target:
            return
        if self._lock is None:
            self._lock = asyncio.Lock()
        async with self._lock:
            if self._stored >= target:  # the segment written while this call waited held its entry
                return
            with self._guard:
                batch, self._pending, upto = self._pending, [], self._added
            await asyncio.to_thread(self._write, batch)
            self._stored = upto

    def flush_sync(self) -> None:
        """`flush` for callers outside an event loop."""
        with self._guard:
            batch, self._pending, upto = self._pending, [], self._added
        if batch:
            self._write(batch)
        self._stored = max(self._stored, upto)

    def _write(self, entries: list[dict[str, Any]]) -> str:
        name = f"{time.time_ns():020d}-{uuid.uuid4().hex[:12]}.jsonl"
        path = f"{self.folder}/{name}"
        self.store.write_bytes(path, "".join(json.dumps(e, ensure_ascii=False) + "\n" for e in entries).encode())
        self.written.append(name)
        return name

    def segments(self) -> list[str]:
        """The names of the segments in the store, oldest first."""
        if not self.store.fs.exists(self.folder):
            return []
        self.store.fs.invalidate_cache(self.folder)
        return sorted(str(p).rstrip("/").rsplit("/", 1)[-1] for p in self.store.fs.ls(self.folder, detail=False))

    def read(self, name: str) -> list[dict[str, Any]] | None:
        """A segment's entries; None when it is gone (folded into another meanwhile)."""
        try:
            raw = self.store.fs.cat_file(f"{self.folder}/{name}")
        except FileNotFoundError:
            return None
        return [json.loads(line) for line in raw.decode().splitlines() if line.strip()]

    def fold(self) -> None:
        """Replace the segments this mirror wrote by one (fewer objects for the next reader to fetch)."""
        self.flush_sync()
        if len(self.written) < 2:
            return
        mine, entries = list(self.written), []
        for name in mine:
            entries += self.read(name) or []
        self.written = []
        self._write(entries)  # the folded segment first, then the parts: a reader never misses an entry
        self.store.fs.rm([f"{self.folder}/{name}" for name in mine])
