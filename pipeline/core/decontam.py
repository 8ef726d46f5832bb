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
    """Every `n`-word sequence of the evaluation turns; a text shorter than `n` words matches where it appears
    whole (if it has at least `min_words` words). Lookups hash the prompt's windows: O(prompt length)."""

    def __init__(self, files: Iterable[str], n: int = 13, min_words: int = 3):
        self.n, self.min_words = n, min_words
        self.files = list(files)
        self._items: list[tuple[str, EvalRow]] = []
        self._grams: dict[int, dict[tuple[str, ...], int]] = {}  # window length -> words -> item index
        for path in self.files:
            for row in cached_eval_rows(path):
                self._add(path, row)

    def _add(self, path: str, row: EvalRow) -> None:
        index = len(self._items)
        self._items.append((path, row))
        for turn in row.turns:
            toks = ngram_words(turn)
            if len(toks) >= self.n:
                table = self._grams.setdefault(self.n, {})
                for i in range(len(toks) - self.n + 1):
                    table.setdefault(tuple(toks[i:i + self.n]), index)
            elif len(toks) >= self.min_words:
                self._grams.setdefault(len(toks), {}).setdefault(tuple(toks), index)

    def __bool__(self) -> bool:
        return bool(self.files)

    def match(self, text: str) -> Match | None:
        """The first evaluation item the text overlaps (earliest window, longest first), or None."""
        toks = ngram_words(text)
        for size in sorted(self._grams, reverse=True):
            table = self._grams[size]
            for i in range(len(toks) - size + 1):
                gram = tuple(toks[i:i + size])
                if (index := table.get(gram)) is not None:
                    path, row = self._items[index]
                    return Match(path, row.item_id, row.where, " ".join(gram))
        return None


def load_decontaminator(cfg: DecontamConfig) -> Decontaminator:
    """The index of the recipe's evaluation files (empty, and falsy, when it names none)."""
    return Decontaminator(cfg.eval_files, cfg.ngram, cfg.min_words)


def counts_by_file(details: Iterable[dict[str, Any] | None]) -> dict[str, int]:
    """Contaminated items per evaluation file, from the details of dropped-ledger entries."""
    return dict(Counter(d["eval_file"] for d in details if d and "eval_file" in d))
