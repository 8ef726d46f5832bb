"""Any OpenAI-compatible endpoint as a pool model, through the teacher client (retries, cache, ledger, budget,
batches): the member's `endpoint` (or the teacher's) says where it is sent and what it costs."""

from __future__ import annotations

import asyncio
import logging
from typing import TYPE_CHECKING

from pipeline.backends.base import BackendStopped, Completion, GenerationRequest, SamplingParams
from pipeline.core.chat import NONE, SYSTEM, USER, fold_system, has_system
from pipeline.core.recipe import PoolModel, pool_endpoint
from pipeline.core.work import stream_map
from pipeline.teacher.client import BudgetExceeded, TeacherError, TeacherFatal
from pipeline.teacher.messages import ChatRequest, Usage
from pipeline.teacher.session import BATCH_ITEMS_IN_FLIGHT, teacher_session

if TYPE_CHECKING:
    from pipeline.core.recipe import Recipe
    from pipeline.core.store import RunStore
    from pipeline.teacher.session import RoleClient

log = logging.getLogger(__name__)


class OpenAIBackend:
    """Requests go out concurrently (bounded by the endpoint's max_concurrency, or as one batch per call when it
    uses the Batch API), cached and ledgered in the run under role `pool:<member>`."""

    def __init__(self, member: PoolModel, recipe: Recipe, store: RunStore, stage: str):
        self.member, self.recipe, self.store, self.stage = member, recipe, store, stage
        self.endpoint, self.cfg = pool_endpoint(recipe, member)
        self.usage = Usage()
        self.refuses_system = False  # learnt from a 400 that went away with the system turn folded

    @classmethod
    def for_pool_model(cls, model: PoolModel, recipe: Recipe, store: RunStore, stage: str = "sample") -> OpenAIBackend:
        return cls(model, recipe, store, stage)

    def generate(self, requests: list[GenerationRequest], params: SamplingParams) -> list[Completion]:
        return asyncio.run(self._generate(requests, params))

    async def _generate(self, requests: list[GenerationRequest], params: SamplingParams) -> list[Completion]:
        results: list[Completion | None] = [None] * len(requests)
        stopped: list[str] = []  # why it stopped; once set, no new request starts
        async with teacher_session(self.recipe, self.store, self.stage) as session:
            client = session.for_pool_member(self.member)

            async def one(index: int) -> Completion:
                return await self._answer(client, requests[index], params)

            concurrency = BATCH_ITEMS_IN_FLIGHT if self.cfg.batch else self.cfg.concurrency_cap
            try:
                async for index, result in stream_map(range(len(requests)), one, concurrency,
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
                self.usage.add(client.usage)
        if stopped:
            raise BackendStopped(stopped[0], results)
        return results  # type: ignore[return-value]  # every index is filled when nothing stopped

    async def _answer(self, client: RoleClient, r: GenerationRequest, params: SamplingParams) -> Completion:
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
        """Nothing is held between calls: each call opens and closes its own session."""
