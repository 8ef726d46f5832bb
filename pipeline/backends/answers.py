"""Pool members answer prompts: one answer per `Assignment` (a prompt, a model, a principle, a sample index),
written as a row of the completions schema (sample's answers, and feedback's on-policy answers)."""

from __future__ import annotations

import hashlib
import itertools
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import pyarrow as pa

from pipeline.backends.base import BackendStopped, Completion, GenerationRequest, SamplingParams
from pipeline.backends.pool import make_backend
from pipeline.core.arrow import schema
from pipeline.core.recipe import PoolModel, Recipe
from pipeline.core.sources import SeedPrompt
from pipeline.core.store import FailureLedger, RunStore, ShardWriter
from pipeline.core.templates import render

NO_PRINCIPLE = "none"
COMPLETIONS_SCHEMA = schema(
    ("completion_id", pa.string()), ("prompt_id", pa.string()), ("prompt", pa.string()),
    ("prompt_source", pa.string()), ("model", pa.string()), ("backend", pa.string()), ("model_path", pa.string()),
    ("principle", pa.string()), ("system_prompt", pa.string()), ("system_prompt_in", pa.string()),
    ("completion", pa.string()),
    ("finish_reason", pa.string()), ("sample_index", pa.int64()), ("seed", pa.int64()),
    ("temperature", pa.float64()), ("top_p", pa.float64()), ("max_tokens", pa.int64()),
    ("prompt_tokens", pa.int64()), ("completion_tokens", pa.int64()),
)


@dataclass(frozen=True)
class Assignment:
    """One answer to produce: a prompt, the pool model that answers it, under which principle."""

    prompt: SeedPrompt
    model: str  # the pool model's name
    principle: str
    sample_index: int = 0
    seed: int = 0

    @property
    def completion_id(self) -> str:
        return completion_id(self.prompt.prompt_id, self.model, self.sample_index)

    @property
    def sample_seed(self) -> int:
        return int(hashlib.sha256(f"{self.seed}:{self.completion_id}".encode()).hexdigest()[:8], 16)


def completion_id(prompt_id: str, model: str, sample_index: int) -> str:
    """Stable id of one answer: sha256 of prompt id, model name and sample index."""
    return hashlib.sha256(f"{prompt_id}:{model}:{sample_index}".encode()).hexdigest()


def answer_messages(prompt: str, principle: str, model: PoolModel) -> list[dict[str, str]]:
    """The conversation a pool model answers: the principle as system prompt (if it takes one), then the prompt."""
    user = {"role": "user", "content": prompt}
    if principle == NO_PRINCIPLE or not model.principles:
        return [user]
    return [{"role": "system", "content": render(f"principle_{principle}.jinja")}, user]


def completion_row(a: Assignment, model: PoolModel, messages: list[dict[str, str]], c: Completion) -> dict[str, Any]:
    system = messages[0]["content"] if messages[0]["role"] == "system" else ""
    return {
        "completion_id": a.completion_id, "prompt_id": a.prompt.prompt_id, "prompt": a.prompt.prompt,
        "prompt_source": a.prompt.source, "model": a.model, "backend": model.backend, "model_path": model.model,
        "principle": a.principle if system else NO_PRINCIPLE, "system_prompt": system,
        # where the model saw the principle: its own system turn, or the user turn (a template refusing system)
        "system_prompt_in": c.system_prompt_in if system else NO_PRINCIPLE, "completion": c.text,
        "finish_reason": c.finish_reason, "sample_index": a.sample_index, "seed": a.sample_seed,
        "temperature": model.temperature, "top_p": model.top_p, "max_tokens": model.max_tokens,
        "prompt_tokens": c.prompt_tokens, "completion_tokens": c.completion_tokens,
    }


def sample_responses(model: PoolModel, todo: Iterable[Assignment], recipe: Recipe, store: RunStore,
                     writer: ShardWriter, failures: FailureLedger, chunk: int, bar: Any = None,
                     stage: str = "sample") -> tuple[str, dict[str, float]]:
    """Load one pool model, answer its assignments (a list or a stream) chunk by chunk into the writer;
    (stop message, cost)."""
    backend = make_backend(model, recipe, store, stage)
    params = SamplingParams.of(model)
    stop = ""
    pending = iter(todo)
    try:
        while part := list(itertools.islice(pending, chunk)):
            conversations = [answer_messages(a.prompt.prompt, a.principle, model) for a in part]
            requests = [GenerationRequest(m, a.sample_seed) for a, m in zip(part, conversations, strict=True)]
            try:
                completions: list[Completion | None] = list(backend.generate(requests, params))
            except BackendStopped as stopped:
                completions, stop = stopped.completions, str(stopped)
            for a, messages, c in zip(part, conversations, completions, strict=True):
                if c is None:
                    continue  # not started: the stage stopped
                if c.error is not None:
                    failures.record(a.completion_id, f"{model.name}: {c.error}", c.attempts)
                else:
                    writer.add(completion_row(a, model, messages, c))
            writer.flush()  # a finished chunk is never redone
            if bar is not None:
                bar.update(len(part))
            if stop:
                break
    finally:
        backend.close()
    return stop, backend.cost()
