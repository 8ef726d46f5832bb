"""AI feedback (UltraFeedback): the teacher rates every answer on each aspect; the ratings become DPO pairs.

Pairs come from up to three sources: `pool` (the sample stage's answers), `on_policy` (k samples of this
run's student, best vs worst) and `correction` (the student's answer rejected, the teacher's rewrite chosen).
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import random
import re
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any

from pipeline.data import SeedPrompt
from pipeline.pairs import EPS, binarize
from pipeline.progress import progress
from pipeline.prompts import render
from pipeline.ratings import SCALES, ParsedRatings, Rating, answer_score, parse_ratings
from pipeline.recipe import FeedbackConfig, Recipe
from pipeline.sample import (
    NO_PRINCIPLE,
    Assignment,
    completion_id,
    read_columns,
    sample_responses,
    unique_prompts,
)
from pipeline.stages import StageReport
from pipeline.store import RunStore
from pipeline.teacher import (
    BudgetExceeded,
    ChatRequest,
    TeacherClient,
    TeacherError,
    TeacherFatal,
    teacher_for_stage,
)
from pipeline.work import stream_map

log = logging.getLogger(__name__)
STAGE = "feedback"
ON_POLICY = "on_policy"
ASPECT_TITLES = {"instruction_following": "instruction following", "honesty": "honesty",
                 "truthfulness": "truthfulness", "helpfulness": "helpfulness", "overall": "overall quality"}
TYPE_HINTS = {"truthfulness": "hallucination kinds found, or None", "helpfulness": "qualities present, or None"}


class FeedbackError(ValueError):
    """A feedback section that cannot run with this recipe; the message names the key."""


class RatingFailed(Exception):
    """No usable rating after every re-ask (or no usable correction): the item goes to the failure ledger."""

    def __init__(self, reason: str, attempts: int = 1):
        super().__init__(reason)
        self.reason, self.attempts = reason, attempts


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
class AspectVerdict:
    """The accepted judge reply for one aspect: `order[p]` is the answer shown as text p + 1."""

    aspect: str
    order: list[int]
    parsed: ParsedRatings
    raw: str
    attempt: int

    def rating_of(self, answer: int) -> tuple[int, Rating]:
        position = self.order.index(answer) + 1
        return position, self.parsed.ratings[position]


@dataclass
class Outcome:
    ratings: list[dict[str, Any]] = field(default_factory=list)
    pair: dict[str, Any] | None = None
    dropped: str | None = None


# -- the paper's steps -----------------------------------------------------------------------------
def _fence(text: str, tag: str) -> str:
    """Keep an answer from closing (or opening) the tags it is shown in."""
    return re.sub(rf"<(/?\s*{tag}\b[^>]*)>", r"‹\1›", text, flags=re.I)


async def rate_aspect(client: TeacherClient, cfg: FeedbackConfig, aspect: str, item_id: str, prompt: str,
                      answers: list[str]) -> AspectVerdict:
    """One judge call rates all answers on one aspect, in a shuffled order mapped back afterwards; an
    unusable reply is re-asked (new order, a reminder, a new cache tag), then the item fails."""
    n, problem, reminder, reply_text = len(answers), "", "", ""
    for attempt in range(1, cfg.max_parse_attempts + 1):
        order = list(range(n))
        random.Random(f"{cfg.seed}:{item_id}:{aspect}:{attempt}").shuffle(order)
        text = render("feedback_rating.jinja", aspect_title=ASPECT_TITLES[aspect],
                      rubric=render(f"feedback_{aspect}.jinja"), instruction=prompt,
                      texts=[_fence(answers[i], "text") for i in order], type_hint=TYPE_HINTS.get(aspect, ""),
                      scale_max=SCALES[aspect][1], allow_na=aspect == "honesty", reminder=reminder)
        reply = await client.chat(ChatRequest([{"role": "user", "content": text}], temperature=0.0,
                                              max_tokens=cfg.max_tokens_per_answer * n + 64,
                                              tag="" if attempt == 1 else f"reask-{attempt}"))
        reply_text = reply.text
        parsed = parse_ratings(reply.text, n, aspect)
        if parsed.complete:
            return AspectVerdict(aspect, order, parsed, reply.text, attempt)
        cut = " - the reply was cut off" if reply.finish_reason == "length" else ""
        problem = parsed.summary() + cut
        # the next attempt shows the answers in another order, so the reminder names no text numbers
        reminder = "; ".join(sorted(set(parsed.problems.values()))) + cut
    raise RatingFailed(f"unusable {aspect} rating after {cfg.max_parse_attempts} attempts ({problem}); "
                       f"last reply {reply_text[:200]!r}", cfg.max_parse_attempts)


async def rate_responses(client: TeacherClient, cfg: FeedbackConfig, item_id: str, prompt: str,
                         answers: list[str]) -> dict[str, AspectVerdict]:
    """Every aspect (and the overall critique if asked) for all answers of one prompt, concurrently."""
    aspects = [*cfg.aspects, *(["overall"] if cfg.overall_critique else [])]
    results = await asyncio.gather(*(rate_aspect(client, cfg, a, item_id, prompt, answers) for a in aspects),
                                   return_exceptions=True)
    errors = [r for r in results if isinstance(r, BaseException)]
    if errors:  # a stop (budget, bad key) outranks an item's own failure
        raise next((e for e in errors if isinstance(e, (BudgetExceeded, TeacherFatal))), errors[0])
    return dict(zip(aspects, results, strict=True))


def score_answers(verdicts: dict[str, AspectVerdict], n: int) -> list[float | None]:
    """Mean of each answer's aspect ratings (N/A left out), with the overall score if it was asked for."""
    scores = []
    for i in range(n):
        aspects = {a: v.rating_of(i)[1].value for a, v in verdicts.items() if a != "overall"}
        overall = verdicts["overall"].rating_of(i)[1].value if "overall" in verdicts else None
        scores.append(answer_score(aspects, overall))
    return scores


