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
    done: asyncio.Queue[tuple[T, asyncio.Task[R]]] = asyncio.Queue()
    pending: set[asyncio.Task[R]] = set()

    def start() -> bool:
        try:
            item = next(iterator)
        except StopIteration:
            return False
        task = asyncio.ensure_future(fn(item))
        pending.add(task)
        # a callback per task keeps the wait O(1) per completion (asyncio.wait is O(tasks in flight))
        task.add_done_callback(lambda t, item=item: done.put_nowait((item, t)))
        return True

    exhausted = False
    try:
        while True:
            while not exhausted and len(pending) < concurrency and not stop():
                exhausted = not start()
            if not pending:
                return
            item, task = await done.get()
            pending.discard(task)
            if task.cancelled():
                yield item, asyncio.CancelledError()
            else:
                exc = task.exception()
                yield item, (exc if exc is not None else task.result())
    finally:
        for task in pending:
            task.cancel()
        if pending:
            await asyncio.gather(*pending, return_exceptions=True)
