"""Load a pool model behind its backend; `sft` and `base` name this run's own models."""

from __future__ import annotations

from pipeline.backends.base import Backend, BackendError
from pipeline.core.recipe import PoolModel, Recipe
from pipeline.core.store import RunStore


def resolve_model_path(model: PoolModel, recipe: Recipe, store: RunStore) -> str:
    """`sft` -> this run's SFT model, `policy` -> the model this round starts from, `base` -> the untrained
    student, a GGUF file -> its converted model directory (converted once), anything else as given."""
    from pipeline.core import gguf
    from pipeline.train import models

    if model.model == "sft":
        return models.local_model(store, "sft")
    if model.model == "policy":
        return models.local_model(*store.policy())
    if model.model == "base":
        return models.resolve_base_model(recipe, store)
    try:
        return gguf.hf_model_dir(model.model)
    except gguf.GGUFError as exc:
        raise BackendError(f"pool model '{model.name}': {exc}") from None


def chat_template_for(model: PoolModel, recipe: Recipe, path: str) -> str | None:
    """The pool model's `chat_template` (a format name or Jinja text); for this run's untrained student (`base`)
    the format `sft` trains and saves it in, so that `base` and `sft` answer in the same format."""
    from pipeline.train import models, templates

    if model.chat_template is not None:
        return templates.template_text(model.chat_template, f"sample.pool.{model.name}.chat_template")
    if model.model != "base":
        return None
    return templates.saved_template(models.load_tokenizer(path), path, recipe.sft.chat_template,
                                    recipe.sft.replace_template)


def make_backend(model: PoolModel, recipe: Recipe, store: RunStore, stage: str = "sample") -> Backend:
    """Load one pool model behind its backend (a local model is loaded here, once); `stage` is the stage its
    paid requests are ledgered under."""
    if model.backend == "openai":
        from pipeline.backends.openai_backend import OpenAIBackend

        return OpenAIBackend.for_pool_model(model, recipe, store, stage)
    path = resolve_model_path(model, recipe, store)
    template = chat_template_for(model, recipe, path)
    if model.backend == "transformers":
        from pipeline.backends.transformers_backend import TransformersBackend

        return TransformersBackend(model, path, template)
    if model.backend == "vllm":
        from pipeline.backends.vllm_backend import VLLMBackend

        return VLLMBackend(model, path, template)
    raise BackendError(f"pool model '{model.name}': unknown backend '{model.backend}'")
