"""The Batch API behind a client's `chat()`: requests are collected while a stage's coroutines run and sent as
one batch per round (`/v1/files` + `/v1/batches`) once every one of them is waiting.

A stage does not change for batch mode: its coroutines call `chat()` and wait. The driver sends the round
when no request has joined it for a moment and no live request (whose answer could add one) is in flight,
polls the batch (its id is in the run's batch journal before the first poll), records each answer in the
response cache and the spend ledger at the batch price, and wakes the coroutines, whose next requests make the
next round. A failed or expired line goes into the next round (or live, `batch_fallback: live`) until the
endpoint's `max_retries` are spent, then its item fails. A rerun after a kill polls the batches the journal
lists as open instead of sending their requests again.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, TypeVar

import openai

from pipeline.core.progress import describe, progress
from pipeline.core.recipe import endpoint_key
from pipeline.teacher.batch_journal import BatchJournal
from pipeline.teacher.budget import BudgetExceeded
from pipeline.teacher.client import TeacherClient, TeacherError, TeacherFatal, _short, parse_completion
from pipeline.teacher.messages import ChatRequest, ChatResult

log = logging.getLogger(__name__)
T = TypeVar("T")

SETTLE_S = 0.05  # a round goes once no request joined it for this long (and no live request is in flight)
TICK_S = 0.01
FIRST_POLL_S = 0.25  # polls start soon and back off to the endpoint's batch_poll_s
FINAL = {"completed", "failed", "expired", "cancelled"}
CHAT_URL = "/v1/chat/completions"


@dataclass(eq=False)
class Line:
    """One request waiting for a batch: its cache key is its custom id."""

    key: str
    request: ChatRequest
    role: str
    future: asyncio.Future[ChatResult]
    attempts: int = 0
    reserved: float = 0.0


class BatchDriver:
    """Rounds of one endpoint's (and model's) requests as batches; see the module docstring."""

    def __init__(self, client: TeacherClient, journal: BatchJournal, stage: str):
        self.client, self.journal, self.stage = client, journal, stage
        self.cfg = client.cfg
        self._queue: list[Line] = []
        self._wake = asyncio.Event()
        self._runner: asyncio.Task[None] | None = None
        self._tasks: set[asyncio.Task[Any]] = set()
        self._waiting: dict[str, list[Line]] = {}  # custom id -> lines waiting for an open batch
        self._open_ids: dict[str, str] = {}  # custom id -> submission of the open batch that holds it
        self._fatal: BaseException | None = None
        self._batches = 0

    # -- what the client calls -------------------------------------------------------------------
    async def submit(self, key: str, request: ChatRequest, role: str) -> ChatResult:
        if self._fatal is not None:
            raise self._fatal
        line = Line(key, request, role, asyncio.get_running_loop().create_future())
        self._queue.append(line)
        if self._runner is None:
            self._runner = asyncio.create_task(self._run())
        self._wake.set()
        return await line.future

    async def aclose(self) -> None:
        """Stop polling (open batches stay in the journal: the next session of this endpoint takes them in)."""
        tasks = [t for t in [self._runner, *self._tasks] if t is not None and not t.done()]
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.gather(*tasks, return_exceptions=True)

    # -- rounds ----------------------------------------------------------------------------------
    async def _run(self) -> None:
        try:
            await self._adopt_open_batches()
            while True:
                await self._wake.wait()
                self._wake.clear()
                await self._settle()
                lines, self._queue = self._queue, []
                if lines:
                    self._flush(lines)
        except asyncio.CancelledError:
            raise
        except BaseException as exc:  # noqa: BLE001 - whatever stops the driver, no caller may wait forever
            self._fail_all(exc if isinstance(exc, TeacherFatal) else
                           TeacherFatal(f"batch driver of endpoint '{self.client.name}' stopped: "
                                        f"{type(exc).__name__}: {exc}"))

    async def _settle(self) -> None:
        """Wait until the round stops growing and no live request (which could add to it) is in flight."""
        size, quiet = -1, 0.0
        while quiet < SETTLE_S:
            await asyncio.sleep(TICK_S)
            if len(self._queue) != size or self.client.activity.live:
                size, quiet = len(self._queue), 0.0
            else:
                quiet += TICK_S

    def _flush(self, lines: list[Line]) -> None:
        """Answer what became known meanwhile, attach what an open batch holds, send the rest."""
        new: list[Line] = []
        for line in lines:
            hit = self.client.cache.get(line.key) if self.client.cache is not None else None
            if hit is not None:  # an open batch from before the kill answered it meanwhile
                hit.cached = True
                line.future.set_result(hit)
            elif line.key in self._open_ids:
                self._waiting.setdefault(line.key, []).append(line)
            else:
                try:
                    est_in, est_out = self.client.estimate_tokens(line.request)
                    line.reserved = self.client.cost(est_in, est_out, "batch")
                    self.client.budget.reserve(self.client.name, line.reserved)
                except BudgetExceeded as exc:
                    line.reserved = 0.0
                    line.future.set_exception(exc)
                    continue
                new.append(line)
        for part in split_by_limits(new, self.cfg.batch_max_requests, self.cfg.batch_max_bytes, self._body):
            self._spawn(self._send(part))

    def _spawn(self, coro: Awaitable[Any]) -> None:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _body(self, line: Line) -> bytes:
        body = {"model": self.cfg.model, "messages": line.request.messages, **line.request.params()}
        return (json.dumps({"custom_id": line.key, "method": "POST", "url": CHAT_URL, "body": body},
                           ensure_ascii=False) + "\n").encode()

    # -- one batch -------------------------------------------------------------------------------
    async def _send(self, part: list[Line]) -> None:
        try:
            data = b"".join(self._body(line) for line in part)
            uploaded = await self._call("upload the batch input", lambda: self.client.openai.files.create(
                file=("batch.jsonl", data, "application/jsonl"), purpose="batch"))
            entry = self.journal.new_entry(self.stage, self.cfg.model, uploaded.id, {ln.key: ln.role for ln in part})
            self.journal.write(entry)  # before the batch exists: a kill from here on is found by its metadata
            batch = await self._call("create the batch", lambda: self.client.openai.batches.create(
                input_file_id=uploaded.id, endpoint=CHAT_URL, completion_window="24h",
                metadata={"distill_submission": entry["submission"], "distill_stage": self.stage}))
            entry.update(batch_id=batch.id, status=batch.status)
            self.journal.write(entry)  # the batch id is on disk before the first poll
        except BaseException as exc:
            for line in part:
                self.client.budget.release(self.client.name, line.reserved)
                if not line.future.done():
                    line.future.set_exception(exc if isinstance(exc, Exception) else TeacherFatal(str(exc)))
            if isinstance(exc, TeacherFatal):
                self._fail_all(exc)
            if not isinstance(exc, Exception):
                raise
            return
        log.info("%s: batch %s on endpoint '%s': %d requests (%d bytes)", self.stage, batch.id, self.client.name,
                 len(part), len(data))
        for line in part:
            self._open_ids[line.key] = entry["submission"]
            self._waiting.setdefault(line.key, []).append(line)
        await self._follow(entry)

    async def _follow(self, entry: dict[str, Any]) -> None:
        """Poll a batch until it is final, then take in its results."""
        try:
            batch = await self._poll(entry)
            await self._consume(entry, batch)
        except (asyncio.CancelledError, KeyboardInterrupt):
            raise
        except BaseException as exc:  # noqa: BLE001 - its lines fail (TeacherFatal stops the stage); the batch stays open
            error = exc if isinstance(exc, TeacherFatal) else TeacherFatal(
                f"batch {entry['batch_id']} on endpoint '{self.client.name}': {type(exc).__name__}: {exc}")
            for key in entry["lines"]:
                self._open_ids.pop(key, None)
                for line in self._waiting.pop(key, []):
                    self.client.budget.release(self.client.name, line.reserved)
                    if not line.future.done():
                        line.future.set_exception(error)

    async def _poll(self, entry: dict[str, Any]) -> Any:
        self._batches += 1
        bar = progress(f"{self.stage} batch {self._batches}", len(entry["lines"]), "request")
        delay, shown, status = min(FIRST_POLL_S, self.cfg.batch_poll_s), 0, ""
        try:
            while True:
                batch = await self._call("poll the batch", lambda: self.client.openai.batches.retrieve(
                    entry["batch_id"]))
                counts = batch.request_counts
                done = (counts.completed + counts.failed) if counts else 0
                if done > shown:
                    bar.update(done - shown)
                    shown = done
                if batch.status != status:
                    status = batch.status
                    describe(bar, f"{self.stage} batch {self._batches} {status}")
                    log.info("%s: batch %s (endpoint '%s', %d requests): %s, %d done, %d failed", self.stage,
                             batch.id, self.client.name, len(entry["lines"]), status, counts.completed if counts else 0,
                             counts.failed if counts else 0)
                if batch.status in FINAL:
                    return batch
                await asyncio.sleep(delay)
                delay = min(2 * delay, self.cfg.batch_poll_s)
        finally:
            bar.close()

    async def _consume(self, entry: dict[str, Any], batch: Any) -> None:
        """Record every answered line (cache + ledger at the batch price), close the entry, wake the waiters."""
        results: dict[str, ChatResult] = {}
        errors: dict[str, str] = {}
        for file_id in (batch.output_file_id, batch.error_file_id):
            if file_id:
                text = await self._call("download batch results", lambda f=file_id: self._download(f))
                read_result_lines(text, results, errors)
        for key, role in entry["lines"].items():
            if key in results:
                waiting = self._waiting.get(key)
                self.client.record(key, waiting[0].request if waiting else None, results[key], role,
                                   stage=entry["stage"], batch_id=batch.id, custom_id=key)
            else:
                errors.setdefault(key, f"no result line (batch {batch.status})")
        if self.client.cache is not None:  # stored in the run store before the entry says consumed
            await self.client.cache.flush()
        counts = batch.request_counts
        # a consumed entry keeps its counts, not its line list (a rerun never looks at it again)
        self.journal.write({**entry, "status": batch.status, "consumed": True, "lines": {},
                            "requests": len(entry["lines"]), "provider_counts": counts.model_dump() if counts else {},
                            "request_counts": {"total": len(entry["lines"]), "completed": len(results),
                                               "failed": len(errors)}})
        for key in entry["lines"]:
            self._open_ids.pop(key, None)
            for line in self._waiting.pop(key, []):
                self.client.budget.release(self.client.name, line.reserved)
                line.reserved = 0.0
                if key in results:
                    line.future.set_result(results[key])
                else:
                    self._retry(line, errors[key])

    async def _download(self, file_id: str) -> str:
        response = await self.client.openai.files.content(file_id)
        return response.text

    def _retry(self, line: Line, error: str) -> None:
        """A failed or expired line: the next round (or live), until the endpoint's max_retries are spent."""
        line.attempts += 1
        if line.attempts > self.cfg.max_retries:
            line.future.set_exception(TeacherError(f"batch line failed {line.attempts} times; last error: {error}",
                                                   line.attempts))
        elif self.cfg.batch_fallback == "live":
            self._spawn(self._live(line))
        else:
            self._queue.append(line)
            self._wake.set()

    async def _live(self, line: Line) -> None:
        try:
            result = await self.client._send_with_retries(line.request)
            self.client.record(line.key, line.request, result, line.role)
            line.future.set_result(result)
        except BaseException as exc:
            if not line.future.done():
                line.future.set_exception(exc if isinstance(exc, Exception) else TeacherFatal(str(exc)))
            if not isinstance(exc, Exception):
                raise

    # -- after a kill ----------------------------------------------------------------------------
    async def _adopt_open_batches(self) -> None:
        """Poll the batches a killed run left open (their lines are paid for whether anyone asks again)."""
        for entry in self.journal.open_entries(self.cfg.model):
            if entry["batch_id"] is None:
                found = await self._find_created(entry)
                if found is None:  # killed before the batch was created: nothing was sent
                    entry.update(status="never created", consumed=True)
                    self.journal.write(entry)
                    continue
                entry.update(batch_id=found.id, status=found.status)
                self.journal.write(entry)
            log.info("%s: resuming batch %s of endpoint '%s' (%d requests) sent by an earlier run", self.stage,
                     entry["batch_id"], self.client.name, len(entry["lines"]))
            for key in entry["lines"]:
                self._open_ids[key] = entry["submission"]
            self._spawn(self._follow(entry))

    async def _find_created(self, entry: dict[str, Any]) -> Any:
        """The batch carrying this entry's submission key in its metadata, if the provider has one."""
        async def search() -> Any:
            async for batch in self.client.openai.batches.list(limit=100):
                if (batch.metadata or {}).get("distill_submission") == entry["submission"]:
                    return batch
                if batch.created_at < entry["created_at"] - 3600:  # newest first: older ones cannot be it
                    return None
            return None
        return await self._call("list batches", search)

    # -- plumbing --------------------------------------------------------------------------------
    async def _call(self, what: str, fn: Callable[[], Awaitable[T]]) -> T:
        """A Batch or Files API call with the endpoint's retries; a missing API or a refused key is fatal."""
        last = ""
        for attempt in range(1, self.cfg.max_retries + 2):
            try:
                return await fn()
            except openai.APIStatusError as exc:
                status, last = exc.status_code, f"HTTP {exc.status_code}: {self.client.scrub(_short(exc))}"
                key = endpoint_key(self.client.name)
                if status in (404, 405):
                    raise TeacherFatal(f"endpoint '{self.client.name}' ({self.client.url}) does not offer the "
                                       f"Batch API: {what} answered {last}; set {key}.batch=false to send its "
                                       "requests live") from None
                if status in (401, 403):
                    raise TeacherFatal(f"endpoint '{self.client.name}' ({self.client.url}) refused the API key "
                                       f"({last}); check {key}.api_key_env") from None
                if status < 500 and status not in (408, 409, 425, 429):
                    raise TeacherFatal(f"endpoint '{self.client.name}': could not {what} ({last})") from None
            except (openai.APITimeoutError, openai.APIConnectionError) as exc:
                last = f"{type(exc).__name__}: {self.client.scrub(_short(exc))}"
            if attempt <= self.cfg.max_retries:
                await asyncio.sleep(self.client.backoff(attempt))
        raise TeacherFatal(f"endpoint '{self.client.name}': could not {what} after {self.cfg.max_retries + 1} "
                           f"attempts; last error: {last}")

    def _fail_all(self, exc: BaseException) -> None:
        self._fatal = exc
        for line in [*self._queue, *(ln for lines in self._waiting.values() for ln in lines)]:
            self.client.budget.release(self.client.name, line.reserved)
            if not line.future.done():
                line.future.set_exception(exc)
        self._queue.clear()
        self._waiting.clear()


