"""The `series` section: how the runs of a recurring series build on each other."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from pipeline.core.recipe.base import Section


class SeriesConfig(Section):
    """A series run takes only the prompts no earlier run used; what it trains on is decided here."""

    # accumulate: sft and dpo train on the series' data so far plus this run's; new_only: on this run's alone
    data: Literal["accumulate", "new_only"] = "accumulate"
    warm_start: bool = False  # sft starts from the series' current model instead of sft.model
    # run directories whose dialogues (sft) and pairs (dpo) join this run's; a series run fills it in
    previous_runs: list[str] = Field(default_factory=list)
