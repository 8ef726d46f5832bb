"""Text similarity for filters: ROUGE-L (self-instruct), MinHash near-duplicates, n-gram contamination."""

from __future__ import annotations

import hashlib
import re
from collections.abc import Iterable

import numpy as np

_PRIME = np.uint64(4294967311)  # the first prime above 2**32
_WORD = re.compile(r"\w+|[-+*/=<>%^]", re.UNICODE)


def words(text: str) -> list[str]:
    return _WORD.findall(text.lower())


def _lcs(a: list[str], b: list[str]) -> int:
    if len(a) < len(b):
        a, b = b, a
    prev = [0] * (len(b) + 1)
    for x in a:
        cur = [0]
        for j, y in enumerate(b, 1):
            cur.append(prev[j - 1] + 1 if x == y else max(prev[j], cur[j - 1]))
        prev = cur
    return prev[-1]


def rouge_l(a: str | list[str], b: str | list[str]) -> float:
    """ROUGE-L F1 between two texts over lower-cased word tokens."""
    ta = words(a) if isinstance(a, str) else a
    tb = words(b) if isinstance(b, str) else b
    if not ta or not tb:
        return 0.0
    lcs = _lcs(ta, tb)
    if lcs == 0:
        return 0.0
    p, r = lcs / len(tb), lcs / len(ta)
    return 2 * p * r / (p + r)


class NearDuplicateIndex:
    """MinHash over word 3-shingles with LSH banding; `seen(text)` says whether a near copy was added."""

    def __init__(self, threshold: float = 0.9, num_perm: int = 64, shingle: int = 3):
        self.threshold, self.shingle, self.num_perm = threshold, shingle, num_perm
        self.bands = max(1, min(num_perm, round(num_perm * (1 - threshold)) or 1))
        self.rows = num_perm // self.bands
        self._buckets: list[dict[tuple[int, ...], list[int]]] = [{} for _ in range(self.bands)]
        self._sigs: list[tuple[int, ...]] = []
        self._exact: set[str] = set()
        rng = np.random.default_rng(0)
        self._a = rng.integers(1, 2**32 - 1, size=num_perm, dtype=np.uint64)
        self._b = rng.integers(0, 2**32 - 1, size=num_perm, dtype=np.uint64)

    def _signature(self, text: str) -> tuple[int, ...]:
        toks = words(text)
        grams = {" ".join(toks[i:i + self.shingle]) for i in range(max(1, len(toks) - self.shingle + 1))}
        hashes = np.fromiter((int.from_bytes(hashlib.blake2b(g.encode(), digest_size=4).digest(), "little")
                              for g in grams), dtype=np.uint64, count=len(grams))
        # universal hashing (a*h + b) mod p, one (a, b) per permutation; all products fit in 64 bits
        return tuple((((self._a[:, None] * hashes[None, :]) + self._b[:, None]) % _PRIME).min(axis=1).tolist())

    def seen(self, text: str, add: bool = True) -> bool:
        norm = " ".join(words(text))
        if norm in self._exact:
            return True
        sig = self._signature(text)
        candidates: set[int] = set()
        for band in range(self.bands):
            key = sig[band * self.rows:(band + 1) * self.rows]
            candidates.update(self._buckets[band].get(key, ()))
        for idx in candidates:
            other = self._sigs[idx]
            if sum(x == y for x, y in zip(sig, other, strict=True)) / self.num_perm >= self.threshold:
                return True
        if add:
            self._exact.add(norm)
            idx = len(self._sigs)
            self._sigs.append(sig)
            for band in range(self.bands):
                self._buckets[band].setdefault(sig[band * self.rows:(band + 1) * self.rows], []).append(idx)
        return False


class NgramIndex:
    """Word n-grams of evaluation texts; a prompt sharing any n-gram with them counts as contaminated."""

    def __init__(self, texts: Iterable[str], n: int):
        self.n = n
        self.grams: set[tuple[str, ...]] = set()
        self.short: set[tuple[str, ...]] = set()  # texts shorter than n words are matched whole
        for text in texts:
            toks = words(text)
            if len(toks) < n:
                self.short.add(tuple(toks))
            else:
                self.grams.update(tuple(toks[i:i + n]) for i in range(len(toks) - n + 1))

    def contaminated(self, text: str) -> bool:
        toks = words(text)
        if tuple(toks) in self.short:
            return True
        return any(tuple(toks[i:i + self.n]) in self.grams for i in range(len(toks) - self.n + 1))