def split_by_limits(lines: list[Line], max_requests: int, max_bytes: int,
                    size: Callable[[Line], bytes]) -> list[list[Line]]:
    """Consecutive parts of at most `max_requests` lines and `max_bytes` bytes each (the provider's limits)."""
    parts: list[list[Line]] = []
    current: list[Line] = []
    used = 0
    for line in lines:
        n = len(size(line))
        if current and (len(current) >= max_requests or used + n > max_bytes):
            parts.append(current)
            current, used = [], 0
        current.append(line)
        used += n
    if current:
        parts.append(current)
    return parts


def read_result_lines(text: str, results: dict[str, ChatResult], errors: dict[str, str]) -> None:
    """Output and error file lines (unordered, by custom id): answers into `results`, reasons into `errors`."""
    for raw in text.splitlines():
        if not raw.strip():
            continue
        try:
            line = json.loads(raw)
            key = line["custom_id"]
        except (json.JSONDecodeError, KeyError, TypeError):
            continue  # a line without its custom id cannot be matched to a request
        response = line.get("response") or {}
        error = line.get("error")
        if response.get("status_code") == 200 and not error:
            try:
                results[key] = parse_completion(response.get("body") or {})
                continue
            except (ValueError, KeyError, TypeError, AttributeError) as exc:
                errors[key] = f"invalid response body ({type(exc).__name__}: {_short(exc)})"
                continue
        if error:
            errors[key] = f"{error.get('code', 'error')}: {error.get('message', '')}".strip()
        else:
            body = response.get("body") or {}
            message = (body.get("error") or {}).get("message", "") if isinstance(body, dict) else ""
            errors[key] = f"HTTP {response.get('status_code')}: {message}".strip()
