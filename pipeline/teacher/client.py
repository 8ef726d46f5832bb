"""The teacher client: every call to any endpoint (every role, every openai pool member) goes through here.

Bounded concurrency, client-side request/token rate limits, retries with backoff and jitter that honour
Retry-After, a persistent response cache (a resumed run pays for no request twice), a spend ledger row for
every paid response (written with the cached response), budget caps, and the Batch API when the endpoint
asks for it (`pipeline.teacher.batch`).
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import os
import random
import uuid
from collections import Counter
from typing import Any, Protocol

import openai

from pipeline.core.recipe import TeacherConfig
from pipeline.core.stage import ItemFailed, StageStopped
from pipeline.teacher.budget import Budget, BudgetExceeded
from pipeline.teacher.cache import ResponseCache, cache_key
from pipeline.teacher.http import openai_client
from pipeline.teacher.ledger import Charge
from pipeline.teacher.limits import AdaptiveConcurrency, Slot, TokenBucket
from pipeline.teacher.messages import ChatRequest, ChatResult, Usage
from pipeline.teacher.serving import endpoint_url

log = logging.getLogger(__name__)

RETRYABLE_STATUS = {408, 409, 425, 429}
CONGESTION_STATUS = {429, 503, 529}  # the endpoint is over its limit or overloaded: `auto` backs off
POOL_CONNECTIONS = 16  # connections per HTTP client (see TeacherClient.__init__)
__all__ = ["Activity", "BudgetExceeded", "StructuredUnsupported", "TeacherClient", "TeacherError", "TeacherFatal",
           "resolve_api_key"]


class TeacherError(ItemFailed):
    """A request that failed for good (after retries, or not retryable); `attempts` says how often."""


class StructuredUnsupported(TeacherError):
    """An endpoint with `structured: auto` refused a request's response_format (HTTP 400/422): the client uses
    text mode from now on, and the caller asks again in text mode."""


class TeacherFatal(StageStopped):
    """An error no other request can avoid either (bad key, unknown model, no Batch API): the stage stops."""


class Activity:
    """Live requests in flight across a session's clients: a batch round is sent only when none is, since
    their answers may add requests to the round."""

    def __init__(self) -> None:
        self.live = 0


class Submitter(Protocol):
    """Where a client sends what the cache cannot answer when its endpoint uses the Batch API."""

    async def submit(self, key: str, request: ChatRequest, role: str) -> ChatResult: ...


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
    """Async chat client for one endpoint: limits, retries, response cache, spend ledger, budget caps."""

    def __init__(self, cfg: TeacherConfig, cache: ResponseCache | None = None, api_key: str | None = None,
                 spent_usd: float = 0.0, *, name: str = "teacher", stage: str = "", budget: Budget | None = None,
                 activity: Activity | None = None):
        self.cfg, self.cache, self.name, self.stage = cfg, cache, name, stage
        self._key = api_key if api_key is not None else resolve_api_key(cfg)
        # The semaphore bounds requests in flight; a connection cap in httpx as well would queue requests
        # inside its pool, whose bookkeeping is quadratic in the queue (measured: 4x slower at 64). And each
        # time httpcore's pool assigns a request it probes the socket of every idle connection it holds, so
        # requests are spread over clients of POOL_CONNECTIONS each (one pool of 64: ~30% of the client's CPU).
        self.url = endpoint_url(cfg)  # a served endpoint's is known only while its server runs
        # more clients are made as requests in flight fill the ones there are: each costs an SSL context
        # (measured: ~25 ms of CPU), and auto's ceiling of 256 would ask for 16 of them before any request
        self._shards = max(1, -(-cfg.concurrency_cap // POOL_CONNECTIONS))
        self._clients = [self._new_client()]
        self._client = self._clients[0]
        self._in_flight = [0]
        # `auto`: the limit moves (AIMD); else a plain semaphore, the cheaper of the two
        self.adaptive = AdaptiveConcurrency(cfg.concurrency_cap) if cfg.adaptive else None
        self._sem = None if self.adaptive else asyncio.Semaphore(cfg.concurrency_cap)
        # On a remote run store an answer is in flight until the store holds it too: the window bounds the
        # requests sent or not yet stored, so a kill repeats at most max_concurrency (auto: its limit of the
        # moment) paid requests elsewhere.
        self._window = self.adaptive.window if self.adaptive else asyncio.Semaphore(cfg.concurrency_cap)
        self._rpm = TokenBucket(cfg.requests_per_minute) if cfg.requests_per_minute else None
        self._tpm = TokenBucket(cfg.tokens_per_minute) if cfg.tokens_per_minute else None
        if budget is None:  # a client on its own: only its endpoint's cap
            budget = Budget(spent={name: spent_usd})
            budget.set_cap(name, cfg.max_cost_usd, "teacher" if name == "teacher" else f"endpoints.{name}")
        self.budget = budget
        self.activity = activity or Activity()
        self.usage = Usage()
        self.hits: Counter[str] = Counter()  # cache hits per role
        self.batch: Submitter | None = None  # set by the session when the endpoint uses the Batch API
        self._inflight: dict[str, asyncio.Future[ChatResult]] = {}
        # `structured: auto`: None until the endpoint answered a request carrying a schema; the first such request
        # goes alone (the others wait for its outcome), so an endpoint without support refuses one request
        self._structured: bool | None = None
        self._probe: asyncio.Future[None] | None = None
        self.structured_fallback = ""  # the refusal that made auto fall back to text

    # -- structured replies ----------------------------------------------------------------------
    async def structured_mode(self) -> bool:
        """Whether the next request should carry a response_format (see `TeacherConfig.structured`)."""
        if self.cfg.structured != "auto":
            return self.cfg.structured == "json_schema"
        while self._structured is None and self._probe is not None:
            await asyncio.shield(self._probe)
        return self._structured is not False

    def mark_unusable(self, request: ChatRequest, why: str) -> None:
        """The reply to `request` could not be used: the cache keeps it (and its charge) but never answers with
        it again."""
        if self.cache is not None:
            self.cache.mark_unusable(cache_key(self.cfg.model, request), why)

    def unusable(self, request: ChatRequest) -> tuple[ChatResult, str] | None:
        """(reply, why) when this request was answered before and the reply was marked unusable."""
        return None if self.cache is None else self.cache.unusable(cache_key(self.cfg.model, request))

    # -- public ----------------------------------------------------------------------------------
    async def chat(self, request: ChatRequest, role: str = "assistant") -> ChatResult:
        """One chat completion: from the cache if this exact request succeeded before, else over HTTP (or in
        the endpoint's next batch)."""
        key = cache_key(self.cfg.model, request)
        auto = request.response_format is not None and self.cfg.structured == "auto"
        if self.cache is not None and (hit := self.cache.get(key)) is not None:
            self.usage.cached += 1
            self.hits[role] += 1
            hit.cached = True
            if auto and self._structured is None:  # the endpoint took a schema before
                self._structured = True
            return hit
        if (running := self._inflight.get(key)) is not None:
            # the same request is already on its way (e.g. two models gave the same answer to be judged)
            self.usage.cached += 1
            self.hits[role] += 1
            return dataclasses.replace(await asyncio.shield(running), cached=True)
        probe = auto and self._structured is None and self._probe is None
        if probe:
            self._probe = asyncio.get_running_loop().create_future()
        future: asyncio.Future[ChatResult] = asyncio.get_running_loop().create_future()
        self._inflight[key] = future
        try:
            if self.batch is not None:
                result = await self.batch.submit(key, request, role)  # recorded by the batch on arrival
            else:
                result = await self._send_live(key, request, role)
            if auto and self._structured is None:
                self._structured = True
            future.set_result(result)
            return result
        except BaseException as exc:
            future.set_exception(exc)
            future.exception()  # mark retrieved: waiters re-raise it, nobody else has to
            raise
        finally:
            del self._inflight[key]
            if probe and self._probe is not None:
                self._probe.set_result(None)
                self._probe = None

    async def _send_live(self, key: str, request: ChatRequest, role: str) -> ChatResult:
        """Send, then cache and ledger the answer; on a remote run store it returns once the store has it."""
        if self.cache is None or self.cache.mirror is None:
            result = await self._send_with_retries(request)
            self.record(key, request, result, role)
            return result
        async with self._window:
            result = await self._send_with_retries(request)
            self.record(key, request, result, role)
            await self.cache.flush()
        return result

    def record(self, key: str, request: ChatRequest | None, result: ChatResult, role: str, *, stage: str = "",
               batch_id: str | None = None, custom_id: str = "") -> bool:
        """Cache a paid response and ledger its charge in one transaction; count it against the budget.
        False if it was recorded before (a batch's output read again after a kill)."""
        mode = "batch" if batch_id else "live"
        usd = self.cost(result.prompt_tokens, result.completion_tokens, mode)
        charge = Charge(f"{batch_id}:{custom_id}" if batch_id else uuid.uuid4().hex, self.name,
                        stage or self.stage, role, self.cfg.model, result.prompt_tokens, result.completion_tokens,
                        usd, mode, batch_id)
        meta = None if request is None else {"model": self.cfg.model, "messages": request.messages,
                                             **request.params(), "tag": request.tag}
        if self.cache is not None and not self.cache.put(key, result, meta, charge):
            return False
        self.budget.charge(self.name, usd)
        self.usage.requests += 1
        self.usage.batch_requests += mode == "batch"
        self.usage.prompt_tokens += result.prompt_tokens
        self.usage.completion_tokens += result.completion_tokens
        self.usage.usd += usd
        return True

    def cost(self, prompt_tokens: float, completion_tokens: float, mode: str = "live") -> float:
        usd = (prompt_tokens * self.cfg.price_input_per_1k + completion_tokens * self.cfg.price_output_per_1k) / 1000
        return usd * self.cfg.batch_discount if mode == "batch" else usd

    def estimate_tokens(self, request: ChatRequest) -> tuple[int, int]:
        """(input, output) tokens a request may cost, before it is sent: what the budget reserves for it."""
        chars = sum(len(m.get("content") or "") for m in request.messages)
        return chars // 4 + 4 * len(request.messages), request.max_tokens * request.n

    @property
    def openai(self) -> openai.AsyncOpenAI:
        return self._client

    @property
    def spent_usd(self) -> float:
        return self.budget.spent(self.name)

    async def aclose(self) -> None:
        if self.cache is not None:
            self.cache.commit()
        for client in self._clients:
            await client.close()

    def scrub(self, text: str) -> str:
        """`text` with the API key blanked out (error messages can quote a request)."""
        return text.replace(self._key, "***") if self._key and len(self._key) > 3 else text

    # -- internals -------------------------------------------------------------------------------
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
                last = f"HTTP {status}: {self.scrub(_short(exc))}"
                if status in (401, 403):
                    raise TeacherFatal(f"the endpoint '{self.name}' at {self.url} refused the API key "
                                       f"({last}); check its api_key_env") from None
                if status == 404:
                    raise TeacherFatal(f"the endpoint '{self.name}' at {self.url} has no model "
                                       f"'{self.cfg.model}' or no chat endpoint ({last})") from None
                if status in (400, 422) and request.response_format is not None:
                    self._refused_schema(last, attempt)
                if status not in RETRYABLE_STATUS and status < 500:
                    raise TeacherError(last, attempt) from None
                wait = _retry_after(exc)
            except (openai.APITimeoutError, openai.APIConnectionError) as exc:
                last = f"{type(exc).__name__}: {self.scrub(_short(exc))}"
            except (openai.APIResponseValidationError, json.JSONDecodeError, ValueError, KeyError, TypeError,
                    AttributeError, IndexError) as exc:
                last = f"invalid response body ({type(exc).__name__}: {self.scrub(_short(exc))})"
            if attempt > self.cfg.max_retries:
                break
            self.usage.retries += 1
            delay = max(wait or 0.0, self.backoff(attempt))
            log.debug("teacher retry %d after %.2fs: %s", attempt, delay, last)
            await asyncio.sleep(delay)
        raise TeacherError(f"gave up after {self.cfg.max_retries + 1} attempts; last error: {last}",
                           self.cfg.max_retries + 1)

    def _refused_schema(self, last: str, attempt: int) -> None:
        """A 400/422 to a request carrying a schema: auto falls back to text for good; json_schema says what to do."""
        if self.cfg.structured == "auto":
            self._structured = False
            self.structured_fallback = last
            log.warning("endpoint '%s' refused a JSON-schema response_format (%s): text mode from now on",
                        self.name, last)
            raise StructuredUnsupported(last, attempt) from None
        raise TeacherError(f"{last}; the endpoint '{self.name}' may not take a JSON-schema response_format: "
                           f"set its structured: auto (or off)", attempt) from None

    def backoff(self, attempt: int) -> float:
        """Exponential backoff with jitter before retry number `attempt`."""
        backoff = min(self.cfg.backoff_max_s, self.cfg.backoff_base_s * 2 ** (attempt - 1))
        return backoff * random.uniform(0.5, 1.5)

    async def _send_once(self, request: ChatRequest) -> ChatResult:
        est_in, est_out = self.estimate_tokens(request)
        reserve = self.cost(est_in, est_out)
        self.budget.reserve(self.name, reserve)
        try:
            if self._rpm:
                await self._rpm.take(1)
            if self._tpm:
                await self._tpm.take(est_in + est_out)
            async with self.adaptive.slot() if self.adaptive else self._sem as slot:
                response = await self._post(request, slot)
        finally:
            self.budget.release(self.name, reserve)
        result = parse_completion(response, est_in)
        if self._tpm:
            self._tpm.give_back(max(0, est_in + est_out - result.prompt_tokens - result.completion_tokens))
        return result

    async def _post(self, request: ChatRequest, slot: Slot | None) -> Any:
        """One HTTP attempt on the least busy client; a refusal for load is counted (and told to `auto`)."""
        self.usage.attempts += 1
        self.activity.live += 1
        shard = self._shard()
        self._in_flight[shard] += 1
        try:
            # the SDK's documented raw `post` (its errors, timeouts and connection pool) without its
            # per-request parameter transform and response models: a fifth of the client's CPU
            return await self._clients[shard].post(
                "/chat/completions", cast_to=dict,
                body={"model": self.cfg.model, "messages": request.messages, **request.params()})
        except openai.APIStatusError as exc:
            if exc.status_code in CONGESTION_STATUS:
                self.usage.throttled += 1
                if slot is not None:
                    slot.congested(_retry_after(exc))
            raise
        except openai.APITimeoutError:
            if slot is not None:
                slot.congested()
            raise
        finally:
            self.activity.live -= 1
            self._in_flight[shard] -= 1

    def _shard(self) -> int:
        shard = min(range(len(self._clients)), key=self._in_flight.__getitem__)
        if self._in_flight[shard] >= POOL_CONNECTIONS and len(self._clients) < self._shards:
            self._clients.append(self._new_client())
            self._in_flight.append(0)
            shard = len(self._clients) - 1
        return shard

    def _new_client(self) -> openai.AsyncOpenAI:
        return openai_client(self.url, self._key, self.cfg.timeout_s)

    def concurrency_summary(self) -> dict[str, Any]:
        """The concurrency this client ran at (auto: where it settled) and the 429/503 answers it got."""
        if self.adaptive is not None:
            return {**self.adaptive.summary(), "throttled": self.usage.throttled}
        cap = self.cfg.concurrency_cap
        return {"mode": "fixed", "final": cap, "max": cap, "throttled": self.usage.throttled}


def parse_completion(data: Any, est_in: int = 0) -> ChatResult:
    """A chat completion's JSON (a live response's or a batch line's body) as a ChatResult; ValueError if it is
    not one."""
    if not isinstance(data, dict) or not isinstance(data.get("choices"), list) or not data["choices"]:
        raise ValueError("no choices in the response")
    texts, reasons = [], []
    for choice in data["choices"]:
        content = (choice.get("message") or {}).get("content")
        texts.append(content if isinstance(content, str) else "")
        reasons.append(choice.get("finish_reason") or "stop")
    usage = data.get("usage") or {}
    p_tok, c_tok = usage.get("prompt_tokens"), usage.get("completion_tokens")
    return ChatResult(texts, reasons, int(p_tok) if p_tok is not None else est_in,
                      int(c_tok) if c_tok is not None else sum(len(t) // 4 for t in texts))


def _short(exc: Exception, limit: int = 300) -> str:
    text = str(exc).replace("\n", " ")
    return text if len(text) <= limit else text[:limit] + "…"
