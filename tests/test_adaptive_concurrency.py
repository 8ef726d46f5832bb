"""`max_concurrency: auto` against real servers on loopback: it finds a hidden concurrency limit, stays under its
ceiling, backs off when latency rises and holds new requests for a Retry-After; status and reports say where it
settled; the recipe names the key of a bad value."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
from loopback import LoopbackChat, completion
from starlette.requests import Request
from starlette.responses import JSONResponse

from pipeline.core.recipe import RecipeError, TeacherConfig, load_recipe
from pipeline.core.work import stream_map
from pipeline.run.runner import open_run, run_stage
from pipeline.tasks.toy.teacher_server import ToyTeacher, ToyTeacherConfig
from pipeline.teacher.client import TeacherClient
from pipeline.teacher.messages import ChatRequest

# the bounds below are on throughput and latency: the suite runs these alone, not beside another worker
pytestmark = pytest.mark.serial
HIDDEN_LIMIT = 24


def _cfg(base_url: str, max_concurrency: int | str, **kw: Any) -> TeacherConfig:
    return TeacherConfig(base_url=base_url, model="toy-teacher", api_key_env=None, timeout_s=10,
                         max_concurrency=max_concurrency, **kw)


async def _drive(client: TeacherClient, n: int, tag: str) -> int:
    """`n` distinct requests with the stage's streaming (2x the client's bound in flight); the failures."""
    async def one(i: int) -> object:
        return await client.chat(ChatRequest([{"role": "user", "content": f"{tag} {i}: what is {i % 9} + 1?"}]))

    failed = 0
    try:
        async for _, result in stream_map(range(n), one, 2 * client.cfg.concurrency_cap):
            failed += isinstance(result, BaseException)
    finally:
        await client.aclose()
    return failed


def _run(cfg: TeacherConfig, n: int, tag: str) -> tuple[dict[str, Any], int]:
    client = TeacherClient(cfg)
    failed = asyncio.run(_drive(client, n, tag))
    return client.concurrency_summary(), failed


def test_auto_settles_near_a_hidden_limit_with_far_fewer_429s_than_a_fixed_64():
    # a latency long against this busy machine's own overhead per request, so the server's limit is what binds
    with ToyTeacher(ToyTeacherConfig(max_concurrent=HIDDEN_LIMIT, latency_ms=200)) as toy:
        auto, auto_failed = _run(_cfg(toy.base_url, "auto", max_concurrency_ceiling=256), 600, "auto")
        fixed, _ = _run(_cfg(toy.base_url, 64), 600, "fixed")
    assert auto_failed == 0
    assert auto["mode"] == "auto" and auto["ceiling"] == 256 and auto["backoffs"] >= 1, auto
    # it found the limit (429s came back) and ran within a quarter of it, far from its ceiling
    assert 0.75 * HIDDEN_LIMIT <= auto["mean"] <= 1.25 * HIDDEN_LIMIT and auto["max"] <= 2 * HIDDEN_LIMIT, auto
    # (a quarter of fixed 64's on an idle machine; a loaded one slows the client's reaction to them)
    assert 0 < auto["throttled"] < fixed["throttled"] / 2, (auto, fixed)


def test_auto_grows_to_its_ceiling_and_never_past_it():
    with ToyTeacher(ToyTeacherConfig(latency_ms=30)) as toy:  # no limit: nothing pushes back
        auto, failed = _run(_cfg(toy.base_url, "auto", max_concurrency_ceiling=12), 400, "ceiling")
        in_flight_max = toy.stats()["in_flight_max"]
    assert failed == 0 and auto["throttled"] == 0
    # (where it ends may be under 12: a load spike on this machine reads as rising latency)
    assert auto["max"] == 12 and in_flight_max <= 12, (auto, in_flight_max)


class QueueingServer(LoopbackChat):
    """Serves `capacity` requests at once and queues the rest (never refuses): latency grows with the load."""

    def __init__(self, capacity: int, service_s: float):
        self.busy, self.in_flight_max = asyncio.Semaphore(capacity), 0
        self.in_flight = 0

        async def chat(request: Request) -> JSONResponse:
            self.in_flight += 1
            self.in_flight_max = max(self.in_flight_max, self.in_flight)
            try:
                async with self.busy:
                    await asyncio.sleep(service_s)
            finally:
                self.in_flight -= 1
            return JSONResponse(completion("ok"))

        super().__init__(chat)


def test_auto_backs_off_when_latency_rises_without_any_429():
    with QueueingServer(capacity=8, service_s=0.02) as srv:
        auto, failed = _run(_cfg(srv.base_url, "auto", max_concurrency_ceiling=256), 600, "queue")
    assert failed == 0 and auto["throttled"] == 0
    # without the latency rule it would double to the ceiling; latency doubles at twice the server's capacity, and
    # after a back-off the additive climb may pass 32 by a few before the next rise in latency halves it again
    assert auto["latency_backoffs"] >= 1 and auto["max"] <= 64 and auto["final"] <= 48, auto
    assert srv.in_flight_max <= 64


class RetryAfterServer(LoopbackChat):
    """Answers its first request 429 with Retry-After: 1 and the others after 20 ms; records arrival times."""

    def __init__(self) -> None:
        self.arrivals: list[float] = []

        async def chat(request: Request) -> JSONResponse:
            self.arrivals.append(time.monotonic())
            if len(self.arrivals) == 1:
                return JSONResponse({"error": {"message": "slow down"}}, 429, headers={"Retry-After": "1"})
            await asyncio.sleep(0.02)
            return JSONResponse(completion("ok"))

        super().__init__(chat)


def test_auto_holds_every_new_request_for_a_retry_after():
    with RetryAfterServer() as srv:
        cfg = _cfg(srv.base_url, "auto", backoff_base_s=0.01, backoff_max_s=0.05)
        auto, failed = _run(cfg, 30, "retry-after")
    assert failed == 0 and auto["throttled"] == 1
    refused = srv.arrivals[0]
    first_wave = [t for t in srv.arrivals if t - refused < 0.5]  # sent with the refused one, before its answer
    later = [t for t in srv.arrivals if t - refused >= 0.5]
    assert len(first_wave) <= 8 and len(first_wave) + len(later) == 31  # 30 answers and the refused attempt
    assert min(later) - refused >= 0.95, [round(t - refused, 3) for t in srv.arrivals]


@pytest.mark.slow
def test_generate_with_auto_reports_where_it_settled_in_stats_and_status(write_recipe, tmp_path: Path):
    with ToyTeacher(ToyTeacherConfig(max_concurrent=8, latency_ms=20)) as toy:
        path = write_recipe({
            "name": "auto", "task": "toy", "prompts": {"source": "task", "count": 120},
            "teacher": {"base_url": toy.base_url, "model": "toy-teacher", "api_key_env": None, "timeout_s": 10,
                        "backoff_base_s": 0.05, "backoff_max_s": 0.2, "max_concurrency": "auto",
                        "max_concurrency_ceiling": 64},
            "generate": {"min_rounds": 1, "max_rounds": 2},
        })
        rec = load_recipe(path)
        store = open_run(rec, "auto")
        report = run_stage("generate", rec, store)
    stats = json.loads(Path(store.join("generate", "stats.json")).read_text())
    settled = stats["concurrency"]["teacher"]
    assert settled["mode"] == "auto" and settled["ceiling"] == 64 and 1 <= settled["final"] <= 64
    assert settled["throttled"] == stats["teacher"]["throttled"] > 0
    assert f"endpoint 'teacher' concurrency auto settled at {settled['final']}" in report.message
    done = subprocess.run([sys.executable, "-m", "pipeline.cli", "status", store.url, "--json"],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    status = json.loads(done.stdout)
    assert status["stages"]["generate"]["endpoints"]["teacher"]["concurrency"] == settled
    assert status["endpoints"]["teacher"]["concurrency"] == {**settled, "stage": "generate"}
    text = subprocess.run([sys.executable, "-m", "pipeline.cli", "status", store.url],
                          capture_output=True, text=True, timeout=120).stdout
    assert f"endpoint 'teacher': max_concurrency auto settled at {settled['final']} in generate" in text


@pytest.mark.parametrize(("teacher", "endpoints", "expected"), [
    ({"max_concurrency": "fast"}, {}, "teacher.max_concurrency: expected a number of requests in flight"),
    ({"max_concurrency": 0}, {}, "teacher.max_concurrency: expected a number"),
    ({}, {"judge": {"max_concurrency": "lots"}}, "endpoints.judge.max_concurrency: expected a number"),
    ({"max_concurrency": 16, "max_concurrency_ceiling": 64}, {},
     "teacher: max_concurrency_ceiling applies only with max_concurrency: auto"),
    ({"max_concurrency": "auto", "max_concurrency_ceiling": 0}, {}, "teacher.max_concurrency_ceiling"),
])
def test_bad_concurrency_values_name_their_key(write_recipe, teacher, endpoints, expected):
    path = write_recipe({"task": "toy", "teacher": teacher, **({"endpoints": endpoints} if endpoints else {})})
    with pytest.raises(RecipeError) as err:
        load_recipe(path)
    assert expected in str(err.value), str(err.value)


def test_auto_recipe_bounds_items_in_flight_by_the_ceiling(write_recipe):
    rec = load_recipe(write_recipe({"task": "toy", "teacher": {"max_concurrency": "auto"}}))
    assert (rec.teacher.adaptive, rec.teacher.concurrency_cap) == (True, 256)
