"""What an export holds, and its train/test split: decided by prompt id alone, so a prompt falls on the same side
in every split family (sft, gen, prefs) and on the same side every time it is exported."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from typing import Any


def is_test(prompt_id: str, test_share: float, seed: int = 0) -> bool:
    """Whether a prompt goes to the test splits: a salted hash of its id read as a number in [0, 1)."""
    digest = hashlib.sha256(f"split:{seed}:{prompt_id}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64 < test_share


def split_name(kind: str, prompt_id: str, test_share: float, seed: int = 0) -> str:
    """`train_<kind>` or `test_<kind>` for the prompt, e.g. `test_prefs`."""
    return f"{'test' if is_test(prompt_id, test_share, seed) else 'train'}_{kind}"


@dataclass
class ExportOptions:
    test_share: float = 0.1  # share of prompts (by hash of prompt_id) in the test splits
    seed: int = 0  # salt of that hash: another seed, another split
    license: str = "other"
    rounds: bool = False  # every on-policy round's pairs (with a `round` column), not round 1's alone


@dataclass
class Exported:
    """What an export holds: rows per split, and the stages it came from."""

    splits: dict[str, list[dict[str, Any]]]
    stages: list[str]
    left_out: dict[str, str] = field(default_factory=dict)  # stage -> why its splits are missing
    rounds: bool = False  # the prefs splits hold every round's pairs, with a `round` column
