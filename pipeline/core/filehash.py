"""Content hashes of the files a stage reads, so a fingerprint changes when a file's content does.

Files are hashed in 1 MiB blocks (never read whole) and remembered by (path, size, mtime, inode), in this
process and in a small SQLite file shared by processes, so an unchanged multi-GB dataset is hashed once.
"""

from __future__ import annotations

import hashlib
import logging
import os
import sqlite3
from contextlib import closing
from pathlib import Path

from pipeline.core import environment

log = logging.getLogger(__name__)
_BLOCK = 1 << 20
_MEMO: dict[tuple[str, int, int, int], str] = {}


def content_hash(path: str | os.PathLike[str]) -> str:
    """sha256 of a file's bytes, of a directory's files (relative names and contents), or a remote file's."""
    text = str(path)
    if "://" in text:
        return _remote_hash(text)
    p = Path(text)
    if p.is_dir():
        digest = hashlib.sha256()
        for f in sorted(q for q in p.rglob("*") if q.is_file()):
            digest.update(f.relative_to(p).as_posix().encode() + b"\0" + _file_hash(f).encode() + b"\0")
        return digest.hexdigest()
    return _file_hash(p)


def contents_hash(paths: list[str]) -> dict[str, str]:
    """{path: content hash} for the paths a stage reads, in a stable order."""
    return {p: content_hash(p) for p in sorted(set(paths))}


def _file_hash(p: Path) -> str:
    st = p.stat()
    key = (str(p.resolve()), st.st_size, st.st_mtime_ns, st.st_ino)
    if key in _MEMO:
        return _MEMO[key]
    found = _Cache.get(key)
    if found is None:
        digest = hashlib.sha256()
        with p.open("rb") as fh:
            while block := fh.read(_BLOCK):
                digest.update(block)
        found = digest.hexdigest()
        _Cache.put(key, found)
    _MEMO[key] = found
    return found


def _remote_hash(url: str) -> str:
    """Object stores publish a content checksum (S3 ETag, GCS md5); else the bytes are streamed."""
    import fsspec

    fs, path = fsspec.core.url_to_fs(url)
    info = fs.info(path)
    for field in ("ETag", "etag", "md5Hash", "md5", "checksum"):
        if info.get(field):
            return f"{field}:{str(info[field]).strip(chr(34))}"
    digest = hashlib.sha256()
    with fs.open(path, "rb") as fh:
        while block := fh.read(_BLOCK):
            digest.update(block)
    return digest.hexdigest()


class _Cache:
    """The shared (path, size, mtime, inode) -> hash table; any trouble with it only costs a re-hash."""

    @staticmethod
    def _connect() -> sqlite3.Connection:
        base = environment.cache_root()
        base.mkdir(parents=True, exist_ok=True)
        db = sqlite3.connect(base / "content-hashes.sqlite", timeout=5, isolation_level=None)
        db.execute("CREATE TABLE IF NOT EXISTS hashes (path TEXT, size INTEGER, mtime_ns INTEGER, inode INTEGER, "
                   "sha256 TEXT, PRIMARY KEY (path, size, mtime_ns, inode))")
        return db

    @classmethod
    def get(cls, key: tuple[str, int, int, int]) -> str | None:
        try:
            with closing(cls._connect()) as db:
                row = db.execute("SELECT sha256 FROM hashes WHERE path=? AND size=? AND mtime_ns=? AND inode=?",
                                 key).fetchone()
            return row[0] if row else None
        except (OSError, sqlite3.Error) as exc:
            log.debug("content-hash cache unavailable (%s); hashing", exc)
            return None

    @classmethod
    def put(cls, key: tuple[str, int, int, int], value: str) -> None:
        try:
            with closing(cls._connect()) as db:
                db.execute("DELETE FROM hashes WHERE path=?", key[:1])  # one row per path: the cache stays small
                db.execute("INSERT OR REPLACE INTO hashes VALUES (?, ?, ?, ?, ?)", (*key, value))
        except (OSError, sqlite3.Error) as exc:
            log.debug("content-hash cache not written (%s)", exc)
