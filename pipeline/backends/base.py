"""The sampling backends' one protocol: `generate(requests, params) -> completions`, and what crosses it."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:  # the local backends stay importable without the recipe's dependencies (GPU check scripts)
    from pipeline.core.recipe import PoolModel


class BackendError(RuntimeError):
    """A pool model that cannot be loaded or used; the message names the model and what to do."""


@dataclass(frozen=True)
class SamplingParams:
    temperature: float
    top_p: float
    max_tokens: int

    @classmethod
    def of(cls, model: PoolModel) -> SamplingParams:
        return cls(model.temperature, model.top_p, model.max_tokens)


@dataclass(frozen=True)
class GenerationRequest:
    messages: list[dict[str, str]]
    seed: int  # per sample; the transformers backend seeds each batch from its first request


@dataclass
class Completion:
    text: str = ""
    finish_reason: str = "stop"  # "stop" (ended by itself) or "length" (cut at max_tokens)
    prompt_tokens: int = 0
    completion_tokens: int = 0
    error: str | None = None  # this request failed for good (it goes to the failure ledger)
    attempts: int = 1
    system_prompt_in: str = "none"  # where the system prompt went: `system` (its own turn), `user` (folded), `none`


class BackendStopped(RuntimeError):
    """The backend stopped early (budget cap, bad key): `completions` holds what finished, None elsewhere."""

    def __init__(self, message: str, completions: list[Completion | None]):
        super().__init__(message)
        self.completions = completions


class Backend(Protocol):
    def generate(self, requests: list[GenerationRequest], params: SamplingParams) -> list[Completion]: ...

    def close(self) -> None: ...

    def cost(self) -> dict[str, float]: ...
