"""Client-side limits: a continuous-refill token bucket for requests and tokens per minute, and the adaptive
(AIMD) limit on requests in flight that `max_concurrency: auto` turns on.

Why the adaptive limit is written here: aiolimiter and the token bucket below limit a *rate*, tenacity
retries; neither moves a concurrency limit. The AIMD limiters on PyPI are single 0.1 releases, and this one
must also bound the window of paid answers a remote run store does not hold yet by the same moving limit.
"""

from __future__ import annotations

import asyncio
import statistics
import time
from collections import deque
from types import TracebackType
from typing import Any


class TokenBucket:
    """Continuous-refill bucket: `rate_per_minute` units, bursts up to one second's worth (at least one unit)."""

    def __init__(self, rate_per_minute: float):
        self.rate = rate_per_minute / 60.0
        self.capacity = max(self.rate, 1.0)
        self.level = self.capacity
        self.stamp = time.monotonic()
        self._lock = asyncio.Lock()

    async def take(self, amount: float) -> None:
        amount = min(amount, self.capacity)  # one request bigger than the bucket still goes, alone
        async with self._lock:
            while True:
                now = time.monotonic()
                self.level = min(self.capacity, self.level + (now - self.stamp) * self.rate)
                self.stamp = now
                if self.level >= amount:
                    self.level -= amount
                    return
                await asyncio.sleep((amount - self.level) / self.rate)

    def give_back(self, amount: float) -> None:
        self.level = min(self.capacity, self.level + amount)


class Gate:
    """A FIFO semaphore whose size may change while tasks hold it or wait for it (asyncio.Semaphore's cannot):
    shrinking lets the holders finish and admits nobody until they are under the new size."""

    def __init__(self, size: int):
        self.size, self.held = size, 0
        self._waiters: deque[asyncio.Future[None]] = deque()

    async def acquire(self) -> None:
        if self.held < self.size and not self._waiters:
            self.held += 1
            return
        waiter = asyncio.get_running_loop().create_future()
        self._waiters.append(waiter)
        try:
            await waiter  # the waker counted this task in
        except asyncio.CancelledError:
            if waiter.done() and not waiter.cancelled():
                self.release()  # admitted, then cancelled: pass the place on
            else:
                self._waiters.remove(waiter)
            raise

    def release(self) -> None:
        self.held -= 1
        self._wake()

    def resize(self, size: int) -> None:
        self.size = size
        self._wake()

    def _wake(self) -> None:
        while self._waiters and self.held < self.size:
            waiter = self._waiters.popleft()
            if not waiter.done():
                self.held += 1
                waiter.set_result(None)

    async def __aenter__(self) -> None:
        await self.acquire()

    async def __aexit__(self, *exc: object) -> None:
        self.release()


