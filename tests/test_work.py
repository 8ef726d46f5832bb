"""stream_map: bounded, lazy, drains on stop, exceptions returned per item."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable

from pipeline.core.work import stream_map


def test_runs_exactly_the_bound_concurrently_lazily_and_returns_every_result():
    in_flight, peak, pulled = 0, 0, []

    def items():
        for i in range(50):
            pulled.append(i)
            yield i

    async def work(i: int) -> int:
        nonlocal in_flight, peak
        in_flight += 1
        peak = max(peak, in_flight)
        await asyncio.sleep(0.001 * (i % 5))
        in_flight -= 1
        if i == 7:
            raise ValueError("seven")
        return i * 2

    async def main():
        out = {}
        async for item, res in stream_map(items(), work, 4):
            assert len(pulled) - len(out) <= 4  # never more than the bound pulled ahead
            out[item] = res
        return out

    out = asyncio.run(main())
    assert peak == 4  # the bound is reached (a serial map peaks at 1) and never exceeded
    assert isinstance(out[7], ValueError)
    assert {i: r for i, r in out.items() if i != 7} == {i: 2 * i for i in range(50) if i != 7}


def test_stop_drains_in_flight_and_starts_nothing_new():
    started = []
    stopped = []

    async def finish(i: int) -> int:
        await asyncio.sleep(0.01)
        return i

    def work(i: int) -> Awaitable[int]:  # counts a start when stream_map calls it, not when the task first runs
        started.append(i)
        return finish(i)

    async def main():
        got = []
        async for item, _ in stream_map(range(100), work, 5, stop=lambda: bool(stopped)):
            got.append(item)
            if item == 2:
                stopped.append(len(started))
        return got

    got = asyncio.run(main())
    assert len(started) == stopped[0]  # nothing started after stop()
    assert sorted(got) == started  # and everything in flight was finished and yielded
