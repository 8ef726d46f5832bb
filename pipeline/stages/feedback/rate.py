"""The paper's AIF steps for one item: rate every answer on each aspect, score, correct, binarize into a pair."""

from __future__ import annotations

import asyncio
import hashlib
import random
import re
from dataclasses import dataclass, field
from typing import Any

from pipeline.backends.answers import completion_id
from pipeline.core.recipe import FeedbackConfig, Recipe
from pipeline.core.stage import ItemFailed, StageStopped
from pipeline.core.templates import render
from pipeline.stages.feedback.debias import pair_filter, shown_order, words
from pipeline.stages.feedback.pairs import binarize, correction_pair
from pipeline.stages.feedback.ratings import (
    SCALES,
    ParsedRatings,
    Rating,
    answer_score,
    parse_json_ratings,
    parse_ratings,
    rating_schema,
)
from pipeline.teacher.client import StructuredUnsupported
from pipeline.teacher.messages import ChatRequest
from pipeline.teacher.session import RoleClient
from pipeline.teacher.structured import json_reply, response_format

ON_POLICY = "on_policy"
STUDENTS = ("sft", "policy")  # pool models whose answers are the student's own (drafts a correction rewrites)
ASPECT_TITLES = {"instruction_following": "instruction following", "honesty": "honesty",
                 "truthfulness": "truthfulness", "helpfulness": "helpfulness", "overall": "overall quality"}
TYPE_HINTS = {"truthfulness": "hallucination kinds found, or None", "helpfulness": "qualities present, or None"}
REASK_TEMPERATURE = 0.7  # a re-ask is sampled: asked greedily again, most servers return the reply that failed


class RatingFailed(ItemFailed):
    """No usable rating after every re-ask (or no usable correction): the item goes to the failure ledger."""


@dataclass(frozen=True)
class Answer:
    completion_id: str
    model: str
    text: str


@dataclass(frozen=True)
class Item:
    """One prompt's answers from one source: it ends as one pair, a dropped line or a failure."""

    source: str
    prompt_id: str
    prompt: str
    answers: tuple[Answer, ...]

    @property
    def item_id(self) -> str:
        return f"{self.source}:{self.prompt_id}"


@dataclass
class JudgeCall:
    """One accepted judge reply: `order[p]` is the answer shown as text p + 1."""

    order: list[int]
    parsed: ParsedRatings
    raw: str
    attempt: int

    def rating_of(self, answer: int) -> tuple[int, Rating]:
        position = self.order.index(answer) + 1
        return position, self.parsed.ratings[position]


@dataclass
class AspectVerdict:
    """One aspect's ratings of every answer: one judge call per order shown (`feedback.orders`)."""

    aspect: str
    calls: list[JudgeCall]

    @property
    def raw(self) -> str:
        return self.calls[0].raw

    def value_of(self, answer: int, call: int | None = None) -> float | None:
        """The answer's rating in one call, or its mean over the calls (N/A left out)."""
        values = [c.rating_of(answer)[1].value for c in (self.calls if call is None else [self.calls[call]])]
        rated = [v for v in values if v is not None]
        return sum(rated) / len(rated) if rated else None


@dataclass
class Outcome:
    ratings: list[dict[str, Any]] = field(default_factory=list)
    pair: dict[str, Any] | None = None
    dropped: str | None = None


def _fence(text: str, tag: str) -> str:
    """Keep an answer from closing (or opening) the tags it is shown in."""
    return re.sub(rf"<(/?\s*{tag}\b[^>]*)>", r"‹\1›", text, flags=re.I)


