"""A stage's teacher session: one client per endpoint (and model), a client for each role, one budget and one
spend ledger for them all. `session.for_role("judge")` is the only way a stage reaches an endpoint."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from pipeline.core.recipe import (
    PoolModel,
    Recipe,
    TeacherConfig,
    all_endpoints,
    endpoint_key,
    pool_endpoint,
    role_endpoint,
)
from pipeline.core.store import RunStore
from pipeline.teacher.batch import BatchDriver
from pipeline.teacher.batch_journal import BatchJournal
from pipeline.teacher.budget import Budget
from pipeline.teacher.cache import open_cache
from pipeline.teacher.client import Activity, TeacherClient
from pipeline.teacher.messages import ChatRequest, ChatResult, Usage
from pipeline.teacher.structured import ParseTally

# Items a stage keeps in flight when a role's endpoint batches: every one of them joins the round, so a
# round is this big at most (split into files by the provider's limits); more items wait for the next wave.
BATCH_ITEMS_IN_FLIGHT = 100_000


class RoleClient:
    """A client bound to a role: stages call `chat` on it; its requests are ledgered under the role."""

    def __init__(self, client: TeacherClient, role: str, tally: ParseTally | None = None):
        self.client, self.role = client, role
        self.tally = tally if tally is not None else ParseTally(client.cfg.structured)

    @property
    def cfg(self) -> TeacherConfig:
        return self.client.cfg

    @property
    def endpoint(self) -> str:
        return self.client.name

    @property
    def usage(self) -> Usage:
        return self.client.usage

    async def chat(self, request: ChatRequest) -> ChatResult:
        return await self.client.chat(request, self.role)

    async def structured(self) -> bool:
        """Whether to ask for a schema-constrained reply now (the endpoint's `structured`, after any fallback)."""
        on = await self.client.structured_mode()
        self.tally.used = "structured" if on else ("text after a fallback" if self.client.structured_fallback
                                                   else "text")
        self.tally.fallback = self.client.structured_fallback
        return on

    def mark_unusable(self, request: ChatRequest, why: str) -> None:
        self.client.mark_unusable(request, why)

    def unusable(self, request: ChatRequest) -> tuple[ChatResult, str] | None:
        return self.client.unusable(request)


class TeacherSession:
    """The clients of one stage, sharing the run's response cache, spend ledger and budget."""

    def __init__(self, recipe: Recipe, store: RunStore, stage: str):
        # ledgered under the stage's manifest entry: a later round's spend (`feedback@2`) is its own row
        self.recipe, self.store, self.stage = recipe, store, store.state_key(stage)
        self.cache = open_cache(store, recipe.storage.cache_dir)
        # the run's spend so far is the ledger's: killed and reset stages included
        self.budget = Budget(recipe.budget.max_cost_usd, self.cache.ledger.totals_by_endpoint())
        for name, cfg in all_endpoints(recipe).items():
            self.budget.set_cap(name, cfg.max_cost_usd, endpoint_key(name))
        self.activity = Activity()
        self._clients: dict[tuple[str, str, str | None], TeacherClient] = {}
        self._drivers: list[BatchDriver] = []
        self.tallies: dict[str, ParseTally] = {}  # how each role's replies parsed, by `role` or `role@endpoint`

    def for_role(self, role: str) -> RoleClient:
        """The client for `role` (assistant, user_simulator, instruction_writer, rater, judge)."""
        name, cfg = role_endpoint(self.recipe, role)
        return RoleClient(self._client(name, cfg), role, self._tally(role, cfg))

    def for_endpoint(self, name: str, role: str) -> RoleClient:
        """The client of a named endpoint playing `role` (a feedback panel's raters): ledgered under that endpoint."""
        cfg = all_endpoints(self.recipe)[name]
        return RoleClient(self._client(name, cfg), role, self._tally(f"{role}@{name}", cfg))

    def _tally(self, key: str, cfg: TeacherConfig) -> ParseTally:
        return self.tallies.setdefault(key, ParseTally(cfg.structured))

    def parse_tallies(self) -> dict[str, dict[str, object]]:
        """Each role's parse tally of this session (what the stage reports say about modes and parse rates)."""
        return {key: t.as_dict() for key, t in self.tallies.items()}

    def for_pool_member(self, member: PoolModel) -> RoleClient:
        """The client for an `openai` pool member (ledgered as role `pool:<name>`)."""
        name, cfg = pool_endpoint(self.recipe, member)
        return RoleClient(self._client(name, cfg), f"pool:{member.name}")

    def concurrency(self, *roles: str, live_factor: int = 1) -> int:
        """Items a stage keeps in flight for these roles: a whole round when one of their endpoints batches,
        else `live_factor` times the largest max_concurrency (auto: its ceiling, so the limit can grow)."""
        cfgs = [role_endpoint(self.recipe, r)[1] for r in roles]
        if any(c.batch for c in cfgs):
            return BATCH_ITEMS_IN_FLIGHT
        return live_factor * max(c.concurrency_cap for c in cfgs)

    def concurrency_settled(self) -> dict[str, dict[str, Any]]:
        """Per endpoint this stage sent live requests to: the concurrency it ran at (auto: where it settled,
        the highest it reached) and the 429/503 answers it got."""
        return {client.name: client.concurrency_summary() for client in self._clients.values()
                if client.usage.attempts}

    def usage(self) -> dict[str, float]:
        """What this stage's requests cost, all endpoints together (the stage report's `cost`)."""
        total = Usage()
        for client in self._clients.values():
            total.add(client.usage)
        return total.as_cost()

    def _client(self, name: str, cfg: TeacherConfig) -> TeacherClient:
        key = (name, cfg.model, cfg.api_key_env)
        if key not in self._clients:
            client = TeacherClient(cfg, self.cache, name=name, stage=self.stage, budget=self.budget,
                                   activity=self.activity)
            if cfg.batch:
                driver = BatchDriver(client, BatchJournal(self.store, name), self.stage)
                client.batch = driver
                self._drivers.append(driver)
            self._clients[key] = client
        return self._clients[key]

    async def aclose(self) -> None:
        try:
            for driver in self._drivers:
                await driver.aclose()
            for name, summary in self.concurrency_settled().items():
                self.cache.ledger.set_concurrency(self.stage, name, summary)
            for client in self._clients.values():
                for role, hits in client.hits.items():
                    self.cache.ledger.add_hits(self.stage, client.name, role, hits)
                await client.aclose()
        finally:
            self.cache.close()


def concurrency_note(settled: dict[str, dict[str, Any]]) -> str:
    """For a stage report: where each `max_concurrency: auto` endpoint settled (empty when none is auto)."""
    return "".join(f"; endpoint '{name}' concurrency auto settled at {s['final']} (mean {s['mean']}, max {s['max']} "
                   f"of {s['ceiling']}; {s['throttled']} answers 429/503)"
                   for name, s in settled.items() if s.get("mode") == "auto")


@asynccontextmanager
async def teacher_session(recipe: Recipe, store: RunStore, stage: str) -> AsyncIterator[TeacherSession]:
    """The session of one stage; closes its clients, batch pollers and the cache however the stage ends."""
    session = TeacherSession(recipe, store, stage)
    try:
        yield session
    finally:
        await session.aclose()

