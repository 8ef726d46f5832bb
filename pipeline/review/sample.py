"""Which pairs a person reviews: N of a round's pairs drawn at random, seeded, so a rerun draws the same ones;
each shows its two answers in a random left/right order, with the judge's pick and scores kept aside."""

from __future__ import annotations

import random
from dataclasses import asdict, dataclass
from typing import Any

from pipeline.core.recipe import ReviewConfig
from pipeline.core.store import RunStore

SIDES = ("A", "B")


@dataclass(frozen=True)
class ReviewItem:
    """One pair as the person sees it: `a` is shown on the left, `b` on the right."""

    number: int  # 1..N, as the form numbers it
    pair_id: str
    source: str  # the pair's source: pool, on_policy, correction
    prompt: str
    a: str
    b: str
    judge_pick: str  # "A" or "B": the side of the judge's chosen answer, hidden until answered
    score_a: float | None
    score_b: float | None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ReviewItem:
        return cls(**{k: data[k] for k in cls.__dataclass_fields__})


def prompt_text(record: dict[str, Any]) -> str:
    """The conversation before the two answers: the prompt alone, or every earlier turn as `role: text`."""
    turns = (record.get("chosen") or [])[:-1]
    if len(turns) <= 1:
        return turns[0]["content"] if turns else str(record.get("prompt") or "")
    return "\n\n".join(f"{t['role']}: {t['content']}" for t in turns)


def draw(pairs: list[dict[str, Any]], size: int, seed: int) -> list[ReviewItem]:
    """`size` pairs (all when fewer) drawn from `pairs` in pair_id order, so the draw depends on which pairs
    there are and the seed, never on the order feedback finished them in; each gets its own left/right order."""
    ordered = sorted(pairs, key=lambda p: p["pair_id"])
    rng = random.Random(f"review:{seed}")
    picked = rng.sample(ordered, min(size, len(ordered)))
    items = []
    for number, pair in enumerate(picked, start=1):
        chosen_left = rng.random() < 0.5
        chosen, rejected = pair["chosen"][-1]["content"], pair["rejected"][-1]["content"]
        sc, sr = pair.get("score_chosen"), pair.get("score_rejected")
        items.append(ReviewItem(
            number=number, pair_id=pair["pair_id"], source=str(pair.get("source") or "pool"),
            prompt=prompt_text(pair), a=chosen if chosen_left else rejected, b=rejected if chosen_left else chosen,
            judge_pick="A" if chosen_left else "B", score_a=sc if chosen_left else sr,
            score_b=sr if chosen_left else sc))
    return items


def read_pairs(store: RunStore) -> list[dict[str, Any]]:
    """The round's pairs as feedback wrote them (the view `store` is of the round)."""
    return list(store.read_records("feedback", "pairs"))


def draw_review(store: RunStore, cfg: ReviewConfig) -> tuple[list[ReviewItem], int]:
    """The sample of the round's pairs the person reviews, and how many pairs it was drawn from."""
    pairs = read_pairs(store)
    return draw(pairs, cfg.sample, cfg.seed), len(pairs)