def rating_request(cfg: FeedbackConfig, aspect: str, item_id: str, prompt: str, answers: list[str], shown: int,
                   rater_tag: str, attempt: int, reminder: str, structured: bool) -> tuple[list[int], ChatRequest]:
    """(the order shown, the request) of one attempt: a re-ask shows another order, says what was wrong, and
    is sampled (a new seed, REASK_TEMPERATURE), so it is a new request that can get another reply."""
    n = len(answers)
    order = shown_order(cfg.seed, item_id, aspect, attempt, n, shown, cfg.orders)
    text = render("feedback_rating.jinja", aspect_title=ASPECT_TITLES[aspect],
                  rubric=render(f"feedback_{aspect}.jinja"), instruction=prompt,
                  texts=[_fence(answers[i], "text") for i in order], type_hint=TYPE_HINTS.get(aspect, ""),
                  scale_max=SCALES[aspect][1], allow_na=aspect == "honesty", reminder=reminder, structured=structured)
    tag = "" if attempt == 1 else f"reask-{attempt}"
    if shown >= n:  # a repeated order must still be a request of its own
        tag = f"{tag}order-{shown}"
    # an entry fits its share of max_tokens even at one token a character (~32 tokens of JSON, a type of 40)
    chars = max(16, cfg.max_tokens_per_answer - 72)
    schema = response_format("ratings", rating_schema(n, aspect, aspect in TYPE_HINTS, chars)) if structured else None
    return order, ChatRequest([{"role": "user", "content": text}], temperature=0.0 if attempt == 1 else REASK_TEMPERATURE,
                              max_tokens=cfg.max_tokens_per_answer * n + 64, seed=None if attempt == 1 else attempt,
                              tag=rater_tag + tag, response_format=schema)


def read_ratings(text: str, n: int, aspect: str, structured: bool) -> tuple[ParsedRatings, str]:
    """(ratings, `json` or `text`): a structured reply that holds no JSON goes to the text parser."""
    value = json_reply(text) if structured else None
    if value is not None:
        return parse_json_ratings(value, n, aspect), "json"
    return parse_ratings(text, n, aspect), "text"


async def rate_aspect(client: RoleClient, cfg: FeedbackConfig, aspect: str, item_id: str, prompt: str,
                      answers: list[str], shown: int = 0, rater_tag: str = "") -> JudgeCall:
    """One judge call rates all answers on one aspect, in a shuffled order (the `shown`-th of `feedback.orders`)
    mapped back afterwards; an unusable reply is marked so in the cache and re-asked, then the item fails.

    A reply an earlier run marked unusable is read again, not asked for: this run's `max_parse_attempts` new
    requests come after it, so a rerun asks what no run asked before and pays for nothing twice."""
    n, problem, reminder, reply_text = len(answers), "", "", ""
    attempt = asked = 0
    while asked < cfg.max_parse_attempts:
        attempt += 1
        structured = await client.structured()
        order, request = rating_request(cfg, aspect, item_id, prompt, answers, shown, rater_tag, attempt, reminder,
                                        structured)
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
        reply_text = reply.text
        parsed, parsed_as = read_ratings(reply.text, n, aspect, structured)
        if parsed.complete:
            if known is None:
                client.tally.reply(parsed_as)
            client.tally.call(attempt)
            return JudgeCall(order, parsed, reply.text, attempt)
        cut = " - the reply was cut off" if reply.finish_reason == "length" else ""
        problem = parsed.summary() + cut
        # the next attempt shows the answers in another order, so the reminder names no text numbers
        reminder = "; ".join(sorted(set(parsed.problems.values()))) + cut
        if known is None:
            client.tally.reply(None)
            client.mark_unusable(request, problem)
    client.tally.call(None)
    raise RatingFailed(f"unusable {aspect} rating after {cfg.max_parse_attempts} attempts ({problem}); "
                       f"last reply {reply_text[:200]!r}", cfg.max_parse_attempts)


def rated_aspects(cfg: FeedbackConfig) -> list[str]:
    """The aspects every answer is rated on, `overall` last when the critique is asked for."""
    return [*cfg.aspects, *(["overall"] if cfg.overall_critique else [])]


async def rate_responses(client: RoleClient, cfg: FeedbackConfig, item_id: str, prompt: str,
                         answers: list[str], tag: str = "") -> dict[str, AspectVerdict]:
    """Every aspect (and the overall critique if asked) for all answers of one prompt, in every order asked
    for, concurrently."""
    calls = [(a, shown) for a in rated_aspects(cfg) for shown in range(cfg.orders)]
    results = await asyncio.gather(*(rate_aspect(client, cfg, a, item_id, prompt, answers, shown, tag)
                                     for a, shown in calls), return_exceptions=True)
    errors = [r for r in results if isinstance(r, BaseException)]
    if errors:  # a stop (budget, bad key) outranks an item's own failure
        raise next((e for e in errors if isinstance(e, StageStopped)), errors[0])
    verdicts: dict[str, AspectVerdict] = {}
    for (aspect, _), call in zip(calls, results, strict=True):
        verdicts.setdefault(aspect, AspectVerdict(aspect, [])).calls.append(call)
    return verdicts


