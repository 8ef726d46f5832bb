"""Judging one answer: MT-Bench-style single grading of each turn and pairwise comparison in both orders."""

from __future__ import annotations

import asyncio
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from pipeline.core.recipe import EvaluateConfig
from pipeline.core.stage import ItemFailed
from pipeline.core.templates import render
from pipeline.stages.evaluate.judge import (
    PAIRWISE_SCHEMA,
    SINGLE_SCHEMA,
    VerdictError,
    bounded,
    combine_orders,
    parse_pairwise,
    parse_pairwise_json,
    parse_single,
    parse_single_json,
)
from pipeline.stages.evaluate.records import (
    PAIRWISE,
    SINGLE,
    EvalItem,
    EvalModel,
    answer_id,
    pairwise_id,
    shows_reference,
    single_id,
)
from pipeline.teacher.client import StructuredUnsupported
from pipeline.teacher.messages import ChatRequest
from pipeline.teacher.session import RoleClient
from pipeline.teacher.structured import json_reply, response_format

REASK_TEMPERATURE = 0.7  # a re-ask is sampled: asked greedily again, a judge mostly repeats the reply that failed
# kind -> (schema name, schema, text parser, JSON parser)
JUDGE_FORMATS: dict[str, tuple[str, dict[str, Any], Callable[[str], Any], Callable[[Any], Any]]] = {
    "single": ("single_grade", SINGLE_SCHEMA, parse_single, parse_single_json),
    "pairwise": ("pairwise_verdict", PAIRWISE_SCHEMA, parse_pairwise, parse_pairwise_json),
}


class JudgeFailed(ItemFailed):
    """No parsable verdict after every attempt: the judgment goes to the failure ledger."""


def _fence(text: str, tag: str = "answer") -> str:
    """Keep an answer from closing (or opening) the tags it is quoted in."""
    return re.sub(rf"<(/?\s*{tag}\b[^>]*)>", r"‹\1›", text, flags=re.I)


def judged_question(item: EvalItem, answers: list[str], turn: int, show_reference: bool = True) -> tuple[str, str]:
    """(context, question) a turn is graded on: the earlier turns with this model's answers, then the turn itself
    with its reference answer where the item has one and its category shows references (MT-Bench)."""
    parts = []
    if turn > 0:
        context = [f"User: {item.turns[t]}\n\nAssistant: {_fence(answers[t])}" for t in range(turn)]
        # a section of its own: the graded turn alone stands under "## Question"
        parts.append("## Conversation so far\n\n" + "\n\n".join(context)
                     + "\n\nThe answer below replies to the user's latest message, the question that follows.\n\n")
    reference = item.reference_for(turn) if show_reference else None
    question = item.turns[turn]
    if reference is not None:
        question += f"\n\n(Reference answer, for the judge only: {reference})"
    return "".join(parts), question


def references_text(item: EvalItem) -> str:
    """Every turn's reference answer for the pairwise judge, or '' when the item has none."""
    refs = [(t, r) for t, r in enumerate(item.references) if r is not None]
    if not refs:
        return ""
    if len(item.turns) == 1:
        return f"\n\n(Reference answer, for the judge only: {refs[0][1]})"
    return "\n\n(Reference answers, for the judge only: " + "; ".join(f"turn {t + 1}: {r}" for t, r in refs) + ")"


def conversation_text(turns: list[str], answers: bool) -> str:
    """A multi-turn item shown whole to the pairwise judge: `Turn 1: ...`; a single turn as it is."""
    shown = [_fence(t) for t in turns] if answers else list(turns)
    return shown[0] if len(shown) == 1 else "\n\n".join(f"Turn {i + 1}: {t}" for i, t in enumerate(shown))


def read_verdict(text: str, kind: str, structured: bool) -> tuple[Any, str]:
    """(verdict, `json` or `text`); VerdictError when the reply holds none. A structured reply that is not JSON
    goes to the text parser."""
    _, _, from_text, from_json = JUDGE_FORMATS[kind]
    value = json_reply(text) if structured else None
    if value is not None:
        return from_json(value), "json"
    return from_text(text), "text"


def judge_request(cfg: EvaluateConfig, kind: str, prompt: Callable[[bool, str], str], attempt: int, problem: str,
                  structured: bool) -> ChatRequest:
    """One attempt's request: a re-ask says what was wrong and is sampled (a new seed, REASK_TEMPERATURE), so
    it can get another reply than the one that failed."""
    name, schema, _, _ = JUDGE_FORMATS[kind]
    schema = bounded(schema, cfg.judge_max_tokens)
    return ChatRequest([{"role": "user", "content": prompt(structured, problem if attempt > 1 else "")}],
                       temperature=0.0 if attempt == 1 else REASK_TEMPERATURE, max_tokens=cfg.judge_max_tokens,
                       seed=None if attempt == 1 else attempt, tag="" if attempt == 1 else f"reask-{attempt}",
                       response_format=response_format(name, schema) if structured else None)


