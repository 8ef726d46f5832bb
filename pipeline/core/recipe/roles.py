"""The one place a role, a pool member or an endpoint name becomes an endpoint's name and settings."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from pipeline.core.recipe.aif import PoolModel
from pipeline.core.recipe.base import BUILTIN_TEACHER
from pipeline.core.recipe.endpoints import DEFAULT_ENDPOINT, ROLES
from pipeline.core.recipe.model import Recipe
from pipeline.core.recipe.teacher import TeacherConfig

STRUCTURED_ROLES = ("rater", "judge")  # the roles an endpoint's `structured` setting changes the replies of


def all_endpoints(recipe: Recipe) -> dict[str, TeacherConfig]:
    """`teacher` and every named endpoint."""
    return {DEFAULT_ENDPOINT: recipe.teacher, **recipe.endpoints}


def endpoint_key(name: str) -> str:
    """Where an endpoint's settings are in the recipe: `teacher` or `endpoints.NAME`."""
    return DEFAULT_ENDPOINT if name == DEFAULT_ENDPOINT else f"endpoints.{name}"


def role_endpoint(recipe: Recipe, role: str) -> tuple[str, TeacherConfig]:
    """The endpoint (name, settings) that plays `role`."""
    if role not in ROLES:
        raise KeyError(f"unknown role '{role}'; the roles are {', '.join(ROLES)}")
    name = getattr(recipe.roles, role)
    return name, all_endpoints(recipe)[name]


def pool_endpoint(recipe: Recipe, member: PoolModel) -> tuple[str, TeacherConfig]:
    """The endpoint an `openai` pool member is sent to, with the member's model.

    A member with its own `base_url` is an endpoint of its own with the teacher's limits and no prices: its
    requests are ledgered at $0 (give it an endpoint with prices instead)."""
    if member.endpoint is not None or member.base_url in (None, BUILTIN_TEACHER):  # the named endpoint's server
        name = member.endpoint or DEFAULT_ENDPOINT
        cfg = all_endpoints(recipe)[name]
        # a served endpoint serves one model: a member sent there asks for that one
        update: dict[str, object] = {} if cfg.is_served else {"model": member.model}
        if member.api_key_env is not None:
            update["api_key_env"] = member.api_key_env
        return name, cfg.model_copy(update=update)
    return f"pool-{member.name}", recipe.teacher.model_copy(update={
        "base_url": member.base_url, "serve": None, "model": member.model, "api_key_env": member.api_key_env,
        "api_key_secret_block": None, "price_input_per_1k": 0.0, "price_output_per_1k": 0.0, "max_cost_usd": None,
        "batch": False})


@dataclass(frozen=True)
class EndpointUse:
    """One way a stage reaches an endpoint: through a role, as a panel rater, or as an openai pool member."""

    key: str  # its name among the stage's endpoint identities: the role, `panel:NAME` or the pool member's name
    endpoint: str
    config: TeacherConfig
    structured: bool = False  # the replies it asks for follow the endpoint's `structured` setting

    def identity(self) -> dict[str, object]:
        return self.config.identity(self.structured)


def role_uses(recipe: Recipe, roles: Iterable[str]) -> list[EndpointUse]:
    """The endpoints that play `roles`."""
    return [EndpointUse(role, *role_endpoint(recipe, role), structured=role in STRUCTURED_ROLES) for role in roles]


def panel_uses(recipe: Recipe) -> list[EndpointUse]:
    """feedback's panel of raters (each rates every answer, structured where its endpoint says so)."""
    return [EndpointUse(f"panel:{name}", name, all_endpoints(recipe)[name], structured=True)
            for name in recipe.feedback.panel]


def pool_uses(recipe: Recipe) -> list[EndpointUse]:
    """sample's openai pool members, each with the endpoint it is sent to."""
    return [EndpointUse(m.name, *pool_endpoint(recipe, m)) for m in recipe.sample.pool if m.backend == "openai"]


def unpriced_pool_members(recipe: Recipe) -> list[str]:
    """Notes on openai pool members whose spend the recipe cannot price (their own base_url, no endpoint)."""
    return [f"sample.pool[{i}] ({m.name}) has its own base_url and no endpoint: its requests are ledgered at $0 "
            "and only the run cap applies; name an endpoint with prices instead"
            for i, m in enumerate(recipe.sample.pool)
            if m.backend == "openai" and m.endpoint is None and m.base_url not in (None, BUILTIN_TEACHER)]