class AdaptiveConcurrency:
    """How many requests one endpoint gets at once, found as TCP finds its window (AIMD).

    The limit doubles after each window of good answers (a window: as many answers as the limit) until the
    first sign of congestion, then grows by one a window; a 429/503 or a timeout, or a window whose median
    latency is over LATENCY_FACTOR times the lowest seen at a lower limit, multiplies it by DECREASE, at most
    once a round trip. It grows only when the stage kept it full, and never past `ceiling`. A Retry-After
    holds every new request until the time it names."""

    START = 8
    DECREASE = 0.9  # a gentle cut: a server's hidden limit is met again within a few windows (0.5 lost ~20 %)
    LATENCY_FACTOR = 2.0
    MIN_WINDOW = 8  # answers in a window at the least, so a median means something at a limit of 1 or 2

    def __init__(self, ceiling: int, start: int = START):
        self.ceiling = ceiling
        self.limit = float(min(start, ceiling))
        self.sending = Gate(int(self.limit))  # requests on the wire
        self.window = Gate(int(self.limit))  # on a remote run store: sent, or answered but not stored yet
        self.epoch = 0
        self.slow_start = True
        self.max_reached = int(self.limit)
        self.backoffs = self.latency_backoffs = 0
        self._resume_at = self._holdoff_until = 0.0
        self._srtt: float | None = None
        self._latencies: list[float] = []
        self._busiest = 0
        self._baseline: float | None = None  # the lowest window median latency, and the limit it was seen at
        self._baseline_limit = 0
        self._limit_sum = self._sent = 0

    def slot(self) -> Slot:
        """`async with limiter.slot() as slot:` around one request; `slot.congested()` when it was refused."""
        return Slot(self)

    def summary(self) -> dict[str, Any]:
        """What it settled on: the final limit, the highest reached, the mean a request was sent under, and how
        often it backed off (for any reason; for rising latency alone)."""
        return {"mode": "auto", "final": int(self.limit), "max": self.max_reached, "ceiling": self.ceiling,
                "mean": round(self._limit_sum / self._sent, 1) if self._sent else None,
                "backoffs": self.backoffs, "latency_backoffs": self.latency_backoffs}

    async def _enter(self) -> None:
        await self.sending.acquire()
        while (wait := self._resume_at - time.monotonic()) > 0:  # the slot is held: nothing else goes out either
            await asyncio.sleep(wait)
        self._busiest = max(self._busiest, self.sending.held)
        self._limit_sum += int(self.limit)
        self._sent += 1

    def _answered(self, epoch: int, latency: float) -> None:
        if epoch != self.epoch:
            return  # sent under a limit since cut: its latency tells of the congestion already answered
        self._srtt = latency if self._srtt is None else 0.875 * self._srtt + 0.125 * latency  # TCP's smoothing
        self._latencies.append(latency)
        if len(self._latencies) >= max(self.MIN_WINDOW, int(self.limit)):
            self._close_window()

    def _close_window(self) -> None:
        median, limit = statistics.median(self._latencies), int(self.limit)
        # A slow window at no more than the baseline's limit is the endpoint itself slowing, not our load: it
        # becomes the baseline. So the baseline never creeps up with a queue we build (no drift), yet follows
        # an endpoint that slows for good.
        if self._baseline is None or median < self._baseline or limit <= self._baseline_limit:
            self._baseline, self._baseline_limit = median, limit
        elif median > self.LATENCY_FACTOR * self._baseline:
            self.latency_backoffs += 1
            self._decrease()
            return
        if self._busiest >= int(self.limit):  # grow only a limit the stage used up
            self._set(self.limit * 2 if self.slow_start else self.limit + 1)
        self._latencies.clear()
        self._busiest = self.sending.held

    def _congested(self, epoch: int, retry_after: float | None) -> None:
        if retry_after:
            self._resume_at = max(self._resume_at, time.monotonic() + retry_after)
        # once per round trip: the refusals that come back at once after a cut tell of the same congestion
        if epoch == self.epoch and time.monotonic() >= self._holdoff_until:
            self.backoffs += 1
            self._decrease()

    def _decrease(self) -> None:
        self.slow_start = False
        self.epoch += 1
        self._holdoff_until = time.monotonic() + (self._srtt or 0.0)
        self._latencies.clear()
        self._busiest = 0
        self._set(self.limit * self.DECREASE)

    def _set(self, limit: float) -> None:
        self.limit = max(1.0, min(float(self.ceiling), limit))
        self.max_reached = max(self.max_reached, int(self.limit))
        self.sending.resize(int(self.limit))
        self.window.resize(int(self.limit))


class Slot:
    """One request's place under an AdaptiveConcurrency: its latency counts as an answer unless the request
    was marked congested (or failed otherwise, which says nothing about load)."""

    def __init__(self, limiter: AdaptiveConcurrency):
        self.limiter = limiter
        self.epoch, self.started = 0, 0.0
        self._congested = False

    def congested(self, retry_after: float | None = None) -> None:
        """The endpoint refused the request for load (429, 503, a timeout); `retry_after` in seconds if it said."""
        self._congested = True
        self.limiter._congested(self.epoch, retry_after)

    async def __aenter__(self) -> Slot:
        await self.limiter._enter()
        self.epoch, self.started = self.limiter.epoch, time.monotonic()
        return self

    async def __aexit__(self, kind: type[BaseException] | None, exc: BaseException | None,
                        tb: TracebackType | None) -> None:
        self.limiter.sending.release()
        if kind is None and not self._congested:
            self.limiter._answered(self.epoch, time.monotonic() - self.started)
