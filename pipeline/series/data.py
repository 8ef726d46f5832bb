"""The data of a series' earlier runs that a run trains on as well (`series.data: accumulate`)."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from typing import Any

from pipeline.core.recipe import Recipe
from pipeline.core.store import RunStore, StoreError

log = logging.getLogger(__name__)


class SeriesDataError(RuntimeError):
    """An earlier run named in `series.previous_runs` cannot be read."""


def earlier_records(recipe: Recipe, stage: str, name: str = "data",
                    columns: list[str] | None = None) -> Iterator[tuple[str, dict[str, Any]]]:
    """(run name, record) of `<stage>/<name>` in each run of `series.previous_runs` whose stage completed; a run
    that never ran the stage adds nothing, one where it failed or is still running is an error."""
    for run_dir in recipe.series.previous_runs:
        try:
            store = RunStore.open_existing(run_dir)
        except StoreError as exc:
            raise SeriesDataError(f"series.previous_runs: {exc}") from None
        status = store.stage_state(stage).status
        if status == "pending":
            log.info("series: %s never ran %s; it adds no %s", store.run_name, stage, name)
            continue
        if status != "completed":
            raise SeriesDataError(f"series.previous_runs: the {stage} stage of {store.url} is {status}; finish "
                                  f"that run or remove it from series.previous_runs")
        for record in store.read_records(stage, name, columns=columns):
            yield store.run_name, record