def score_answers(verdicts: dict[str, AspectVerdict], n: int, call: int | None = None) -> list[float | None]:
    """Mean of each answer's aspect ratings (N/A left out), with the overall score if it was asked for; each
    rating is its mean over the orders shown, or the one of order `call`."""
    scores = []
    for i in range(n):
        aspects = {a: v.value_of(i, call) for a, v in verdicts.items() if a != "overall"}
        overall = verdicts["overall"].value_of(i, call) if "overall" in verdicts else None
        scores.append(answer_score(aspects, overall))
    return scores


async def correct_response(client: RoleClient, recipe: Recipe, prompt: str, draft: str) -> str:
    """The teacher's corrected rewrite of the student's draft; an empty or cut-off one is marked unusable and
    asked again (sampled, with a note of what was wrong), as a rating is."""
    cfg, note, asked, attempt, problem = recipe.feedback, "", 0, 0, ""
    while asked < cfg.max_parse_attempts:
        attempt += 1
        text = render("feedback_correction.jinja", question=prompt, draft=_fence(draft, "draft"), reminder=note)
        request = ChatRequest([{"role": "user", "content": text}], temperature=0.0 if attempt == 1 else REASK_TEMPERATURE,
                              max_tokens=cfg.max_tokens_per_answer, seed=None if attempt == 1 else attempt,
                              tag="" if attempt == 1 else f"reask-{attempt}")
        known = client.unusable(request)
        if known is None:
            reply = await client.chat(request)
            asked += 1
        else:
            reply = known[0]
        corrected = re.sub(r"^\W*corrected answer\W*", "", reply.text.strip(), flags=re.I).strip()
        if reply.finish_reason == "length":
            problem, note = "the rewrite was cut off at feedback.max_tokens_per_answer", "it was cut off: be brief"
        elif not corrected:
            problem, note = "the teacher returned an empty rewrite", "it was empty"
        else:
            return corrected
        if known is None:
            client.mark_unusable(request, problem)
    raise RatingFailed(f"correction: {problem}", cfg.max_parse_attempts)


async def judge_item(client: RoleClient, recipe: Recipe, item: Item, panel: list[RoleClient] | None = None) -> Outcome:
    """Rate one item's answers (by the rater, or by every rater of `feedback.panel`) and binarize them into a
    pair (or say why not); the rater role writes corrections."""
    cfg = recipe.feedback
    raters = panel or [client]
    answers = list(item.answers)
    if item.source == "correction":
        corrected = await correct_response(client, recipe, item.prompt, answers[0].text)
        if corrected == answers[0].text.strip():
            return Outcome(dropped="correction_unchanged")
        answers.append(Answer(completion_id(item.prompt_id, "correction", 0), f"{client.cfg.model}/correction",
                              corrected))
    texts, n = [a.text for a in answers], len(answers)
    tags = [f"rater-{r.endpoint}" if len(raters) > 1 else "" for r in raters]  # one endpoint's cache entries each
    panel_verdicts = await asyncio.gather(*(rate_responses(r, cfg, item.item_id, item.prompt, texts, tag)
                                            for r, tag in zip(raters, tags, strict=True)))
    verdicts = pooled(panel_verdicts)
    each = [score_answers(v, n) for v in panel_verdicts]
    scores = score_answers(verdicts, n)
    ratings = [row for r, v in zip(raters, panel_verdicts, strict=True)
               for row in rating_rows(item, answers, v, scores, r.cfg.model, r.endpoint if len(raters) > 1 else "")]
    strategy = {"pool": cfg.pairs.strategy, ON_POLICY: "best_vs_worst", "correction": "rewrite_vs_draft"}[item.source]
    by_order = [_mean_scores([score_answers(v, n, j) for v in panel_verdicts]) for j in range(cfg.orders)]
    why_not = pair_filter(by_order, [words(t) for t in texts], scores, cfg.drop_order_flips, cfg.pairs.min_margin,
                          cfg.pairs.length_margin_per_word, each if cfg.aggregate == "majority" else None)
    if item.source == "correction":
        picked = correction_pair(scores, cfg.pairs.min_margin, why_not)
    else:
        picked = binarize(scores, strategy, cfg.pairs.min_margin, random.Random(f"{cfg.pairs.seed}:{item.item_id}"),
                          why_not)
    if isinstance(picked, str):
        return Outcome(ratings, dropped=picked)
    return Outcome(ratings, pair=pair_row(item, answers, verdicts, scores, picked, strategy))


