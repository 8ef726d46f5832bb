"""A rule-based toy teacher served over the real OpenAI chat-completions protocol on loopback."""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import hmac
import itertools
import json
import os
import random
import re
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections import Counter
from pathlib import Path
from typing import Any

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from pipeline.core import processes
from pipeline.tasks.toy.batch_api import ToyBatchAPI
from pipeline.tasks.toy.teacher_roles import (
    FAULTS,
    SCHEMA_ROLES,
    ToyRoles,
    ToyTeacherConfig,
    count_tokens,
    detect_role,
    message_text,
)

__all__ = ["ToyTeacher", "ToyTeacherConfig", "create_app", "request_key", "serve"]

API_KEY_ENV = "TOY_TEACHER_API_KEY"
SAMPLING_KEYS = ("temperature", "top_p", "n", "max_tokens", "max_completion_tokens", "seed", "stop",
                 "presence_penalty", "frequency_penalty", "response_format")


def request_key(body: dict[str, Any]) -> str:
    """sha256 of the canonical JSON of model, messages and sampling params: the identity of a request."""
    ident = {k: body[k] for k in ("model", "messages", *SAMPLING_KEYS) if k in body}
    return hashlib.sha256(json.dumps(ident, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def _truncate(text: str, max_words: int | None) -> tuple[str, str]:
    words = list(re.finditer(r"\S+", text))
    if max_words is None or len(words) <= max_words:
        return text, "stop"
    return (text[: words[max_words - 1].end()] if max_words > 0 else ""), "length"


def _error(status: int, message: str, kind: str, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"error": {"message": message, "type": kind, "code": status}}, status, headers=headers)


class ToyTeacherApp:
    """Request handling, fault injection and statistics around `ToyRoles`."""

    def __init__(self, config: ToyTeacherConfig) -> None:
        self.config = config
        self.roles = ToyRoles(config)
        self._ids = itertools.count()
        self.batch = ToyBatchAPI(config, self.answer, self._authorized, _error)
        self.hold_after: int | None = None  # tests: answer this many, then hold every request until released
        self._released = asyncio.Event()
        self.reset()

    def reset(self) -> None:
        self.fault_rng = random.Random(self.config.fault_seed)
        self.requests = 0
        self.outcomes: Counter[str] = Counter()
        self.roles_ok: Counter[str] = Counter()
        self.ok_keys: Counter[str] = Counter()
        self.tokens: Counter[str] = Counter()
        self.in_flight = self.in_flight_max = 0
        self.batch.reset()

    def _fault(self) -> str | None:
        draw, edge = self.fault_rng.random(), 0.0
        for name in FAULTS:
            edge += getattr(self.config, name)
            if draw < edge:
                return name.removeprefix("fault_")
        return None

    def _authorized(self, request: Request) -> bool:
        if not self.config.api_key:
            return True
        given = request.headers.get("authorization", "").encode()
        return hmac.compare_digest(given, f"Bearer {self.config.api_key}".encode())

    async def chat(self, request: Request) -> Response:
        self.requests += 1
        self.in_flight += 1
        self.in_flight_max = max(self.in_flight_max, self.in_flight)
        try:
            if self.config.max_concurrent is not None and self.in_flight > self.config.max_concurrent:
                self.outcomes["over_limit"] += 1
                return _error(429, f"Too many requests at once (limit {self.config.max_concurrent}).",
                              "rate_limit_error")
            return await self._chat(request)
        finally:
            self.in_flight -= 1

    async def _chat(self, request: Request) -> Response:
        if not self._authorized(request):
            self.outcomes["401"] += 1
            return _error(401, "Incorrect or missing API key.", "invalid_request_error")
        fault = self._fault()
        if fault == "hang":
            self.outcomes["hang"] += 1
            await asyncio.sleep(self.config.hang_s)
            return _error(500, "The toy teacher hung.", "server_error")
        if self.config.latency_ms:
            await asyncio.sleep(self.config.latency_ms / 1000)
        if fault == "429":
            self.outcomes["429"] += 1
            retry = f"{self.config.retry_after_s:g}"
            return _error(429, "Rate limit reached (injected).", "rate_limit_error", {"Retry-After": retry})
        if fault == "500":
            self.outcomes["500"] += 1
            return _error(500, "Internal error (injected).", "server_error")
        if fault == "bad_json":
            self.outcomes["bad_json"] += 1
            return Response('{"id": "chatcmpl-broken", "choices": [', 200, media_type="application/json")
        try:
            body = json.loads(await request.body())
            answer = self.answer(body)
        except (ValueError, KeyError, TypeError) as exc:
            self.outcomes["400"] += 1
            return _error(400, f"Bad chat-completions request: {exc}", "invalid_request_error")
        if self.config.structured_unsupported and body.get("response_format"):
            self.outcomes["400_response_format"] += 1
            return _error(400, "response_format is not supported", "invalid_request_error")
        if self.config.refuse_system and any(m.get("role") == "system" for m in body["messages"]):
            self.outcomes["400_system"] += 1
            return _error(400, "System role not supported", "invalid_request_error")
        if self.hold_after is not None and self.outcomes["ok"] >= self.hold_after:
            await self._released.wait()
            if await request.is_disconnected():  # its client is gone: nothing answered, nothing counted
                return _error(499, "Client closed the request.", "client_closed")
        self.outcomes["ok"] += 1
        self.roles_ok[answer.pop("_role")] += 1
        self.ok_keys[answer.pop("_request_key")] += 1
        self.tokens["prompt"] += answer["usage"]["prompt_tokens"]
        self.tokens["completion"] += answer["usage"]["completion_tokens"]
        return JSONResponse(answer)

    def answer(self, body: dict[str, Any]) -> dict[str, Any]:
        """The chat completion for a request body (live or a batch line), with its `_role` and `_request_key`
        for the caller's counts; ValueError if the body is not a chat request."""
        messages = body["messages"]
        n = int(body.get("n") or 1)
        if not isinstance(messages, list) or not messages or not all(isinstance(m, dict) for m in messages):
            raise ValueError("messages must be a non-empty list of objects")
        if not 1 <= n <= 128:
            raise ValueError(f"n must lie in 1..128, got {n}")
        key = request_key(body)
        fmt = body.get("response_format") or {}
        schema = (fmt.get("json_schema") or {}).get("schema") if fmt.get("type") == "json_schema" else None
        role = detect_role(messages, fmt if schema is not None else None)
        temperature = body.get("temperature")
        varied = temperature is None or float(temperature) > 0  # the API's default temperature is 1
        max_words = body.get("max_completion_tokens") or body.get("max_tokens")
        choices = []
        for index in range(n):
            rng = random.Random(f"{key}:{index}" if varied else key)
            if schema is not None and role in SCHEMA_ROLES.values():
                content, finish = self.roles.structured(role, messages, rng, varied, schema), "stop"
            else:
                content, finish = _truncate(self.roles.answer(role, messages, rng, varied), max_words)
            message = {"role": "assistant", "content": content}
            choices.append({"index": index, "message": message, "finish_reason": finish, "logprobs": None})
        prompt_tokens = sum(count_tokens(message_text(m.get("content"))) for m in messages)
        completion_tokens = sum(count_tokens(c["message"]["content"]) for c in choices)
        return {"_role": role, "_request_key": key,
            "id": f"chatcmpl-toy{next(self._ids):08d}", "object": "chat.completion", "created": int(time.time()),
            "model": body.get("model", "toy-teacher"), "choices": choices, "system_fingerprint": "toy",
            "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                      "total_tokens": prompt_tokens + completion_tokens},
        }

    async def models(self, request: Request) -> Response:
        if not self._authorized(request):  # not counted: stats describe chat requests only
            return _error(401, "Incorrect or missing API key.", "invalid_request_error")
        model = {"id": "toy-teacher", "object": "model", "created": 0, "owned_by": "toy"}
        return JSONResponse({"object": "list", "data": [model]})

    async def health(self, request: Request) -> Response:
        return JSONResponse({"status": "ok"})

    async def stats(self, request: Request) -> Response:
        """Live chat requests (`requests`, `outcomes`, `roles_ok`, `ok_keys`, `tokens`) and `batch` counts."""
        return JSONResponse({
            "requests": self.requests, "outcomes": dict(self.outcomes), "roles_ok": dict(self.roles_ok),
            "ok_keys": dict(self.ok_keys), "tokens": dict(self.tokens), "in_flight": self.in_flight,
            "in_flight_max": self.in_flight_max, "batch": self.batch.stats(),
        })

    async def reset_stats(self, request: Request) -> Response:
        self.reset()
        return JSONResponse({"status": "reset"})

    async def control(self, request: Request) -> Response:
        """Tests: `{"hold_after": N}` holds live requests once N were answered; `{"release": true}` lets them go."""
        body = json.loads(await request.body() or b"{}")
        if "hold_after" in body:
            self.hold_after = body["hold_after"]
            self._released.clear()
        if body.get("release"):
            self.hold_after = None
            self._released.set()
        return JSONResponse({"hold_after": self.hold_after})


def create_app(config: ToyTeacherConfig) -> Starlette:
    """The Starlette app of the toy teacher (with the Batch API unless `batch_api` is false)."""
    teacher = ToyTeacherApp(config)
    return Starlette(routes=[
        Route("/v1/chat/completions", teacher.chat, methods=["POST"]),
        Route("/v1/models", teacher.models, methods=["GET"]),
        Route("/health", teacher.health, methods=["GET"]),
        Route("/stats", teacher.stats, methods=["GET"]),
        Route("/stats/reset", teacher.reset_stats, methods=["POST"]),
        Route("/control", teacher.control, methods=["POST"]),
        *(teacher.batch.routes() if config.batch_api else []),
    ])


def _run(config: ToyTeacherConfig, host: str, port: int, port_file: str | None = None) -> None:
    import uvicorn  # only the serving process needs it

    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    server = uvicorn.Server(uvicorn.Config(create_app(config), log_level="warning", access_log=False,
                                           lifespan="off", timeout_graceful_shutdown=0.5))
    print(f"toy teacher on http://{host}:{sock.getsockname()[1]}/v1", file=sys.stderr, flush=True)
    if port_file:
        tmp = Path(port_file + ".tmp")
        tmp.write_text(str(sock.getsockname()[1]))
        tmp.rename(port_file)
    server.run(sockets=[sock])


def serve(config: ToyTeacherConfig, host: str = "127.0.0.1", port: int = 8000) -> None:
    """Serve the toy teacher until interrupted (blocking)."""
    _run(config, host, port)


class ToyTeacher:
    """Runs the toy teacher in a subprocess on a free port; use as a context manager."""

    def __init__(self, config: ToyTeacherConfig | None = None, port: int = 0, host: str = "127.0.0.1",
                 startup_timeout_s: float = 30.0) -> None:
        self.config = config or ToyTeacherConfig()
        self.host, self.port = host, port
        self.startup_timeout_s = startup_timeout_s
        self._proc: processes.Child | None = None
        self._tmp: tempfile.TemporaryDirectory[str] | None = None

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    @property
    def base_url(self) -> str:
        return f"{self.url}/v1"

    def start(self) -> ToyTeacher:
        """Start the subprocess and wait until /health answers."""
        self._tmp = tempfile.TemporaryDirectory(prefix="toy-teacher-")
        port_file, log_file = Path(self._tmp.name, "port"), Path(self._tmp.name, "stderr.log")
        env = dict(os.environ)
        env.pop(API_KEY_ENV, None)
        if self.config.api_key:
            env[API_KEY_ENV] = self.config.api_key  # never on argv, where `ps` shows it
        root = str(Path(__file__).resolve().parents[3])
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [root, env.get("PYTHONPATH")]))
        public = self.config.model_dump(mode="json")  # the key is excluded: it goes by environment
        cmd = [sys.executable, "-m", "pipeline.tasks.toy.teacher_server", "--host", self.host, "--port", str(self.port),
               "--config-json", json.dumps(public), "--port-file", str(port_file)]
        with open(log_file, "wb") as log:
            self._proc = processes.start(cmd, env=env, stdout=subprocess.DEVNULL, stderr=log, start_new_session=True)
        deadline = time.monotonic() + self.startup_timeout_s
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                self._tmp.cleanup()
                raise RuntimeError(f"toy teacher exited with {self._proc.returncode}: {log_file.read_text()[-2000:]}")
            if port_file.exists():
                self.port = int(port_file.read_text())
                try:
                    self._get("/health")
                    return self
                except OSError:
                    pass
            time.sleep(0.02)
        self.stop()
        raise TimeoutError(f"toy teacher did not answer /health within {self.startup_timeout_s} s")

    def _get(self, path: str, method: str = "GET", body: dict[str, Any] | None = None) -> dict[str, Any]:
        data = json.dumps(body).encode() if body is not None else None
        request = urllib.request.Request(self.url + path, method=method, data=data)
        with urllib.request.urlopen(request, timeout=10) as response:
            return json.loads(response.read())

    def hold(self, after: int) -> None:
        """Answer `after` live requests in all, then hold the rest until `release()` (a quiet moment for a kill)."""
        self._get("/control", "POST", {"hold_after": after})

    def release(self) -> None:
        self._get("/control", "POST", {"release": True})

    def stats(self) -> dict[str, Any]:
        """The server's counters (see `ToyTeacherApp.stats`)."""
        return self._get("/stats")

    def reset_stats(self) -> None:
        """Zero the counters and restart the fault sequence."""
        self._get("/stats/reset", method="POST")

    def stop(self) -> None:
        """Terminate the subprocess (killed if it does not exit within a few seconds)."""
        if self._proc is not None:
            self._proc.stop()
        self._proc = None
        if self._tmp is not None:
            self._tmp.cleanup()
            self._tmp = None

    def __enter__(self) -> ToyTeacher:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def parse_args(argv: list[str] | None = None) -> tuple[ToyTeacherConfig, argparse.Namespace]:
    """The config from `--config-json`, overridden by flags; the API key comes from the environment."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000, help="0 picks a free port")
    parser.add_argument("--config-json", help="a JSON object of ToyTeacherConfig fields (flags override it)")
    parser.add_argument("--api-key-env", default=API_KEY_ENV, help="environment variable holding the API key")
    parser.add_argument("--port-file", help=argparse.SUPPRESS)
    fields = {name: f for name, f in ToyTeacherConfig.model_fields.items() if name != "api_key"}
    for name, f in fields.items():
        flag = "--" + name.replace("_", "-")
        if f.annotation in (bool, "bool"):
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=None)
        else:
            parser.add_argument(flag, type=int if f.annotation in (int, "int") else float, default=None)
    args = parser.parse_args(argv)
    data = json.loads(args.config_json) if args.config_json else {}
    data.update({name: getattr(args, name) for name in fields if getattr(args, name) is not None})
    return ToyTeacherConfig(**data, api_key=os.environ.get(args.api_key_env)), args


def main(argv: list[str] | None = None) -> None:
    """Command line: `python -m pipeline.tasks.toy.teacher_server --port P [--error-rate R] ...`."""
    config, args = parse_args(argv)
    _run(config, args.host, args.port, args.port_file)


if __name__ == "__main__":
    main()
