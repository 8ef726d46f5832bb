"""Text similarity for generate's filters: ROUGE-L between token sequences and MinHash near-duplicates.

ROUGE-L's longest common subsequence comes from rapidfuzz (C++, bit-parallel), not rouge-score's pure-Python
scorer: the filter compares each new instruction with many kept ones. Near-duplicates use datasketch's MinHash LSH.
"""

from __future__ import annotations

from datasketch import MinHash, MinHashLSH
from rapidfuzz.distance import LCSseq

from pipeline.core.decontam import ngram_words


def words(text: str) -> list[str]:
    """Lower-cased word tokens (arithmetic signs kept), the unit of every similarity here."""
    return ngram_words(text)


def rouge_l(a: str | list[str], b: str | list[str]) -> float:
    """ROUGE-L F1 between two texts (or token lists): 2·LCS / (len a + len b)."""
    ta = words(a) if isinstance(a, str) else a
    tb = words(b) if isinstance(b, str) else b
    if not ta or not tb:
        return 0.0
    return 2 * LCSseq.similarity(ta, tb) / (len(ta) + len(tb))


class NearDuplicateIndex:
    """MinHash over word shingles with LSH; `match_or_add` / `seen` say whether a near copy (Jaccard >= threshold
    by the MinHash estimate) or an exact copy (after lower-casing and tokenising) was added before."""

    def __init__(self, threshold: float = 0.9, num_perm: int = 128, shingle: int = 3):
        self.threshold, self.shingle, self.num_perm = threshold, shingle, num_perm
        self._lsh = MinHashLSH(threshold=threshold, num_perm=num_perm)
        template = MinHash(num_perm=num_perm, seed=1)
        self._perm, self._scheme = template.permutations, template.scheme
        self._sigs: dict[str, MinHash] = {}
        self._exact: dict[str, str] = {}

    def _signature(self, toks: list[str]) -> MinHash:
        size = max(1, len(toks) - self.shingle + 1)
        grams = {" ".join(toks[i:i + self.shingle]).encode() for i in range(size)}
        sig = MinHash(num_perm=self.num_perm, permutations=self._perm, scheme=self._scheme)
        sig.update_batch(sorted(grams))
        return sig

    def match_or_add(self, key: str, text: str) -> str | None:
        """The key of an added text this one nearly duplicates; if there is none, this text is added under
        `key` (its words and signature computed once)."""
        toks = words(text)
        norm = " ".join(toks)
        if norm in self._exact:
            return self._exact[norm]
        sig = self._signature(toks)
        for found in sorted(self._lsh.query(sig)):  # sorted: the same answer whatever the bucket order
            if sig.jaccard(self._sigs[found]) >= self.threshold:
                return found
        self._exact[norm] = key
        if key not in self._sigs:
            self._sigs[key] = sig
            self._lsh.insert(key, sig)
        return None

    def seen(self, text: str, key: str | None = None) -> bool:
        """Whether a near copy was added before; if not, this text is added (under `key`, default its index)."""
        return self.match_or_add(key if key is not None else str(len(self._sigs)), text) is not None
