"""Sampling backends: one protocol, `generate(requests, params) -> completions`, three implementations.

`transformers` (batched, left-padded; CPU or one GPU), `openai` (any OpenAI-compatible server, through the
teacher client: retries, cache, cost), `vllm` (offline engine; imported only when a vllm model is used).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

from pipeline.recipe import PoolModel

if TYPE_CHECKING:
    from pipeline.recipe import Recipe
    from pipeline.store import RunStore


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


class BackendStopped(RuntimeError):
    """The backend stopped early (budget cap, bad key): `completions` holds what finished, None elsewhere."""

    def __init__(self, message: str, completions: list[Completion | None]):
        super().__init__(message)
        self.completions = completions


class Backend(Protocol):
    def generate(self, requests: list[GenerationRequest], params: SamplingParams) -> list[Completion]: ...

    def close(self) -> None: ...

    def cost(self) -> dict[str, float]: ...


def resolve_model_path(model: PoolModel, recipe: Recipe, store: RunStore) -> str:
    """`sft` -> this run's SFT model, `base` -> the untrained student, anything else as given."""
    from pipeline.train import common

    if model.model == "sft":
        return common.local_model(store, "sft")
    if model.model == "base":
        return common.resolve_base_model(recipe, store)
    return model.model


def make_backend(model: PoolModel, recipe: Recipe, store: RunStore) -> Backend:
    """Load one pool model behind its backend (a local model is loaded here, once)."""
    if model.backend == "openai":
        from pipeline.backends.openai_backend import OpenAIBackend

        return OpenAIBackend.for_pool_model(model, recipe, store)
    path = resolve_model_path(model, recipe, store)
    if model.backend == "transformers":
        from pipeline.backends.transformers_backend import TransformersBackend

        return TransformersBackend(model, path)
    if model.backend == "vllm":
        from pipeline.backends.vllm_backend import VLLMBackend

        return VLLMBackend(model, path)
    raise BackendError(f"pool model '{model.name}': unknown backend '{model.backend}'")