async def correct_response(client: TeacherClient, recipe: Recipe, prompt: str, draft: str) -> str:
    """The teacher's corrected rewrite of the student's draft."""
    text = render("feedback_correction.jinja", question=prompt, draft=_fence(draft, "draft"))
    reply = await client.chat(ChatRequest([{"role": "user", "content": text}], temperature=0.0,
                                          max_tokens=recipe.feedback.max_tokens_per_answer))
    corrected = re.sub(r"^\W*corrected answer\W*", "", reply.text.strip(), flags=re.I).strip()
    if reply.finish_reason == "length":
        raise RatingFailed("correction: the rewrite was cut off at feedback.max_tokens_per_answer")
    if not corrected:
        raise RatingFailed("correction: the teacher returned an empty rewrite")
    return corrected


def correction_pair(scores: list[float | None], min_margin: float) -> tuple[int, int] | str:
    """(rewrite, draft) when the rewrite scores more than min_margin above the draft."""
    draft, rewrite = scores
    if draft is None or rewrite is None:
        return "fewer_than_2_rated_answers"
    return (1, 0) if rewrite - draft > min_margin + EPS else "correction_not_better"


async def judge_item(client: TeacherClient, recipe: Recipe, item: Item) -> Outcome:
    """Rate one item's answers and binarize them into a pair (or say why not)."""
    cfg = recipe.feedback
    answers = list(item.answers)
    if item.source == "correction":
        corrected = await correct_response(client, recipe, item.prompt, answers[0].text)
        if corrected == answers[0].text.strip():
            return Outcome(dropped="correction_unchanged")
        answers.append(Answer(completion_id(item.prompt_id, "correction", 0), f"{recipe.teacher.model}/correction",
                              corrected))
    verdicts = await rate_responses(client, cfg, item.item_id, item.prompt, [a.text for a in answers])
    scores = score_answers(verdicts, len(answers))
    ratings = rating_rows(item, answers, verdicts, scores, recipe.teacher.model)
    strategy = {"pool": cfg.pairs.strategy, ON_POLICY: "best_vs_worst", "correction": "rewrite_vs_draft"}[item.source]
    if item.source == "correction":
        picked = correction_pair(scores, cfg.pairs.min_margin)
    else:
        picked = binarize(scores, strategy, cfg.pairs.min_margin, random.Random(f"{cfg.pairs.seed}:{item.item_id}"))
    if isinstance(picked, str):
        return Outcome(ratings, dropped=picked)
    return Outcome(ratings, pair=pair_row(item, answers, verdicts, scores, picked, strategy))


