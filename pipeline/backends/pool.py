"""Load a pool model behind its backend; `sft` and `base` name this run's own models."""

from __future__ import annotations

from pipeline.backends.base import Backend, BackendError
from pipeline.core.recipe import PoolModel, Recipe
from pipeline.core.store import RunStore


def resolve_model_path(model: PoolModel, recipe: Recipe, store: RunStore) -> str:
    """`sft` -> this run's SFT model, `base` -> the untrained student, anything else as given."""
    from pipeline.train import models

    if model.model == "sft":
        return models.local_model(store, "sft")
    if model.model == "base":
        return models.resolve_base_model(recipe, store)
    return model.model


def make_backend(model: PoolModel, recipe: Recipe, store: RunStore, stage: str = "sample") -> Backend:
    """Load one pool model behind its backend (a local model is loaded here, once); `stage` is the stage its
    paid requests are ledgered under."""
    if model.backend == "openai":
        from pipeline.backends.openai_backend import OpenAIBackend

        return OpenAIBackend.for_pool_model(model, recipe, store, stage)
    path = resolve_model_path(model, recipe, store)
    if model.backend == "transformers":
        from pipeline.backends.transformers_backend import TransformersBackend

        return TransformersBackend(model, path)
    if model.backend == "vllm":
        from pipeline.backends.vllm_backend import VLLMBackend

        return VLLMBackend(model, path)
    raise BackendError(f"pool model '{model.name}': unknown backend '{model.backend}'")
