"""A small task plugin of the tests' own (not arithmetic): capitals of countries, with a ground-truth checker."""

from __future__ import annotations

import random
from collections.abc import Mapping
from typing import Any

from pipeline.core.task import Task

CAPITALS = {"France": "Paris", "Italy": "Rome", "Spain": "Madrid", "Japan": "Tokyo", "Egypt": "Cairo",
            "Peru": "Lima", "Kenya": "Nairobi", "Norway": "Oslo"}
TRAIN = ("What is the capital of {c}?", "Name the capital city of {c}.")
HELDOUT = ("Which city is the capital of {c}?", "Tell me the capital of {c}.", "{c} has which capital?")


def check_capital(item: Mapping[str, Any], answer: str) -> bool:
    """Right when the answer names the item's capital (an `evaluate.checker` for any file with an `answer`)."""
    return item["answer"].lower() in answer.lower()


class CapitalsTask(Task):
    name = "capitals"

    def prompts(self, count: int, seed: int) -> list[str]:
        pool = [t.format(c=c) for c in CAPITALS for t in TRAIN]
        return random.Random(seed).sample(pool, min(count, len(pool)))

    def heldout(self, count: int, seed: int) -> list[dict[str, Any]]:
        rows = [{"category": "geography", "turns": [t.format(c=c)], "answer": capital}
                for c, capital in CAPITALS.items() for t in HELDOUT]
        return rows[:count]

    def check(self, item: Mapping[str, Any], answer: str) -> bool:
        return check_capital(item, answer)

    def corpus(self, size: int, seed: int) -> list[str]:
        texts = [t.format(c=c) for c in CAPITALS for t in (*TRAIN, *HELDOUT)]
        return texts + [f"The capital is {v}." for v in CAPITALS.values()] + ["Rome or Paris."]
