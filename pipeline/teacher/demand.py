"""What a stage expects to ask of its endpoints, before anything is paid: requests and tokens per endpoint and
role (`distill estimate`). Each stage describes its own requests (`pipeline/stages/<stage>/estimate.py`)."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from pipeline.core.recipe import PoolModel, Recipe, ReplyTokens, TeacherConfig, pool_endpoint, role_endpoint
from pipeline.core.task import load_task

MESSAGE_OVERHEAD = 4  # tokens a chat API adds per message (role, separators), beyond the content


@dataclass
class Demand:
    """Expected traffic of one role of a stage on one endpoint."""

    endpoint: str
    role: str
    requests: float = 0.0
    input_tokens: float = 0.0
    output_tokens: float = 0.0


class RolePlan:
    """Adds a role's expected requests, counting tokens as its endpoint will."""

    def __init__(self, demand: Demand, cfg: TeacherConfig, recipe: Recipe):
        self.demand, self.cfg = demand, cfg
        task = load_task(recipe.task) if recipe.task and cfg.is_builtin else None
        self._task = task  # the built-in teacher counts tokens its own way
        self._overhead = 0 if task is not None and task.count_teacher_tokens("probe") is not None else MESSAGE_OVERHEAD

    def tokens(self, text: str) -> float:
        """A text's tokens: the built-in teacher's own count, else about four characters a token."""
        counted = self._task.count_teacher_tokens(text) if self._task is not None else None
        return float(counted) if counted is not None else math.ceil(len(text) / 4)

    def message_tokens(self, messages: list[dict[str, Any]]) -> float:
        return sum(self.tokens(m.get("content") or "") + self._overhead for m in messages)

    def add(self, input_tokens: float, output_tokens: float, count: float = 1.0) -> None:
        """`count` requests of `input_tokens` each (content already counted) answered in `output_tokens`."""
        self.demand.requests += count
        self.demand.input_tokens += count * input_tokens
        self.demand.output_tokens += count * output_tokens

    def add_messages(self, messages: list[dict[str, Any]], output_tokens: float, count: float = 1.0) -> None:
        self.add(self.message_tokens(messages), output_tokens, count)

    def overhead(self, messages: int) -> float:
        return float(self._overhead * messages)


class Planner:
    """One stage's demand, role by role; `reply` holds the reply lengths the recipe assumes."""

    def __init__(self, recipe: Recipe):
        self.recipe = recipe
        self.reply: ReplyTokens = recipe.estimate.reply_tokens
        self.reask_rate = recipe.estimate.reask_rate
        self._plans: dict[tuple[str, str], RolePlan] = {}

    def role(self, role: str) -> RolePlan:
        name, cfg = role_endpoint(self.recipe, role)
        return self._plan(name, role, cfg)

    def pool_member(self, member: PoolModel) -> RolePlan:
        name, cfg = pool_endpoint(self.recipe, member)
        return self._plan(name, f"pool:{member.name}", cfg)

    def _plan(self, endpoint: str, role: str, cfg: TeacherConfig) -> RolePlan:
        if (endpoint, role) not in self._plans:
            self._plans[(endpoint, role)] = RolePlan(Demand(endpoint, role), cfg, self.recipe)
        return self._plans[(endpoint, role)]

    def demands(self) -> list[tuple[Demand, TeacherConfig]]:
        return [(p.demand, p.cfg) for p in self._plans.values() if p.demand.requests]
