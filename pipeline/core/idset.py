"""A compact set of item ids for done-sets and ledgers that grow with the input: 16 bytes an id.

A Python set of 64-character hex ids costs about ten times that (the string and its hash slot), which at a few
hundred thousand finished items is a sizeable share of a stage's memory spent on knowing what to skip. Here an
id is a 128-bit BLAKE2b digest in sorted numpy arrays; two ids collide with probability ~1e-27 at a million.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable

import numpy as np

DIGEST = np.dtype("S16")
_MIN_PENDING = 4096


def digest(item_id: str) -> bytes:
    """The 16-byte key an id is held under."""
    return hashlib.blake2b(item_id.encode("utf-8"), digest_size=16).digest()


class IdSet:
    """Membership of string ids. Adds go to a small Python set that is merged into the sorted array once it
    holds an eighth of it (amortised O(log n) an add); lookups are a binary search plus a set probe."""

    def __init__(self, ids: Iterable[str] = ()):
        self._sorted = np.empty(0, dtype=DIGEST)
        self._pending: set[bytes] = set()
        self.update(ids)

    def add(self, item_id: str) -> None:
        self._add_digest(digest(item_id))

    def add_new(self, item_id: str) -> bool:
        """Add the id; False if it was there already (one digest for both the test and the add)."""
        key = digest(item_id)
        if self._has(key):
            return False
        self._add_digest(key)
        return True

    def update(self, ids: Iterable[str]) -> None:
        for item_id in ids:
            self._add_digest(digest(item_id))

    def _add_digest(self, key: bytes) -> None:
        self._pending.add(key)
        if len(self._pending) >= max(_MIN_PENDING, len(self._sorted) // 8):
            self._merge()

    def _merge(self) -> None:
        if self._pending:
            fresh = np.array(sorted(self._pending), dtype=DIGEST)
            at = np.searchsorted(self._sorted, fresh)
            known = at < len(self._sorted)
            known[known] = self._sorted[at[known]] == fresh[known]
            # one new array of the merged size (union1d would take three or four copies of the set)
            self._sorted = np.insert(self._sorted, at[~known], fresh[~known])
            self._pending = set()

    def _has(self, key: bytes) -> bool:
        if key in self._pending:
            return True
        pos = int(np.searchsorted(self._sorted, key))
        # an S16 element reads back without its trailing NUL bytes: compare the key stripped the same way
        return pos < len(self._sorted) and self._sorted[pos] == key.rstrip(b"\0")

    def __contains__(self, item_id: object) -> bool:
        return isinstance(item_id, str) and self._has(digest(item_id))

    def __len__(self) -> int:
        self._merge()
        return len(self._sorted)

    def __or__(self, other: IdSet) -> IdSet:
        self._merge()
        other._merge()
        out = IdSet()
        out._sorted = np.union1d(self._sorted, other._sorted)
        return out

    def nbytes(self) -> int:
        """Memory held by the digests (what the set costs, for tests and benchmarks)."""
        return self._sorted.nbytes + 80 * len(self._pending)
