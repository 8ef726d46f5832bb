"""The teacher client against real HTTP servers on loopback: retries, Retry-After, cache, budget, limits, keys."""

from __future__ import annotations

import asyncio
import dataclasses
import sqlite3
import time
from pathlib import Path

import pytest
from loopback import LoopbackChat, completion
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse

from pipeline.core.recipe import TeacherConfig
from pipeline.tasks.toy.teacher_server import ToyTeacher, ToyTeacherConfig
from pipeline.teacher.cache import ResponseCache
from pipeline.teacher.client import BudgetExceeded, TeacherClient, TeacherError, TeacherFatal
from pipeline.teacher.ledger import Charge
from pipeline.teacher.messages import ChatRequest, ChatResult


class ScriptedServer(LoopbackChat):
    """A loopback server that answers with a scripted sequence of responses, recording arrival times."""

    def __init__(self, script: list):
        self.script, self.arrivals = list(script), []

        async def chat(request: Request):
            self.arrivals.append(time.monotonic())
            step = self.script.pop(0) if self.script else "ok"
            if step == "429":
                return JSONResponse({"error": {"message": "slow down"}}, 429, headers={"Retry-After": "1"})
            if step == "500":
                return JSONResponse({"error": {"message": "boom"}}, 500)
            if step == "badjson":
                return PlainTextResponse("{not json", headers={"content-type": "application/json"})
            if step == "400":
                return JSONResponse({"error": {"message": "bad request"}}, 400)
            return JSONResponse(completion("ok"))

        super().__init__(chat)


def _cfg(base_url: str, **kw) -> TeacherConfig:
    defaults = {"base_url": base_url, "model": "m", "api_key_env": None, "backoff_base_s": 0.01,
                "backoff_max_s": 0.05, "timeout_s": 5, "max_retries": 4}
    return TeacherConfig(**{**defaults, **kw})


def _ask(client: TeacherClient, text: str = "What is 2 + 2?", **kw) -> object:
    return asyncio.run(_ask_async(client, text, **kw))


async def _ask_async(client: TeacherClient, text: str, **kw):
    try:
        return await client.chat(ChatRequest([{"role": "user", "content": text}], **kw))
    finally:
        await client.aclose()


def test_retries_5xx_and_bad_json_then_succeeds():
    with ScriptedServer(["500", "badjson", "500", "ok"]) as srv:
        client = TeacherClient(_cfg(srv.base_url))
        result = _ask(client)
        assert result.text == "ok"
        assert len(srv.arrivals) == 4 and client.usage.retries == 3


def test_honours_retry_after():
    with ScriptedServer(["429", "ok"]) as srv:
        client = TeacherClient(_cfg(srv.base_url))
        assert _ask(client).text == "ok"
        assert srv.arrivals[1] - srv.arrivals[0] >= 0.95  # Retry-After: 1, though backoff alone is 0.05 s


def test_gives_up_after_bounded_attempts_with_the_last_error():
    with ScriptedServer(["500"] * 10) as srv:
        client = TeacherClient(_cfg(srv.base_url, max_retries=2))
        with pytest.raises(TeacherError, match="gave up after 3 attempts; last error: HTTP 500") as err:
            _ask(client)
        assert err.value.attempts == 3 and len(srv.arrivals) == 3


def test_client_errors_are_not_retried():
    with ScriptedServer(["400", "ok"]) as srv:
        with pytest.raises(TeacherError, match="HTTP 400"):
            _ask(TeacherClient(_cfg(srv.base_url)))
        assert len(srv.arrivals) == 1


def test_timeout_is_retried():
    with ToyTeacher(ToyTeacherConfig(fault_hang=1.0, hang_s=30)) as toy:
        client = TeacherClient(_cfg(toy.base_url, timeout_s=0.3, max_retries=1))
        t0 = time.monotonic()
        with pytest.raises(TeacherError, match="Timeout"):
            _ask(client)
        assert time.monotonic() - t0 < 5
        assert toy.stats()["outcomes"].get("hang") == 2


def test_cache_answers_a_repeated_request_without_http(tmp_path: Path):
    with ToyTeacher(ToyTeacherConfig()) as toy:
        first = _ask(TeacherClient(_cfg(toy.base_url), ResponseCache(tmp_path / "c.sqlite")))
        again_client = TeacherClient(_cfg(toy.base_url), ResponseCache(tmp_path / "c.sqlite"))
        again = _ask(again_client)
        other_tag = _ask(TeacherClient(_cfg(toy.base_url), ResponseCache(tmp_path / "c.sqlite")), tag="retry-1")
        assert again.text == first.text and again.cached and not other_tag.cached
        assert again_client.usage.requests == 0 and again_client.usage.cached == 1
        assert toy.stats()["outcomes"]["ok"] == 2