async def ask_judge(client: RoleClient, cfg: EvaluateConfig, prompt: Callable[[bool, str], str],
                    kind: str) -> tuple[str, Any, int]:
    """(reply, parsed verdict, attempt); `prompt(structured, reminder)` renders the question. A reply the strict
    parser rejects is marked unusable in the cache and asked again, then the judgment fails; a reply an earlier
    run marked is read again, not paid for, and this run's `judge_attempts` new requests come after it."""
    problem, last, attempt, asked = "", "", 0, 0
    while asked < cfg.judge_attempts:
        attempt += 1
        structured = await client.structured()
        request = judge_request(cfg, kind, prompt, attempt, problem, structured)
        known = client.unusable(request)
        if known is None:
            try:
                reply = await client.chat(request)
            except StructuredUnsupported:  # auto found the endpoint takes no schema: the same attempt as text
                attempt -= 1
                continue
            asked += 1
        else:
            reply, client.tally.known_unusable = known[0], client.tally.known_unusable + 1
        try:
            verdict, parsed_as = read_verdict(reply.text, kind, structured)
        except VerdictError as exc:
            problem = str(exc) + (" (the reply was cut off)" if reply.finish_reason == "length" else "")
            last = reply.text
            if known is None:
                client.tally.reply(None)
                client.mark_unusable(request, problem)
            continue
        if known is None:
            client.tally.reply(parsed_as)
        client.tally.call(attempt)
        return reply.text, verdict, attempt
    client.tally.call(None)
    raise JudgeFailed(f"{problem}, after {cfg.judge_attempts} attempts; last reply {last[:200]!r}",
                      cfg.judge_attempts)


async def grade_answer(client: RoleClient, cfg: EvaluateConfig, item: EvalItem, row: dict[str, Any],
                       turn: int) -> dict[str, Any]:
    """Single-answer grading of one turn (a later turn with the conversation before it): an explanation and a
    1-10 rating."""
    context, question = judged_question(item, row["answers"], turn, shows_reference(cfg, item))
    answer = _fence(row["answers"][turn])
    reply, rating, attempts = await ask_judge(
        client, cfg, lambda structured, reminder: render("judge_single.jinja", context=context, question=question,
                                                         answer=answer, structured=structured, reminder=reminder),
        "single")
    return {"judgment_id": single_id(row["answer_id"], turn), "item_id": item.item_id, "model": row["model"],
            "category": item.category, "turn": turn + 1, "rating": float(rating), "explanation": reply,
            "attempts": attempts}


async def compare_answers(client: RoleClient, cfg: EvaluateConfig, item: EvalItem, candidate: dict[str, Any],
                          baseline: dict[str, Any]) -> dict[str, Any]:
    """The candidate against the baseline, shown as A and then as B; disagreement between the orders is a tie."""
    question = conversation_text(list(item.turns), answers=False)
    if shows_reference(cfg, item):
        question += references_text(item)
    mine, theirs = conversation_text(candidate["answers"], True), conversation_text(baseline["answers"], True)
    row = {"judgment_id": pairwise_id(item.item_id, candidate["spec"], baseline["spec"]), "item_id": item.item_id,
           "model": candidate["model"], "baseline": baseline["model"], "category": item.category}
    if mine == theirs:  # the same text cannot win or lose against itself
        return {**row, "verdict_first": "C", "verdict_second": "C", "score": 0.5, "identical": True,
                "explanation_first": "", "explanation_second": "", "attempts": 0}
    def shown(a: str, b: str) -> Callable[[bool, str], str]:
        return lambda structured, reminder: render("judge_pairwise.jinja", question=question, answer_a=a,
                                                   answer_b=b, structured=structured, reminder=reminder)

    both = await asyncio.gather(ask_judge(client, cfg, shown(mine, theirs), "pairwise"),
                                ask_judge(client, cfg, shown(theirs, mine), "pairwise"),
                                return_exceptions=True)  # let both orders finish, then fail on either
    for failed in (r for r in both if isinstance(r, BaseException)):
        raise failed
    (text_1, first, n_1), (text_2, second, n_2) = both
    outcome = combine_orders(first, second)
    return {**row, "verdict_first": first, "verdict_second": second, "score": outcome.score, "identical": False,
            "explanation_first": text_1, "explanation_second": text_2, "attempts": n_1 + n_2}


@dataclass(frozen=True)
class Judgment:
    """One verdict to obtain: a turn of an answer graded, or an answer compared with the baseline's."""

    kind: str  # SINGLE or PAIRWISE
    judgment_id: str
    item: EvalItem
    answer: dict[str, Any]
    turn: int = 0
    baseline_answer: dict[str, Any] | None = None

    async def obtain(self, client: RoleClient, cfg: EvaluateConfig) -> dict[str, Any]:
        if self.kind == SINGLE:
            return await grade_answer(client, cfg, self.item, self.answer, self.turn)
        return await compare_answers(client, cfg, self.item, self.answer, self.baseline_answer)


def plan_judgments(cfg: EvaluateConfig, items: list[EvalItem], models: list[EvalModel],
                   answers: dict[str, dict[str, Any]]) -> list[Judgment]:
    """Every turn of every answer graded; every item compared for each model against the baseline.

    A failed answer gets no judgments: it is in the ledger already, and so the item is accounted for."""
    baseline = next(m for m in models if m.spec == cfg.baseline)
    plan = []
    for item in items:
        base_row = answers.get(answer_id(item.item_id, baseline.spec))
        for model in models:
            row = answers.get(answer_id(item.item_id, model.spec))
            if row is None:
                continue
            plan += [Judgment(SINGLE, single_id(row["answer_id"], t), item, row, t)
                     for t in range(len(row["answers"]))]
            if model is not baseline and base_row is not None:
                plan.append(Judgment(PAIRWISE, pairwise_id(item.item_id, model.spec, baseline.spec), item, row,
                                     baseline_answer=base_row))
    return plan
