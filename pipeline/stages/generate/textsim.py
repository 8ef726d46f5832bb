"""Text similarity for generate's filters: word tokens and ROUGE-L between token sequences.

ROUGE-L's longest common subsequence comes from rapidfuzz (C++, bit-parallel), not rouge-score's pure-Python
scorer: the filter compares each new instruction with many kept ones. Near duplicates are `neardup`'s.
"""

from __future__ import annotations

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
