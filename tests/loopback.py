"""A chat-completions endpoint on loopback for tests that script a server's answers (real HTTP, a uvicorn
thread): subclass or pass the request handler; `completion` builds a well-formed response body."""

from __future__ import annotations

import threading
import time
from collections.abc import Awaitable, Callable
from typing import Any

import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route


def completion(content: str, model: str = "m", prompt_tokens: int = 10, completion_tokens: int = 5) -> dict[str, Any]:
    """A chat completion with one choice."""
    return {"id": "x", "object": "chat.completion", "created": 0, "model": model,
            "choices": [{"index": 0, "finish_reason": "stop", "message": {"role": "assistant", "content": content}}],
            "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                      "total_tokens": prompt_tokens + completion_tokens}}


class LoopbackChat:
    """`/v1/chat/completions` on 127.0.0.1 and a free port, answered by `handler`; `base_url` once entered."""

    def __init__(self, handler: Callable[[Request], Awaitable[Response]]):
        app = Starlette(routes=[Route("/v1/chat/completions", handler, methods=["POST"])])
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.base_url = ""

    def __enter__(self):
        self.thread.start()
        while not self.server.started:
            time.sleep(0.01)
        self.base_url = f"http://127.0.0.1:{self.server.servers[0].sockets[0].getsockname()[1]}/v1"
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=10)
