"""Streaming concurrency: run an async function over an iterable with bounded work in flight."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from typing import TypeVar

T = TypeVar("T")
R = TypeVar("R")


async def stream_map(items: Iterable[T], fn: Callable[[T], Awaitable[R]], concurrency: int,
                     stop: Callable[[], bool] = lambda: False) -> AsyncIterator[tuple[T, R | BaseException]]:
    """Yield (item, result or exception) as each finishes; at most `concurrency` items are held at once.

    Items are pulled lazily, so memory does not grow with the input size. Once `stop()` is true no new
    item starts, but those in flight finish, so work already paid for is not thrown away.
    """
    iterator = iter(items)
    pending: dict[asyncio.Task[R], T] = {}

    def fill() -> None:
        while len(pending) < concurrency and not stop():
            try:
                item = next(iterator)
            except StopIteration:
                return
            pending[asyncio.ensure_future(fn(item))] = item

    fill()
    try:
        while pending:
            done, _ = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
            for task in done:
                item = pending.pop(task)
                exc = task.exception()
                yield item, (exc if exc is not None else task.result())
            fill()
    finally:
        for task in pending:
            task.cancel()
        if pending:
            await asyncio.gather(*pending, return_exceptions=True)