# -- records ---------------------------------------------------------------------------------------
def rating_rows(item: Item, answers: list[Answer], verdicts: dict[str, AspectVerdict], scores: list[float | None],
                judge: str) -> list[dict[str, Any]]:
    rows = []
    for aspect, v in verdicts.items():
        for i, a in enumerate(answers):
            position, r = v.rating_of(i)
            rows.append({
                "rating_id": hashlib.sha256(f"{item.item_id}:{a.completion_id}:{aspect}".encode()).hexdigest(),
                "item_id": item.item_id, "source": item.source, "prompt_id": item.prompt_id,
                "completion_id": a.completion_id, "model": a.model, "aspect": aspect, "rating": r.value,
                "na": r.na, "type": r.type, "rationale": r.rationale, "position": position, "shown": len(answers),
                "attempt": v.attempt, "score": scores[i], "judge_model": judge, "raw": v.raw,
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
        row[f"chosen_{aspect}"] = v.rating_of(c)[1].value
        row[f"rejected_{aspect}"] = v.rating_of(r)[1].value
    return row


def read_answers(store: RunStore, stage: str, name: str, order: list[str]) -> dict[str, list[dict[str, Any]]]:
    """Completions grouped by prompt, in pool order then sample index."""
    grouped: dict[str, list[dict[str, Any]]] = defaultdict(list)
    columns = ["completion_id", "prompt_id", "prompt", "prompt_source", "model", "model_path", "completion",
               "sample_index"]
    for row in read_columns(store, columns, stage, name):
        grouped[row["prompt_id"]].append(row)
    rank = {m: i for i, m in enumerate(order)}
    for rows in grouped.values():
        rows.sort(key=lambda r: (rank.get(r["model"], len(rank)), r["model"], r["sample_index"]))
    return grouped


def _answers(rows: list[dict[str, Any]]) -> tuple[Answer, ...]:
    return tuple(Answer(r["completion_id"], r["model"], r["completion"]) for r in rows)


def check_sources(recipe: Recipe) -> None:
    cfg = recipe.feedback
    if "correction" in cfg.sources and ON_POLICY not in cfg.sources \
            and not any(m.model == "sft" for m in recipe.sample.pool):
        raise FeedbackError("feedback.sources has 'correction' but nothing gives a student answer to correct: "
                            "add 'on_policy' to feedback.sources or a pool model with model: sft")


def build_items(recipe: Recipe, prompts: list[SeedPrompt], pool: dict[str, list[dict]],
                on_policy: dict[str, list[dict]]) -> list[Item]:
    """One item per prompt and source (a prompt without answers too: it is dropped, so still accounted
    for); a correction item holds the student's answer to be rewritten."""
    sources = recipe.feedback.sources
    students = {m.name for m in recipe.sample.pool if m.model == "sft"}
    items = []
    for p in prompts:
        rows = pool.get(p.prompt_id, [])
        if "pool" in sources:
            items.append(Item("pool", p.prompt_id, p.prompt, _answers(rows)))
        if ON_POLICY in sources:
            items.append(Item(ON_POLICY, p.prompt_id, p.prompt, _answers(on_policy.get(p.prompt_id, []))))
        if "correction" in sources:
            drafts = on_policy.get(p.prompt_id, []) if ON_POLICY in sources else \
                [r for r in rows if r["model"] in students]
            items.append(Item("correction", p.prompt_id, p.prompt, _answers(drafts[:1])))
    return items


def sample_on_policy(recipe: Recipe, store: RunStore, prompts: list[SeedPrompt]) -> tuple[str, dict[str, float]]:
    """k answers per prompt from this run's student, into feedback/on_policy-*.parquet (resumable)."""
    cfg = recipe.feedback
    sampler = cfg.on_policy_sampler
    writer = store.shard_writer(STAGE, name=ON_POLICY, shard_size=cfg.shard_size, id_key="completion_id")
    done = writer.done_ids()
    todo = [a for p in prompts for i in range(cfg.on_policy_k)
            if (a := Assignment(p, sampler.name, NO_PRINCIPLE, i, cfg.seed)).completion_id not in done]
    if not todo:
        return "", {}
    log.info("feedback: %d on-policy samples from %s", len(todo), sampler.model)
    with writer:
        return sample_responses(sampler, todo, recipe, store, writer, store.ledger(STAGE, "on_policy_failures"),
                                cfg.shard_size)


def run(recipe: Recipe, store: RunStore) -> StageReport:
    """Rate every sampled answer, binarize into pairs; every item ends as a pair, dropped or failed."""
    check_sources(recipe)
    prompts = unique_prompts(recipe)  # the sample stage's prompts, those it got no answer for included
    pool = read_answers(store, "sample", "completions", [m.name for m in recipe.sample.pool])
    if not pool:
        raise FeedbackError(f"no sampled answers in {store.url}/sample; run `distill stage sample` first")
    stop, cost = "", {}
    on_policy: dict[str, list[dict]] = {}
    if ON_POLICY in recipe.feedback.sources:
        stop, cost = sample_on_policy(recipe, store, prompts)
        on_policy = read_answers(store, STAGE, ON_POLICY, [])
    items = build_items(recipe, prompts, pool, on_policy)
    return asyncio.run(judge_all(recipe, store, items, stop, cost))


# -- the stage loop --------------------------------------------------------------------------------
class Outbox:
    """Finished items' ratings, pairs and dropped lines, published together and ratings first: an item that
    counts as done (a pair or a dropped line) always has its ratings on disk; a rerun skips ratings it has."""

    def __init__(self, store: RunStore, shard_size: int):
        never = 10**12  # published by flush() only, so the three stay in step
        self.ratings = store.shard_writer(STAGE, "ratings", shard_size=never, id_key="rating_id")
        self.pairs = store.shard_writer(STAGE, "pairs", shard_size=never, id_key="pair_id")
        self.dropped = store.ledger(STAGE, "dropped")
        self.shard_size = shard_size
        self._rating_ids = self.ratings.done_ids()
        self._drops: list[tuple[str, str]] = []
        self._items = 0

    def done_items(self) -> set[str]:
        return self.pairs.done_ids() | {e.item_id for e in self.dropped.entries()}

    def add(self, item: Item, outcome: Outcome) -> None:
        for row in outcome.ratings:
            if row["rating_id"] not in self._rating_ids:
                self._rating_ids.add(row["rating_id"])
                self.ratings.add(row)
        if outcome.pair is not None:
            self.pairs.add(outcome.pair)
        else:
            self._drops.append((item.item_id, outcome.dropped or "unknown"))
        self._items += 1
        if self._items >= self.shard_size:
            self.flush()

    def flush(self) -> None:
        self.ratings.flush()
        self.pairs.flush()
        for item_id, reason in self._drops:
            self.dropped.record(item_id, reason)
        self._drops, self._items = [], 0

    def __enter__(self) -> Outbox:
        return self

    def __exit__(self, *exc: object) -> None:
        self.flush()  # what finished is kept even when the stage stops


async def judge_all(recipe: Recipe, store: RunStore, items: list[Item], stop: str,
                    cost: dict[str, float]) -> StageReport:
    """Judge every item not yet done, streaming; a budget stop drains what is in flight and starts nothing new."""
    from pipeline.pairs import account_feedback

    client = teacher_for_stage(recipe, store)
    failures = store.ledger(STAGE)
    stopped = [stop] if stop else []
    try:
        with Outbox(store, recipe.feedback.shard_size) as outbox:
            done = outbox.done_items()
            todo = []
            for item in items if not stopped else []:
                if item.item_id in done:
                    continue
                if not item.answers or (item.source != "correction" and len(item.answers) < 2):
                    outbox.add(item, Outcome(dropped="no_student_answer" if item.source == "correction"
                                             else "fewer_than_2_answers"))
                else:
                    todo.append(item)
            bar = progress(STAGE, len(todo), "prompt")
            async for item, result in stream_map(todo, lambda it: judge_item(client, recipe, it),
                                                 recipe.teacher.max_concurrency, stop=lambda: bool(stopped)):
                bar.update(1)
                if isinstance(result, (BudgetExceeded, TeacherFatal)):
                    stopped.append(str(result))
                elif isinstance(result, (RatingFailed, TeacherError)):
                    failures.record(item.item_id, result.reason, result.attempts)
                elif isinstance(result, BaseException):
                    failures.record(item.item_id, f"{type(result).__name__}: {result}")
                else:
                    outbox.add(item, result)
            bar.close()
    finally:
        await client.aclose()
        if client.cache is not None:
            client.cache.close()
    usage = client.usage.as_cost()
    total = {k: usage.get(k, 0.0) + cost.get(k, 0.0) for k in set(usage) | set(cost)}
    return account_feedback(recipe, store, items, total, stopped[0] if stopped else "")
