"""Near duplicates: MinHash over word shingles with LSH banding, the index on local disk.

An LSH index over every prompt (or dialogue) seen grows with the input by nature; held in memory (datasketch's
`MinHashLSH`, a dict of signatures, a dict of texts) it was most of what made generate's memory grow with its
input. Here it is a scratch SQLite file holding each text's signature, its band keys and the hash of its words,
so the memory it takes is SQLite's bounded page cache and 16 bytes a key (to tell a key added twice).
The answers are datasketch's: the same permutations, the same bands (`_optimal_param`, as `MinHashLSH` picks
them), candidates checked by the same Jaccard estimate in key order. A band is keyed by a 64-bit hash of its
values rather than the values: a collision can only add a candidate, which the Jaccard check then judges as
before; an exact copy is confirmed on the 128-bit hash of its words.
"""

from __future__ import annotations

import functools
import hashlib
from dataclasses import dataclass

import numpy as np

from pipeline.core.idset import IdSet
from pipeline.core.scratch import Scratch
from pipeline.stages.generate.textsim import words

SCHEMA = (
    "CREATE TABLE entries (ord INTEGER PRIMARY KEY, key TEXT NOT NULL, norm BLOB NOT NULL, sig BLOB NOT NULL)",
    # 64-bit lookup keys: each entry's band keys, and the key of its words (the exact-copy test)
    "CREATE TABLE lookup (h INTEGER NOT NULL, ord INTEGER NOT NULL, PRIMARY KEY (h, ord)) WITHOUT ROWID",
)
_SALT_EXACT = 0x5DEECE66D


@functools.cache
def _bands_rows(threshold: float, num_perm: int) -> tuple[int, int]:
    """MinHashLSH's (bands, rows) at its default weights: an integration, worth doing once per threshold."""
    from datasketch.lsh import _optimal_param

    return _optimal_param(threshold, num_perm, 0.5, 0.5)


def _fmix32(h: np.ndarray) -> np.ndarray:
    """MurmurHash3's 32-bit finalizer: datasketch's pre-mix of each input hash in its affine32 scheme."""
    h = h ^ (h >> np.uint32(16))
    h = h * np.uint32(0x85EBCA6B)
    h = h ^ (h >> np.uint32(13))
    h = h * np.uint32(0xC2B2AE35)
    return h ^ (h >> np.uint32(16))


@dataclass(frozen=True)
class Shingled:
    """What the index needs of a text, computable in any order: the hash of its words and its MinHash."""

    norm: bytes
    sig: np.ndarray


