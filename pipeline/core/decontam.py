"""Decontamination: does a prompt share a word n-gram with any turn of any evaluation item, and which?

One index over every turn of every item of the evaluation files (any shape `pipeline.core.evalsets` reads);
a match names the file, the item, where it sits (line or row) and the n-gram, for the dropped ledger.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.core.evalsets import EvalRow, cached_eval_rows
from pipeline.core.recipe import DecontamConfig

CONTAMINATED = "contaminated"
_WORD = re.compile(r"\w+|[-+*/=<>%^]", re.UNICODE)


def ngram_words(text: str) -> list[str]:
    """Lower-cased words (and arithmetic signs, which tell '3 + 4' from '3 - 4')."""
    return _WORD.findall(text.lower())


@dataclass(frozen=True)
class Match:
    """Where a prompt overlaps an evaluation set."""

    eval_file: str
    eval_item: str  # the item's id (question_id, id, or the sha256 of its prompt)
    where: str  # file and line (or row) of the item
    ngram: str  # the shared words

    @property
    def reason(self) -> str:
        return f'{CONTAMINATED}: {Path(self.eval_file).name} item {self.eval_item} ({self.where}): "{self.ngram}"'

    def detail(self) -> dict[str, str]:
        return asdict(self)


class Decontaminator:
    """A prompt is contaminated when it shares a run of `n` words with an evaluation turn; where either text is
    shorter than `n` words (but has at least `min_words`), when it appears whole inside the other; and always
    when the two are the same words.

    Runs are kept as sorted 64-bit hashes (16 bytes a run with the item index), so an evaluation set of
    millions of words fits in memory; a lookup hashes the prompt's windows: O(prompt length)."""

    def __init__(self, files: Iterable[str], n: int = 13, min_words: int = 5):
        self.n, self.min_words = n, min_words
        self.files = list(files)
        self._items: list[tuple[str, EvalRow]] = []
        self._turns: list[tuple[tuple[str, ...], int]] = []  # every evaluation turn's words, and its item
        self._exact: dict[tuple[str, ...], int] = {}
        self._runs_of: dict[int, _Runs] = {}  # run length -> every run of that length in the evaluation turns
        self._whole: dict[int, dict[tuple[str, ...], int]] = {}  # evaluation turns shorter than n, by length
        for path in self.files:
            for row in cached_eval_rows(path):
                self._items.append((path, row))
                for turn in row.turns:
                    toks = tuple(ngram_words(turn))
                    self._turns.append((toks, len(self._items) - 1))
                    self._exact.setdefault(toks, len(self._items) - 1)
                    if self.min_words <= len(toks) < self.n:
                        self._whole.setdefault(len(toks), {}).setdefault(toks, len(self._items) - 1)
        if self.files:
            self._runs(self.n)

    def _runs(self, size: int) -> _Runs:
        """Every `size`-word run of the evaluation turns (built the first time a prompt of that length asks)."""
        if size not in self._runs_of:
            self._runs_of[size] = _Runs((toks[i:i + size], index) for toks, index in self._turns
                                        for i in range(len(toks) - size + 1))
        return self._runs_of[size]

    def __bool__(self) -> bool:
        return bool(self.files)

    def match(self, text: str) -> Match | None:
        """The evaluation item the text overlaps (its earliest, longest shared run), or None."""
        toks = tuple(ngram_words(text))
        found = self._find(toks)
        if found is None:
            return None
        index, gram = found
        path, row = self._items[index]
        return Match(path, row.item_id, row.where, " ".join(gram))

    def _find(self, toks: tuple[str, ...]) -> tuple[int, tuple[str, ...]] | None:
        if not self.files or not toks:
            return None
        if (index := self._exact.get(toks)) is not None:
            return index, toks
        if len(toks) >= self.n and (hit := self._runs(self.n).first(toks, self.n)) is not None:
            return hit
        for size, table in sorted(self._whole.items(), reverse=True):
            for i in range(len(toks) - size + 1):
                if (index := table.get(toks[i:i + size])) is not None:
                    return index, toks[i:i + size]
        if self.min_words <= len(toks) < self.n and (hit := self._runs(len(toks)).first(toks, len(toks))):
            return hit  # the whole (short) prompt inside a longer evaluation turn
        return None


class _Runs:
    """Word runs as a sorted array of 64-bit hashes beside the item each came from first."""

    def __init__(self, runs: Iterable[tuple[tuple[str, ...], int]]):
        hashes, items = [], []
        for gram, index in runs:
            hashes.append(hash(gram))
            items.append(index)
        h = np.array(hashes, dtype=np.int64)
        order = np.argsort(h, kind="stable")  # stable: of equal runs, the first file and item comes first
        self.hashes, self.items = h[order], np.array(items, dtype=np.int64)[order]

    def first(self, toks: tuple[str, ...], size: int) -> tuple[int, tuple[str, ...]] | None:
        """The earliest window of `toks` that is a run, with its item."""
        if len(toks) < size or not len(self.hashes):
            return None
        keys = np.array([hash(toks[i:i + size]) for i in range(len(toks) - size + 1)], dtype=np.int64)
        pos = np.minimum(np.searchsorted(self.hashes, keys), len(self.hashes) - 1)
        hits = np.flatnonzero(self.hashes[pos] == keys)
        if not len(hits):
            return None
        i = int(hits[0])
        return int(self.items[pos[i]]), toks[i:i + size]


def load_decontaminator(cfg: DecontamConfig) -> Decontaminator:
    """The index of the recipe's evaluation files (empty, and falsy, when it names none)."""
    return Decontaminator(cfg.eval_files, cfg.ngram, cfg.min_words)


def counts_by_file(details: Iterable[dict[str, Any] | None]) -> dict[str, int]:
    """Contaminated items per evaluation file, from the details of dropped-ledger entries."""
    return dict(Counter(d["eval_file"] for d in details if d and "eval_file" in d))
