"""One simulated dialogue (UltraChat style): the teacher answers as the assistant and writes the user's next
turn as a user simulator, until the drawn number of rounds or a filter ends it."""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass

from pipeline.core.decontam import Decontaminator, Match
from pipeline.core.recipe import GenerateConfig
from pipeline.core.sources import SeedPrompt
from pipeline.core.stage import ItemDropped
from pipeline.stages.generate.filters import DialogueFilters
from pipeline.stages.generate.truecase import case_vocabulary, truecase
from pipeline.teacher.messages import ChatRequest
from pipeline.teacher.session import RoleClient


@dataclass
class Dialogue:
    messages: list[dict[str, str]]
    target_rounds: int
    stop_reason: str = "rounds"
    stop_detail: str = ""  # what a filter saw (the kind of role drift, the evaluation item matched)
    contaminated_by: str | None = None  # the evaluation file a simulated user turn overlapped
    prompt_tokens: int = 0
    completion_tokens: int = 0
    truecased: int = 0


def dialogue_rounds(cfg: GenerateConfig, prompt_id: str) -> int:
    """The number of rounds a seed prompt's dialogue is drawn to have (seeded by the prompt alone)."""
    return random.Random(f"{cfg.seed}:{prompt_id}").randint(cfg.min_rounds, cfg.max_rounds)


def assistant_request(messages: list[dict[str, str]], cfg: GenerateConfig) -> ChatRequest:
    """The assistant's turn; for a single user message the same request self-prompting makes when it has an
    instruction answered, so the response cache serves the dialogue's first turn."""
    return ChatRequest(messages, cfg.temperature, cfg.max_tokens)


def casing(cfg: GenerateConfig) -> Callable[[str, list[dict[str, str]]], str]:
    """Truecase a turn (proper nouns learned from the dialogue so far), or leave it when truecasing is off."""
    if not cfg.filters.truecase:
        return lambda text, _messages: text
    return lambda text, messages: truecase(text, case_vocabulary(m["content"] for m in messages))


def _flip(messages: list[dict[str, str]], system: str) -> list[dict[str, str]]:
    """The user simulator's view: its own (user) turns become 'assistant', the assistant's become 'user'."""
    swap = {"user": "assistant", "assistant": "user"}
    return [{"role": "system", "content": system}] + [{"role": swap[m["role"]], "content": m["content"]}
                                                      for m in messages]


def _user_turn_problem(turn: str, finish_reason: str, cfg: GenerateConfig, filters: DialogueFilters,
                       decon: Decontaminator) -> tuple[str, str, Match | None] | None:
    """(stop reason, detail, contamination) when a simulated user turn ends the dialogue, else None."""
    if filters.degenerate(turn):
        return "empty_user_turn", "", None
    if finish_reason == "length":
        return "truncated_user_turn", "", None
    if cfg.filters.drop_role_drift and (kind := filters.role_drift(turn)):
        return "role_drift", kind, None
    if decon and (match := decon.match(turn)) is not None:
        return "contaminated_user_turn", match.reason, match
    return None


async def simulate_dialogue(assistant: RoleClient, user_simulator: RoleClient, seed: SeedPrompt, cfg: GenerateConfig,
                            filters: DialogueFilters, user_system: str, decon: Decontaminator) -> Dialogue:
    """Alternate the assistant and the user simulator (two roles, maybe two endpoints) for a drawn number of
    rounds."""
    rounds = dialogue_rounds(cfg, seed.prompt_id)
    fix = casing(cfg)
    first = fix(seed.prompt, [])
    dlg = Dialogue([{"role": "user", "content": first}], rounds, truecased=int(first != seed.prompt))
    for r in range(rounds):
        reply = await assistant.chat(assistant_request(dlg.messages, cfg))
        dlg.prompt_tokens += reply.prompt_tokens
        dlg.completion_tokens += reply.completion_tokens
        text = reply.text.strip()
        problem = ("truncated" if reply.finish_reason == "length" and cfg.filters.drop_truncated else
                   "empty" if cfg.filters.drop_empty and filters.degenerate(text) else None)
        if problem:
            if r == 0:
                raise ItemDropped(f"{problem}_assistant_turn")
            dlg.messages.pop()  # the unanswered user turn goes too: every dialogue ends on the assistant
            dlg.stop_reason = problem
            break
        if pattern := filters.disclaimer(text):
            raise ItemDropped(f"disclaimer: {pattern}")
        fixed = fix(text, dlg.messages)
        dlg.truecased += int(fixed != text)
        dlg.messages.append({"role": "assistant", "content": fixed})
        if r == rounds - 1:
            break
        user = await user_simulator.chat(ChatRequest(_flip(dlg.messages, user_system), cfg.user_temperature,
                                                     cfg.max_tokens))
        dlg.prompt_tokens += user.prompt_tokens
        dlg.completion_tokens += user.completion_tokens
        turn = user.text.strip()
        if stop := _user_turn_problem(turn, user.finish_reason, cfg, filters, decon):
            dlg.stop_reason, dlg.stop_detail, match = stop
            dlg.contaminated_by = match.eval_file if match else None
            break
        fixed = fix(turn, dlg.messages)
        dlg.truecased += int(fixed != turn)
        dlg.messages.append({"role": "user", "content": fixed})
    return dlg