def test_cache_commits_the_answers_of_a_short_window_together(tmp_path: Path):
    path = tmp_path / "c.sqlite"
    cache = ResponseCache(path)
    result = ChatResult(["an answer"], ["stop"], prompt_tokens=3, completion_tokens=4)
    window = ResponseCache.WINDOW_S

    def charge(i: int) -> Charge:
        return Charge(f"charge-{i}", "teacher", "generate", "assistant", "m", 3, 4, 0.01)

    def committed() -> int:  # responses and charges another process (a resumed run, `distill status`) sees
        with sqlite3.connect(path) as db:
            return db.execute("SELECT COUNT(*) FROM responses").fetchone()[0] + \
                db.execute("SELECT COUNT(*) FROM spend").fetchone()[0]

    async def answers(start: int, n: int) -> None:
        assert all(cache.put(f"k{i}", result, None, charge(i)) for i in range(start, start + n))

    async def first_loop() -> None:
        await answers(0, 3)
        assert not cache.put("k0-again", result, None, charge(0))  # charged moments ago, not committed yet
        assert cache.get("k1") is not None and cache.get("k0-again") is None
        assert committed() == 0  # within the window
        await asyncio.sleep(3 * window)
        assert committed() == 6
        await answers(3, ResponseCache.GROUP + 2)  # GROUP waiting are committed at once
        assert committed() == 2 * (3 + ResponseCache.GROUP)
        await asyncio.sleep(3 * window)
        assert committed() == 2 * (5 + ResponseCache.GROUP)
        await answers(1000, 1)  # the loop ends within the window: its timer never fires

    async def second_loop() -> None:
        await answers(2000, 1)
        await asyncio.sleep(3 * window)  # committed by this loop's timer, the earlier answer with it

    asyncio.run(first_loop())
    asyncio.run(second_loop())
    assert committed() == 2 * (7 + ResponseCache.GROUP)
    assert cache.put("outside", result, None, charge(-1)) and committed() == 2 * (8 + ResponseCache.GROUP)
    assert dataclasses.asdict(cache.get("outside")) == dataclasses.asdict(result)  # every field kept
    asyncio.run(answers(3000, 1))
    cache.close()  # commits what waits
    assert committed() == 2 * (9 + ResponseCache.GROUP)


def test_budget_cap_stops_before_overspending(tmp_path: Path):
    with ToyTeacher(ToyTeacherConfig()) as toy:
        cfg = _cfg(toy.base_url, price_input_per_1k=10.0, price_output_per_1k=10.0, max_cost_usd=1.0,
                   max_concurrency=4)
        client = TeacherClient(cfg, ResponseCache(tmp_path / "c.sqlite"))

        async def many():
            try:
                for i in range(200):
                    await client.chat(ChatRequest([{"role": "user", "content": f"What is {i % 10} + 1?"}],
                                                  max_tokens=16, tag=str(i)))
            finally:
                await client.aclose()

        with pytest.raises(BudgetExceeded, match="max_cost_usd"):
            asyncio.run(many())
        assert 0 < client.usage.usd <= 1.0
        assert client.usage.requests == toy.stats()["outcomes"]["ok"] < 200


def test_request_rate_limit_spaces_requests():
    with ToyTeacher(ToyTeacherConfig()) as toy:
        client = TeacherClient(_cfg(toy.base_url, requests_per_minute=240))  # 4 a second, burst of 4

        async def burst():
            try:
                await asyncio.gather(*(client.chat(ChatRequest([{"role": "user", "content": f"What is {i} + 1?"}]))
                                       for i in range(12)))
            finally:
                await client.aclose()

        t0 = time.monotonic()
        asyncio.run(burst())
        assert time.monotonic() - t0 >= 1.8  # 12 requests at 4/s after a burst of 4


def test_wrong_key_stops_the_stage_and_the_key_is_never_echoed():
    sentinel = "sk-SENTINEL-abc123-never-log-me"
    with ToyTeacher(ToyTeacherConfig(api_key="the-right-key")) as toy:
        client = TeacherClient(_cfg(toy.base_url), api_key=sentinel)
        with pytest.raises(TeacherFatal) as err:
            _ask(client)
        assert "refused the API key" in str(err.value) and sentinel not in str(err.value)


def test_missing_key_variable_is_named(monkeypatch):
    monkeypatch.delenv("MY_TEACHER_KEY", raising=False)
    with pytest.raises(TeacherFatal, match="MY_TEACHER_KEY is not set"):
        TeacherClient(_cfg("http://127.0.0.1:9/v1", api_key_env="MY_TEACHER_KEY"))


def test_identical_requests_in_flight_are_sent_once(tmp_path: Path):
    with ToyTeacher(ToyTeacherConfig(latency_ms=100)) as toy:
        client = TeacherClient(_cfg(toy.base_url), ResponseCache(tmp_path / "c.sqlite"))

        async def same_twice():
            try:
                req = ChatRequest([{"role": "user", "content": "What is 4 + 4?"}])
                return await asyncio.gather(client.chat(req), client.chat(req), client.chat(req))
            finally:
                await client.aclose()

        results = asyncio.run(same_twice())
        assert len({r.text for r in results}) == 1 and sum(r.cached for r in results) == 2
        assert toy.stats()["outcomes"]["ok"] == 1 and client.usage.requests == 1
