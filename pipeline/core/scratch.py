"""Scratch SQLite files on local disk, for state a stage rebuilds from its input on every run (its work list,
a near-duplicate index): held in a bounded page cache instead of in memory, deleted when closed."""

from __future__ import annotations

import os
import shutil
import sqlite3
import tempfile
from pathlib import Path

# Pages of a scratch file kept in memory; the rest lives in the OS page cache, outside this process.
CACHE_MIB = 2
PREFIX = "distill-scratch-"  # then the scratch's name, the owning process id and mkdtemp's suffix


class Scratch:
    """One SQLite file in its own temporary directory. Nothing in it needs to survive a crash, so it runs with no
    journal and no syncs, inside one transaction (the connection reads its own writes)."""

    def __init__(self, name: str, schema: tuple[str, ...] = (), cache_mib: int = CACHE_MIB):
        sweep_orphans()
        self._dir = tempfile.mkdtemp(prefix=f"{PREFIX}{name}-{os.getpid()}-")
        self.db = sqlite3.connect(Path(self._dir) / f"{name}.sqlite", isolation_level=None,
                                  check_same_thread=False)
        for pragma in ("journal_mode=OFF", "synchronous=OFF", f"cache_size=-{cache_mib * 1024}",
                       "temp_store=FILE", "locking_mode=EXCLUSIVE"):
            self.db.execute(f"PRAGMA {pragma}")
        for statement in schema:
            self.db.execute(statement)
        self.db.execute("BEGIN")

    def close(self) -> None:
        try:
            self.db.close()
        finally:
            shutil.rmtree(self._dir, ignore_errors=True)

    def __enter__(self) -> Scratch:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def sweep_orphans(root: str | None = None) -> None:
    """Remove scratch directories whose process is gone: a killed stage cannot clean up after itself, and at
    200 000 prompts its scratch files take hundreds of megabytes."""
    for path in Path(root or tempfile.gettempdir()).glob(f"{PREFIX}*-*-*"):
        owner = path.name.rsplit("-", 2)[1]
        if not owner.isdigit() or int(owner) == os.getpid():
            continue
        try:
            os.kill(int(owner), 0)
        except ProcessLookupError:
            shutil.rmtree(path, ignore_errors=True)
        except PermissionError:  # alive, another user's
            continue
