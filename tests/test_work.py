"""stream_map: bounded, lazy, drains on stop, exceptions returned per item."""

from __future__ import annotations

import asyncio

from pipeline.core.work import stream_map


def test_bounded_lazy_and_complete():
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
    assert peak <= 4 and len(out) == 50
    assert isinstance(out[7], ValueError) and out[8] == 16


def test_stop_drains_in_flight_and_starts_nothing_new():
    started = []
    stopped = []

    async def work(i: int) -> int:
        started.append(i)
        await asyncio.sleep(0.01)
        return i

    async def main():
        got = []
        async for item, _ in stream_map(range(100), work, 5, stop=lambda: bool(stopped)):
            got.append(item)
            if item == 2:
                stopped.append(True)
        return got

    got = asyncio.run(main())
    assert sorted(got) == sorted(started) and len(started) < 12  # in-flight finished, no new ones
