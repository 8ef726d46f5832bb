"""The toy teacher's Batch API, in OpenAI's shape: `/v1/files` (purpose=batch) and `/v1/batches`.

A batch goes validating -> in_progress -> finalizing -> completed (or failed when its input is malformed,
expired when `batch_expired_share` of its lines are left undone, cancelled on request). Output and error
files hold one line per request with its `custom_id`, in no particular order. Options: a share of lines
that fail (`batch_fail_rate`), how long a batch stays in_progress (`batch_in_progress_s`). The server counts
batches created and lines answered, so tests can tell that nothing was sent or answered twice.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import random
import time
from collections import Counter
from collections.abc import Callable
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

CHAT_URL = "/v1/chat/completions"
ErrorFn = Callable[..., JSONResponse]


class ToyBatchAPI:
    """Files and batches kept in memory; `answer(body)` is the teacher's chat completion for one request body."""

    def __init__(self, config: Any, answer: Callable[[dict[str, Any]], dict[str, Any]],
                 authorized: Callable[[Request], bool], error: ErrorFn):
        self.config, self.answer, self.authorized, self.error = config, answer, authorized, error
        self._ids = itertools.count()
        self.files: dict[str, dict[str, Any]] = {}
        self.batches: dict[str, dict[str, Any]] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        self.reset()

    def reset(self) -> None:
        self.rng = random.Random(self.config.fault_seed + 1)
        self.created = 0
        self.lines: Counter[str] = Counter()  # ok, failed, expired
        self.ok_keys: Counter[str] = Counter()  # request key -> times answered in a batch
        self.submitted: Counter[str] = Counter()  # custom id -> batches it was sent in
        self.roles_ok: Counter[str] = Counter()
        self.tokens: Counter[str] = Counter()

    def routes(self) -> list[Route]:
        return [Route("/v1/files", self.upload, methods=["POST"]),
                Route("/v1/files/{file_id}", self.file_info, methods=["GET"]),
                Route("/v1/files/{file_id}/content", self.file_content, methods=["GET"]),
                Route("/v1/batches", self.create, methods=["POST"]),
                Route("/v1/batches", self.list, methods=["GET"]),
                Route("/v1/batches/{batch_id}", self.retrieve, methods=["GET"]),
                Route("/v1/batches/{batch_id}/cancel", self.cancel, methods=["POST"])]

    def stats(self) -> dict[str, Any]:
        return {"created": self.created, "lines": dict(self.lines), "ok_keys": dict(self.ok_keys),
                "submitted": dict(self.submitted), "roles_ok": dict(self.roles_ok), "tokens": dict(self.tokens),
                "statuses": dict(Counter(b["status"] for b in self.batches.values()))}

    # -- files -------------------------------------------------------------------------------------
    def _new_id(self, prefix: str) -> str:
        return f"{prefix}-toy{next(self._ids):06d}"

    def _store_file(self, data: bytes, filename: str, purpose: str) -> dict[str, Any]:
        file = {"id": self._new_id("file"), "object": "file", "bytes": len(data), "created_at": int(time.time()),
                "filename": filename, "purpose": purpose, "status": "processed"}
        self.files[file["id"]] = {**file, "data": data}
        return file

    async def upload(self, request: Request) -> Response:
        if not self.authorized(request):
            return self.error(401, "Incorrect or missing API key.", "invalid_request_error")
        form = await request.form()
        upload, purpose = form.get("file"), form.get("purpose")
        if upload is None or isinstance(upload, str) or purpose != "batch":
            return self.error(400, "expected a multipart upload with `file` and purpose=batch",
                              "invalid_request_error")
        return JSONResponse(self._store_file(await upload.read(), upload.filename or "input.jsonl", "batch"))

    def _file(self, request: Request) -> dict[str, Any] | None:
        return self.files.get(request.path_params["file_id"]) if self.authorized(request) else None

    async def file_info(self, request: Request) -> Response:
        file = self._file(request)
        if file is None:
            return self.error(404, "No such file.", "invalid_request_error")
        return JSONResponse({k: v for k, v in file.items() if k != "data"})

    async def file_content(self, request: Request) -> Response:
        file = self._file(request)
        if file is None:
            return self.error(404, "No such file.", "invalid_request_error")
        return Response(file["data"], media_type="application/jsonl")

    # -- batches -----------------------------------------------------------------------------------
    async def create(self, request: Request) -> Response:
        if not self.authorized(request):
            return self.error(401, "Incorrect or missing API key.", "invalid_request_error")
        body = json.loads(await request.body() or b"{}")
        if body.get("input_file_id") not in self.files:
            return self.error(400, f"no file {body.get('input_file_id')!r}", "invalid_request_error")
        if body.get("endpoint") != CHAT_URL or body.get("completion_window") != "24h":
            return self.error(400, f"endpoint must be {CHAT_URL} and completion_window 24h", "invalid_request_error")
        now = int(time.time())
        batch = {"id": self._new_id("batch"), "object": "batch", "endpoint": CHAT_URL, "errors": None,
                 "input_file_id": body["input_file_id"], "completion_window": "24h", "status": "validating",
                 "output_file_id": None, "error_file_id": None, "created_at": now, "in_progress_at": None,
                 "expires_at": now + 86400, "finalizing_at": None, "completed_at": None, "failed_at": None,
                 "expired_at": None, "cancelling_at": None, "cancelled_at": None,
                 "request_counts": {"total": 0, "completed": 0, "failed": 0}, "metadata": body.get("metadata") or {}}
        self.batches[batch["id"]] = batch
        self.created += 1
        task = asyncio.create_task(self._process(batch))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return JSONResponse(batch)

    async def retrieve(self, request: Request) -> Response:
        batch = self.batches.get(request.path_params["batch_id"]) if self.authorized(request) else None
        if batch is None:
            return self.error(404, "No such batch.", "invalid_request_error")
        return JSONResponse(batch)

    async def list(self, request: Request) -> Response:
        if not self.authorized(request):
            return self.error(401, "Incorrect or missing API key.", "invalid_request_error")
        newest = sorted(self.batches.values(), key=lambda b: b["id"], reverse=True)
        after = request.query_params.get("after")
        if after:
            newest = [b for b in newest if b["id"] < after]
        limit = int(request.query_params.get("limit", 20))
        page = newest[:limit]
        return JSONResponse({"object": "list", "data": page, "first_id": page[0]["id"] if page else None,
                             "last_id": page[-1]["id"] if page else None, "has_more": len(newest) > limit})

    async def cancel(self, request: Request) -> Response:
        batch = self.batches.get(request.path_params["batch_id"]) if self.authorized(request) else None
        if batch is None:
            return self.error(404, "No such batch.", "invalid_request_error")
        if batch["status"] in ("validating", "in_progress"):
            batch.update(status="cancelling", cancelling_at=int(time.time()))
        return JSONResponse(batch)

    # -- processing ----------------------------------------------------------------------------------
    def _parse(self, batch: dict[str, Any]) -> list[dict[str, Any]] | str:
        lines = []
        for number, raw in enumerate(self.files[batch["input_file_id"]]["data"].decode().splitlines(), 1):
            if not raw.strip():
                continue
            try:
                line = json.loads(raw)
                if line.get("url") != CHAT_URL or line.get("method") != "POST" or not line.get("custom_id"):
                    raise ValueError(f"needs custom_id, method POST and url {CHAT_URL}")
                if not isinstance(line.get("body"), dict):
                    raise ValueError("body must be an object")
            except (json.JSONDecodeError, ValueError, AttributeError) as exc:
                return f"line {number}: {exc}"
            lines.append(line)
        if len({ln["custom_id"] for ln in lines}) != len(lines):
            return "custom_id values must be unique within a batch"
        return lines

    async def _process(self, batch: dict[str, Any]) -> None:
        await asyncio.sleep(0.02)
        lines = self._parse(batch)
        now = int(time.time())
        if isinstance(lines, str):
            batch.update(status="failed", failed_at=now,
                         errors={"object": "list", "data": [{"code": "invalid_request", "message": lines}]})
            return
        self.submitted.update(ln["custom_id"] for ln in lines)
        batch.update(status="in_progress", in_progress_at=now)
        batch["request_counts"]["total"] = len(lines)
        await asyncio.sleep(self.config.batch_in_progress_s)
        order = list(range(len(lines)))
        self.rng.shuffle(order)  # results come back in no particular order
        undone = round(len(lines) * self.config.batch_expired_share)
        output, errors = [], []
        for count, index in enumerate(order):
            if batch["status"] == "cancelling":
                break
            line = lines[index]
            if count >= len(lines) - undone:
                errors.append(self._error_line(line, None, "batch_expired",
                                               "This request could not be executed before the window expired."))
                self.lines["expired"] += 1
                continue
            out, ok = self._run_line(line)
            (output if ok else errors).append(out)
            batch["request_counts"]["completed" if ok else "failed"] += 1
            if count % 50 == 49:
                await asyncio.sleep(0)  # let polls see the counts move
        self._finish(batch, output, errors, expired=undone > 0)

    def _run_line(self, line: dict[str, Any]) -> tuple[dict[str, Any], bool]:
        if self.rng.random() < self.config.batch_fail_rate:
            self.lines["failed"] += 1
            return self._error_line(line, 500, "server_error", "The toy teacher failed this line (injected)."), False
        try:
            body = self.answer({**line["body"]})
        except (ValueError, KeyError, TypeError) as exc:
            self.lines["failed"] += 1
            return self._error_line(line, 400, "invalid_request_error", f"Bad chat-completions request: {exc}"), False
        self.lines["ok"] += 1
        self.ok_keys[body.pop("_request_key")] += 1
        self.roles_ok[body.pop("_role")] += 1
        self.tokens["prompt"] += body["usage"]["prompt_tokens"]
        self.tokens["completion"] += body["usage"]["completion_tokens"]
        return {"id": self._new_id("batch_req"), "custom_id": line["custom_id"],
                "response": {"status_code": 200, "request_id": self._new_id("req"), "body": body}, "error": None}, True

    def _error_line(self, line: dict[str, Any], status: int | None, code: str, message: str) -> dict[str, Any]:
        if status is None:  # expired: never executed
            return {"id": self._new_id("batch_req"), "custom_id": line["custom_id"], "response": None,
                    "error": {"code": code, "message": message}}
        return {"id": self._new_id("batch_req"), "custom_id": line["custom_id"], "error": None,
                "response": {"status_code": status, "request_id": self._new_id("req"),
                             "body": {"error": {"message": message, "type": code}}}}

    def _finish(self, batch: dict[str, Any], output: list[dict], errors: list[dict], expired: bool) -> None:
        now = int(time.time())
        cancelled = batch["status"] == "cancelling"
        batch.update(status="finalizing", finalizing_at=now)

        def jsonl(rows: list[dict]) -> bytes:
            return "".join(json.dumps(r) + "\n" for r in rows).encode()

        if output:
            batch["output_file_id"] = self._store_file(jsonl(output), "output.jsonl", "batch_output")["id"]
        if errors:
            batch["error_file_id"] = self._store_file(jsonl(errors), "errors.jsonl", "batch_output")["id"]
        if cancelled:
            batch.update(status="cancelled", cancelled_at=now)
        elif expired:
            batch.update(status="expired", expired_at=now)
        else:
            batch.update(status="completed", completed_at=now)
