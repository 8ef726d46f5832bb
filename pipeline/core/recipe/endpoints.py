"""The `endpoints`, `roles`, `budget` and `estimate` sections: which endpoint plays which role, the run's cap,
and the reply lengths `distill estimate` assumes."""

from __future__ import annotations

import re
from typing import Any

from pydantic import Field

from pipeline.core import environment
from pipeline.core.recipe.base import Section

DEFAULT_ENDPOINT = "teacher"  # the `teacher` section is the endpoint every role uses unless `roles` says otherwise
ROLES = ("assistant", "user_simulator", "instruction_writer", "rater", "judge")
_NAME = re.compile(r"[A-Za-z][A-Za-z0-9_-]*")


class RolesConfig(Section):
    """The endpoint (`teacher` or a name under `endpoints`) each role is played by."""

    assistant: str = DEFAULT_ENDPOINT  # the assistant turns of simulated dialogues
    user_simulator: str = DEFAULT_ENDPOINT  # the user turns
    instruction_writer: str = DEFAULT_ENDPOINT  # self-instruct and iterative self-prompting
    rater: str = DEFAULT_ENDPOINT  # UltraFeedback ratings and corrections
    judge: str = DEFAULT_ENDPOINT  # evaluation grades and pairwise verdicts


class BudgetConfig(Section):
    """The run's cap: the spend ledger's total over every endpoint and stage (each endpoint has its own cap too)."""

    max_cost_usd: float | None = Field(None, ge=0)


class ReplyTokens(Section):
    """Expected reply length in tokens per kind of request (capped by each request's max_tokens)."""

    assistant: float = Field(300, ge=0)  # an assistant turn, a correction
    user_simulator: float = Field(60, ge=0)  # a simulated user turn
    instruction: float = Field(30, ge=0)  # one instruction proposed by self-instruct
    rating: float = Field(80, ge=0)  # the rater's block for one rated answer
    judge: float = Field(200, ge=0)  # a grade or a pairwise verdict with its explanation
    answer: float = Field(300, ge=0)  # a pool model's or an evaluated model's answer


class EstimateConfig(Section):
    """What `distill estimate` cannot know before anything is paid: reply lengths and how often replies fail."""

    reply_tokens: ReplyTokens = Field(default_factory=ReplyTokens)
    reask_rate: float = Field(0.05, ge=0, le=1)  # share of rater/judge replies asked again (unparsable)
    # share of student drafts the rater's rewrite leaves as they were (feedback source `correction`): not rated
    correction_unchanged_rate: float = Field(0.0, ge=0, le=1)
    # share of an evaluated model's answers identical to the baseline's: not compared, graded once
    identical_answer_rate: float = Field(0.0, ge=0, le=1)
    # share of proposed instructions the filter keeps (self-instruct and self-prompting)
    self_instruct_keep_rate: float = Field(0.5, gt=0, le=1)


def endpoint_name_problems(names: list[str]) -> list[str]:
    """Names under `endpoints` that cannot be used."""
    problems = []
    for name in names:
        if name == DEFAULT_ENDPOINT:
            problems.append(f"endpoints.{name}: '{DEFAULT_ENDPOINT}' is the default endpoint; configure it under "
                            f"`{DEFAULT_ENDPOINT}:` and give other endpoints other names")
        elif not _NAME.fullmatch(name):
            problems.append(f"endpoints.{name}: use a name of letters, digits, '_' and '-' (starting with a letter)")
    return problems


def unknown_endpoint(key: str, name: str, defined: list[str]) -> str:
    return f"{key}: unknown endpoint '{name}'; the endpoints are: {', '.join([DEFAULT_ENDPOINT, *defined])}"


def secret_variables(data: Any) -> Any:
    """Give each endpoint whose key comes from a Prefect Secret block its own environment variable, so two
    blocks never land in the same one (pipeline.core.environment)."""
    if not isinstance(data, dict) or not isinstance(data.get("endpoints"), dict):
        return data
    endpoints = {}
    for name, entry in data["endpoints"].items():
        if isinstance(entry, dict) and entry.get("api_key_secret_block") and not entry.get("api_key_env"):
            entry = {**entry, "api_key_env": environment.endpoint_key(str(name))}
        endpoints[name] = entry
    return {**data, "endpoints": endpoints}
