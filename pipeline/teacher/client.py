"""The teacher client: every call to the teacher or judge goes through here.

Bounded concurrency, client-side request/token rate limits, retries with backoff and jitter that honour
Retry-After, a persistent response cache (a resumed run pays for no request twice), usage and cost
accounting, and a budget cap.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import os
import random
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import openai

from pipeline.core.recipe import Recipe, TeacherConfig
from pipeline.core.stage import ItemFailed, StageStopped
from pipeline.core.store import RunStore
from pipeline.teacher.cache import ResponseCache, cache_key, cache_path
from pipeline.teacher.limits import TokenBucket
from pipeline.teacher.messages import ChatRequest, ChatResult, Usage

log = logging.getLogger(__name__)

RETRYABLE_STATUS = {408, 409, 425, 429}


class TeacherError(ItemFailed):
    """A request that failed for good (after retries, or not retryable); `attempts` says how often."""


class TeacherFatal(StageStopped):
    """An error no other request can avoid either (bad key, unknown model): the stage stops."""


class BudgetExceeded(StageStopped):
    """`teacher.max_cost_usd` reached: the stage stops with everything so far saved."""


def resolve_api_key(cfg: TeacherConfig) -> str:
    """The key from the environment variable the recipe names (Prefect flows export Secret blocks there)."""
    if cfg.api_key_env:
        key = os.environ.get(cfg.api_key_env)
        if key:
            return key
        if not cfg.is_builtin:
            hint = (f" or the Prefect Secret block '{cfg.api_key_secret_block}' (read by the flows)"
                    if cfg.api_key_secret_block else "")
            raise TeacherFatal(f"teacher.api_key_env: the environment variable {cfg.api_key_env} is not set; "
                               f"export it{hint}")
    return "no-key"  # servers without auth (the toy teacher, a local vLLM) still need a non-empty string


def _retry_after(exc: Exception) -> float | None:
    response = getattr(exc, "response", None)
    if response is None:
        return None
    value = response.headers.get("retry-after")
    try:
        return max(0.0, float(value)) if value is not None else None
    except ValueError:
        return None


class TeacherClient:
    """Async chat client with limits, retries, a response cache, cost accounting and a budget cap."""

    def __init__(self, cfg: TeacherConfig, cache: ResponseCache | None = None, api_key: str | None = None,
                 spent_usd: float = 0.0):
        self.cfg = cfg
        self.cache = cache
        self._key = api_key if api_key is not None else resolve_api_key(cfg)
        # The semaphore bounds requests in flight; a connection cap in httpx as well would queue requests
        # inside its pool, whose bookkeeping is quadratic in the queue (measured: 4x slower at 64).
        self._client = openai.AsyncOpenAI(base_url=cfg.endpoint, api_key=self._key, max_retries=0,
                                          timeout=cfg.timeout_s)
        self._sem = asyncio.Semaphore(cfg.max_concurrency)
        self._rpm = TokenBucket(cfg.requests_per_minute) if cfg.requests_per_minute else None
        self._tpm = TokenBucket(cfg.tokens_per_minute) if cfg.tokens_per_minute else None
        self.usage = Usage()
        self._spent_before = spent_usd
        self._reserved_usd = 0.0
        self._inflight: dict[str, asyncio.Future[ChatResult]] = {}

    # -- public ----------------------------------------------------------------------------------
    async def chat(self, request: ChatRequest) -> ChatResult:
        """One chat completion: from the cache if this exact request succeeded before, else over HTTP."""
        key = cache_key(self.cfg.model, request)
        if self.cache is not None and (hit := self.cache.get(key)) is not None:
            self.usage.cached += 1
            hit.cached = True
            return hit
        if (running := self._inflight.get(key)) is not None:
            # the same request is already on its way (e.g. two models gave the same answer to be judged)
            self.usage.cached += 1
            return dataclasses.replace(await asyncio.shield(running), cached=True)
        future: asyncio.Future[ChatResult] = asyncio.get_running_loop().create_future()
        self._inflight[key] = future
        try:
            result = await self._send_with_retries(request)
            if self.cache is not None:
                self.cache.put(key, result, {"model": self.cfg.model, "messages": request.messages,
                                             **request.params(), "tag": request.tag})
            future.set_result(result)
            return result
        except BaseException as exc:
            future.set_exception(exc)
            future.exception()  # mark retrieved: waiters re-raise it, nobody else has to
            raise
        finally:
            del self._inflight[key]

    @property
    def spent_usd(self) -> float:
        return self._spent_before + self.usage.usd

    async def aclose(self) -> None:
        await self._client.close()

    # -- internals -------------------------------------------------------------------------------
    def _cost(self, prompt_tokens: float, completion_tokens: float) -> float:
        return (prompt_tokens * self.cfg.price_input_per_1k + completion_tokens * self.cfg.price_output_per_1k) / 1000

    def _estimate_tokens(self, request: ChatRequest) -> tuple[int, int]:
        chars = sum(len(m.get("content") or "") for m in request.messages)
        return chars // 4 + 4 * len(request.messages), request.max_tokens * request.n

    def _check_budget(self, reserve: float) -> None:
        cap = self.cfg.max_cost_usd
        if cap is not None and self.spent_usd + self._reserved_usd + reserve > cap:
            raise BudgetExceeded(f"teacher budget reached: ${self.spent_usd:.4f} spent of teacher.max_cost_usd="
                                 f"${cap:.2f}; raise the cap and rerun the same command to continue")

    async def _send_with_retries(self, request: ChatRequest) -> ChatResult:
        last = "no attempt made"
        for attempt in range(1, self.cfg.max_retries + 2):
            wait: float | None = None
            try:
                return await self._send_once(request)
            except (BudgetExceeded, TeacherFatal):
                raise
            except openai.APIStatusError as exc:
                status = exc.status_code
                last = f"HTTP {status}: {self._scrub(_short(exc))}"
                if status in (401, 403):
                    raise TeacherFatal(f"the teacher at {self.cfg.endpoint} refused the API key ({last}); "
                                       f"check teacher.api_key_env") from None
                if status == 404:
                    raise TeacherFatal(f"the teacher at {self.cfg.endpoint} has no model "
                                       f"'{self.cfg.model}' or no chat endpoint ({last})") from None
                if status not in RETRYABLE_STATUS and status < 500:
                    raise TeacherError(last, attempt) from None
                wait = _retry_after(exc)
            except (openai.APITimeoutError, openai.APIConnectionError) as exc:
                last = f"{type(exc).__name__}: {self._scrub(_short(exc))}"
            except (openai.APIResponseValidationError, json.JSONDecodeError, ValueError, KeyError, TypeError,
                    AttributeError, IndexError) as exc:
                last = f"invalid response body ({type(exc).__name__}: {self._scrub(_short(exc))})"
            if attempt > self.cfg.max_retries:
                break
            self.usage.retries += 1
            backoff = min(self.cfg.backoff_max_s, self.cfg.backoff_base_s * 2 ** (attempt - 1))
            delay = max(wait or 0.0, backoff * random.uniform(0.5, 1.5))
            log.debug("teacher retry %d after %.2fs: %s", attempt, delay, last)
            await asyncio.sleep(delay)
        raise TeacherError(f"gave up after {self.cfg.max_retries + 1} attempts; last error: {last}",
                           self.cfg.max_retries + 1)

    async def _send_once(self, request: ChatRequest) -> ChatResult:
        est_in, est_out = self._estimate_tokens(request)
        reserve = self._cost(est_in, est_out)
        self._check_budget(reserve)
        if self._rpm:
            await self._rpm.take(1)
        if self._tpm:
            await self._tpm.take(est_in + est_out)
        self._reserved_usd += reserve
        try:
            async with self._sem:
                self.usage.attempts += 1
                response = await self._client.chat.completions.create(
                    model=self.cfg.model, messages=request.messages, **request.params())
        finally:
            self._reserved_usd -= reserve
        if isinstance(response, str) or not getattr(response, "choices", None):
            raise ValueError("no choices in the response")
        texts = [c.message.content if c.message.content is not None else "" for c in response.choices]
        reasons = [c.finish_reason or "stop" for c in response.choices]
        usage = response.usage
        p_tok = usage.prompt_tokens if usage else est_in
        c_tok = usage.completion_tokens if usage else sum(len(t) // 4 for t in texts)
        if self._tpm:
            self._tpm.give_back(max(0, est_in + est_out - p_tok - c_tok))
        self.usage.requests += 1
        self.usage.prompt_tokens += p_tok
        self.usage.completion_tokens += c_tok
        self.usage.usd += self._cost(p_tok, c_tok)
        return ChatResult(texts, reasons, p_tok, c_tok)

    def _scrub(self, text: str) -> str:
        return text.replace(self._key, "***") if self._key and len(self._key) > 3 else text


def _short(exc: Exception, limit: int = 300) -> str:
    text = str(exc).replace("\n", " ")
    return text if len(text) <= limit else text[:limit] + "…"


@asynccontextmanager
async def teacher_session(recipe: Recipe, store: RunStore) -> AsyncIterator[TeacherClient]:
    """A client for one stage with the run's response cache and the run's spend so far counted against the
    cap; closes the client and the cache however the stage ends."""
    client = TeacherClient(recipe.teacher, ResponseCache(cache_path(store, recipe)), spent_usd=run_spend(store))
    try:
        yield client
    finally:
        await client.aclose()
        if client.cache is not None:
            client.cache.close()


def run_spend(store: RunStore) -> float:
    """Dollars the run's stages have paid the teacher so far (counted against teacher.max_cost_usd)."""
    return sum(float(s.get("cost", {}).get("usd", 0.0)) for s in store.read_manifest().get("stages", {}).values())
