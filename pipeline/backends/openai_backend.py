"""Any OpenAI-compatible endpoint as a pool model, through the teacher client (retries, cache, cost, budget)."""

from __future__ import annotations

import asyncio
import logging
from dataclasses import fields
from typing import TYPE_CHECKING

from pipeline.backends.base import BackendStopped, Completion, GenerationRequest, SamplingParams
from pipeline.core.chat import NONE, SYSTEM, USER, fold_system, has_system
from pipeline.core.recipe import BUILTIN_TEACHER, PoolModel, TeacherConfig
from pipeline.core.work import stream_map
from pipeline.teacher.cache import ResponseCache, cache_path
from pipeline.teacher.client import BudgetExceeded, TeacherClient, TeacherError, TeacherFatal, run_spend
from pipeline.teacher.messages import ChatRequest, Usage

if TYPE_CHECKING:
    from pipeline.core.recipe import Recipe
    from pipeline.core.store import RunStore

log = logging.getLogger(__name__)


def pool_client_config(model: PoolModel, teacher: TeacherConfig) -> TeacherConfig:
    """The teacher's settings for the pool model's endpoint; without a base_url it is the teacher's endpoint
    (prices and budget included), else another server whose prices the recipe does not know."""
    if model.base_url in (None, BUILTIN_TEACHER):
        update: dict[str, object] = {"model": model.model}
        if model.api_key_env is not None:
            update["api_key_env"] = model.api_key_env
        return teacher.model_copy(update=update)
    return teacher.model_copy(update={
        "base_url": model.base_url, "model": model.model, "api_key_env": model.api_key_env,
        "api_key_secret_block": None, "price_input_per_1k": 0.0, "price_output_per_1k": 0.0, "max_cost_usd": None})


class OpenAIBackend:
    """Requests go out concurrently (bounded by the teacher's max_concurrency) and are cached in the run."""

    def __init__(self, cfg: TeacherConfig, cache: ResponseCache | None, spent_usd: float = 0.0):
        self.cfg, self.cache = cfg, cache
        self.usage = Usage()
        self._spent_before = spent_usd
        self.refuses_system = False  # learnt from a 400 that went away with the system turn folded

    @classmethod
    def for_pool_model(cls, model: PoolModel, recipe: Recipe, store: RunStore) -> OpenAIBackend:
        spent = run_spend(store)
        cfg = pool_client_config(model, recipe.teacher)
        same_endpoint = model.base_url in (None, BUILTIN_TEACHER)
        return cls(cfg, ResponseCache(cache_path(store, recipe)), spent if same_endpoint else 0.0)

    def generate(self, requests: list[GenerationRequest], params: SamplingParams) -> list[Completion]:
        return asyncio.run(self._generate(requests, params))

    async def _generate(self, requests: list[GenerationRequest], params: SamplingParams) -> list[Completion]:
        client = TeacherClient(self.cfg, self.cache, spent_usd=self._spent_before + self.usage.usd)
        results: list[Completion | None] = [None] * len(requests)
        stopped: list[str] = []  # why it stopped; once set, no new request starts

        async def one(index: int) -> Completion:
            return await self._answer(client, requests[index], params)

        try:
            async for index, result in stream_map(range(len(requests)), one, self.cfg.max_concurrency,
                                                  stop=lambda: bool(stopped)):
                if isinstance(result, (BudgetExceeded, TeacherFatal)):
                    stopped.append(str(result))
                elif isinstance(result, TeacherError):
                    results[index] = Completion(error=result.reason, attempts=result.attempts)
                elif isinstance(result, BaseException):
                    results[index] = Completion(error=f"{type(result).__name__}: {result}")
                else:
                    results[index] = result
        finally:
            await client.aclose()
            for f in fields(Usage):
                setattr(self.usage, f.name, getattr(self.usage, f.name) + getattr(client.usage, f.name))
        if stopped:
            raise BackendStopped(stopped[0], results)
        return results  # type: ignore[return-value]  # every index is filled when nothing stopped

    async def _answer(self, client: TeacherClient, r: GenerationRequest, params: SamplingParams) -> Completion:
        """One answer; a server that refuses the system turn (HTTP 400, as Mistral's or Gemma 2's template makes
        vLLM answer) gets it folded into the first user turn, and every later request of this model too."""
        folded = self.refuses_system and has_system(r.messages)
        try:
            reply = await client.chat(self._request(r, params, folded))
        except TeacherError as refused:
            if folded or not has_system(r.messages) or not refused.reason.startswith("HTTP 400"):
                raise
            try:
                reply = await client.chat(self._request(r, params, True))
            except TeacherError as again:
                raise TeacherError(refused.reason, refused.attempts + again.attempts) from None
            if not self.refuses_system:
                log.info("sample: %s refused a system turn (%s); folding it into the user turn from now on",
                         self.cfg.model, refused.reason)
            self.refuses_system = folded = True
        placement = NONE if not has_system(r.messages) else USER if folded else SYSTEM
        return Completion(reply.text, reply.finish_reason, reply.prompt_tokens, reply.completion_tokens,
                          system_prompt_in=placement)

    @staticmethod
    def _request(r: GenerationRequest, params: SamplingParams, fold: bool) -> ChatRequest:
        messages = fold_system(r.messages) if fold else r.messages
        return ChatRequest(messages, params.temperature, params.max_tokens, params.top_p, seed=r.seed)

    def cost(self) -> dict[str, float]:
        return self.usage.as_cost()

    def close(self) -> None:
        if self.cache is not None:
            self.cache.close()