class NearDuplicateIndex:
    """`match_or_add` / `seen` say whether a near copy (Jaccard >= threshold by the MinHash estimate) or an exact
    copy (after lower-casing and tokenising) was added before."""

    def __init__(self, threshold: float = 0.9, num_perm: int = 128, shingle: int = 3):
        # imported here, not at the top: datasketch.lsh pulls in scipy, 0.4 s of every `distill` command's start
        from datasketch import MinHash

        self._minhash = MinHash
        self.threshold, self.shingle, self.num_perm = threshold, shingle, num_perm
        self._bands, self._rows = _bands_rows(threshold, num_perm)
        self._coef = np.random.default_rng(7).integers(1, 2**63, size=(self._bands, self._rows), dtype=np.uint64) | 1
        self._keys = IdSet()
        template = MinHash(num_perm=num_perm, seed=1)
        self._perm, self._scheme = template.permutations, template.scheme
        self._dtype = template.hashvalues.dtype
        self._scratch = Scratch("neardup", SCHEMA)
        self._db = self._scratch.db
        self._count = 0

    def shingle_text(self, text: str) -> Shingled:
        toks = words(text)
        size = max(1, len(toks) - self.shingle + 1)
        grams = {" ".join(toks[i:i + self.shingle]).encode() for i in range(size)}
        norm = hashlib.blake2b(" ".join(toks).encode(), digest_size=16).digest()
        return Shingled(norm, self._signature(grams))

    def _signature(self, grams: set[bytes]) -> np.ndarray:
        """datasketch's MinHash values of `grams`: its sha1_hash32 of each, pre-mixed and permuted as its default
        scheme (affine32) does; another scheme goes through a `MinHash`."""
        if self._scheme != "affine32":
            sig = self._minhash(num_perm=self.num_perm, permutations=self._perm, scheme=self._scheme)
            sig.update_batch(sorted(grams))
            return sig.hashvalues
        sha1 = hashlib.sha1
        hv = np.frombuffer(b"".join([sha1(g).digest()[:4] for g in grams]), dtype="<u4")
        a, b = self._perm
        with np.errstate(over="ignore"):
            return (_fmix32(hv.astype(np.uint32))[:, None] * a + b).min(axis=0)

    def unpack(self, norm: bytes, sig: bytes) -> Shingled:
        """A `Shingled` from its stored form (`norm`, `sig.tobytes()`)."""
        return Shingled(norm, np.frombuffer(sig, dtype=self._dtype))

    def match_or_add(self, key: str, text: str) -> str | None:
        """The key of an added text this one nearly duplicates; if there is none, this text is added under
        `key` (its words and signature computed once)."""
        return self.match_or_add_shingled(key, self.shingle_text(text))

    def match_or_add_shingled(self, key: str, item: Shingled) -> str | None:
        """`match_or_add` for a text already shingled."""
        exact, bands = self._lookup_keys(item)
        hits = self._db.execute(f"SELECT h, ord FROM lookup WHERE h IN ({','.join('?' * (1 + len(bands)))})",
                                [exact, *bands]).fetchall()
        if hits:  # rare for distinct texts: one query answers most of them
            if (found := self._match(item, exact, hits)) is not None:
                return found
        new_key = self._keys.add_new(key)  # a key added twice keeps its first signature, as MinHashLSH does
        added = self._db.execute("INSERT INTO entries (key, norm, sig) VALUES (?, ?, ?)",
                                 (key, item.norm, item.sig.tobytes() if new_key else b""))
        self._db.executemany("INSERT OR IGNORE INTO lookup VALUES (?, ?)",
                             [(h, added.lastrowid) for h in [exact, *(bands if new_key else [])]])
        self._count += new_key
        return None

    def _match(self, item: Shingled, exact: int, hits: list[tuple[int, int]]) -> str | None:
        """The exact copy among the hits, else the first near copy in key order (the same answer whatever the
        insertion order), else None."""
        ords = sorted({o for _, o in hits})
        rows = {o: (k, n, s) for o, k, n, s in self._db.execute(
            f"SELECT ord, key, norm, sig FROM entries WHERE ord IN ({','.join('?' * len(ords))})", ords)}
        for h, o in hits:
            if h == exact and rows[o][1] == item.norm:
                return rows[o][0]
        candidates = sorted({rows[o][0]: rows[o][2] for h, o in hits if h != exact and rows[o][2]}.items())
        for found, blob in candidates:
            if self._jaccard(item.sig, np.frombuffer(blob, dtype=self._dtype)) >= self.threshold:
                return found
        return None

    def seen(self, text: str, key: str | None = None) -> bool:
        """Whether a near copy was added before; if not, this text is added (under `key`, default its index)."""
        return self.match_or_add(key if key is not None else str(self._count), text) is not None

    def _lookup_keys(self, item: Shingled) -> tuple[int, list[int]]:
        """(the key of the text's words, one key per band): each band's values through a random linear map
        mod 2^64, salted per band (a collision only adds a candidate for the Jaccard check)."""
        rows = item.sig[: self._bands * self._rows].astype(np.uint64).reshape(self._bands, self._rows)
        with np.errstate(over="ignore"):
            keys = (rows * self._coef).sum(axis=1, dtype=np.uint64).view(np.int64)
        return int.from_bytes(item.norm[:8], "little", signed=True) ^ _SALT_EXACT, keys.tolist()

    @staticmethod
    def _jaccard(a: np.ndarray, b: np.ndarray) -> float:
        return float(np.count_nonzero(a == b)) / float(len(a))  # MinHash.jaccard's estimate, to the bit

    def close(self) -> None:
        self._scratch.close()

    def __enter__(self) -> NearDuplicateIndex:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
