"""Progress reporting: a tqdm bar in the terminal; the Prefect flows install their own sink."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Protocol


class ProgressSink(Protocol):
    def update(self, n: int = 1) -> Any: ...
    def close(self) -> Any: ...


def _tqdm(stage: str, total: int | None, unit: str) -> ProgressSink:
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=stage, unit=unit, disable=None, dynamic_ncols=True, leave=True)


_factory: Callable[[str, int | None, str], ProgressSink] = _tqdm


def set_progress_factory(factory: Callable[[str, int | None, str], ProgressSink] | None) -> None:
    """Replace the progress sink (None restores the terminal bar)."""
    global _factory
    _factory = factory or _tqdm


def progress(stage: str, total: int | None, unit: str = "item") -> ProgressSink:
    return _factory(stage, total, unit)


def describe(sink: ProgressSink, text: str) -> None:
    """Show a status with the bar (a batch's `in_progress`), where the sink can (tqdm and the flows' can)."""
    set_description = getattr(sink, "set_description", None)
    if set_description is not None:
        set_description(text)


def has_sink() -> bool:
    """Whether a sink other than the terminal bar is installed (a trainer draws its own bar in the terminal)."""
    return _factory is not _tqdm