def pooled(panel_verdicts: list[dict[str, AspectVerdict]]) -> dict[str, AspectVerdict]:
    """Every rater's calls per aspect together: an answer's rating is then its mean over raters and orders."""
    if len(panel_verdicts) == 1:
        return panel_verdicts[0]
    return {a: AspectVerdict(a, [c for v in panel_verdicts for c in v[a].calls]) for a in panel_verdicts[0]}


def _mean_scores(per_rater: list[list[float | None]]) -> list[float | None]:
    """Each answer's mean score over the raters that scored it."""
    means = []
    for values in zip(*per_rater, strict=True):
        rated = [v for v in values if v is not None]
        means.append(sum(rated) / len(rated) if rated else None)
    return means


def rating_rows(item: Item, answers: list[Answer], verdicts: dict[str, AspectVerdict], scores: list[float | None],
                judge: str, rater: str = "") -> list[dict[str, Any]]:
    """One row per answer, aspect and order shown (and panel rater: `judge_model` is then `endpoint/model`); the
    first order of a lone rater has no suffix, so ratings stored under the plain id still match on a resume."""
    rows = []
    for aspect, v in verdicts.items():
        for shown, call in enumerate(v.calls):
            for i, a in enumerate(answers):
                position, r = call.rating_of(i)
                key = f"{item.item_id}:{a.completion_id}:{aspect}" + (f":order-{shown}" if shown else "") \
                    + (f":rater-{rater}" if rater else "")
                rows.append({
                    "rating_id": hashlib.sha256(key.encode()).hexdigest(),
                    "item_id": item.item_id, "source": item.source, "prompt_id": item.prompt_id,
                    "completion_id": a.completion_id, "model": a.model, "aspect": aspect, "rating": r.value,
                    "na": r.na, "type": r.type, "rationale": r.rationale, "position": position,
                    "shown": len(answers), "order": shown, "attempt": call.attempt, "score": scores[i],
                    "judge_model": f"{rater}/{judge}" if rater else judge, "raw": call.raw,
                })
    return rows


def pair_row(item: Item, answers: list[Answer], verdicts: dict[str, AspectVerdict], scores: list[float | None],
             picked: tuple[int, int], strategy: str) -> dict[str, Any]:
    """The ultrafeedback_binarized shape plus provenance and the per-aspect ratings of both answers."""
    c, r = picked
    user = {"role": "user", "content": item.prompt}
    chosen = [user, {"role": "assistant", "content": answers[c].text}]
    row: dict[str, Any] = {
        "pair_id": item.item_id, "prompt": item.prompt, "prompt_id": item.prompt_id, "chosen": chosen,
        "rejected": [user, {"role": "assistant", "content": answers[r].text}], "messages": chosen,
        "score_chosen": scores[c], "score_rejected": scores[r], "chosen_model": answers[c].model,
        "rejected_model": answers[r].model, "chosen_completion_id": answers[c].completion_id,
        "rejected_completion_id": answers[r].completion_id, "source": item.source, "strategy": strategy,
        "rated_answers": sum(s is not None for s in scores),
    }
    for aspect, v in verdicts.items():
        row[f"chosen_{aspect}"] = v.value_of(c)
        row[f"rejected_{aspect}"] = v.value_of(r)
    return row
