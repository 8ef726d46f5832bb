"""What crosses the teacher client's boundary: a chat request, its result, and usage counts."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any


@dataclass(frozen=True)
class ChatRequest:
    messages: list[dict[str, str]]
    temperature: float = 0.0
    max_tokens: int = 512
    top_p: float = 1.0
    n: int = 1
    seed: int | None = None
    tag: str = ""  # tells apart requests that must not share a cache entry (a deliberate re-ask)
    # OpenAI's `{"type": "json_schema", "json_schema": {...}}`: sent as is, so part of the cache key too
    response_format: dict[str, Any] | None = None

    def params(self) -> dict[str, Any]:
        p: dict[str, Any] = {"temperature": self.temperature, "max_tokens": self.max_tokens, "n": self.n}
        if self.top_p != 1.0:
            p["top_p"] = self.top_p
        if self.seed is not None:
            p["seed"] = self.seed
        if self.response_format is not None:
            p["response_format"] = self.response_format
        return p


@dataclass
class ChatResult:
    texts: list[str]
    finish_reasons: list[str]
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached: bool = False

    @property
    def text(self) -> str:
        return self.texts[0]

    @property
    def finish_reason(self) -> str:
        return self.finish_reasons[0]


@dataclass
class Usage:
    requests: int = 0  # successful requests paid for in this process
    batch_requests: int = 0  # of which answered through the Batch API
    cached: int = 0  # answered from the cache, free
    attempts: int = 0  # HTTP attempts, retries included
    retries: int = 0
    throttled: int = 0  # attempts the endpoint refused for load (429, 503)
    prompt_tokens: int = 0
    completion_tokens: int = 0
    usd: float = 0.0

    def as_cost(self) -> dict[str, float]:
        return {k: float(v) for k, v in asdict(self).items()}

    def add(self, other: Usage) -> None:
        for key, value in asdict(other).items():
            setattr(self, key, getattr(self, key) + value)
