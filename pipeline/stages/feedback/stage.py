"""AI feedback (UltraFeedback): the rater scores every answer on each aspect; the ratings become DPO pairs.

Pairs come from up to three sources: `pool` (the sample stage's answers), `on_policy` (k samples of this
run's student, best vs worst) and `correction` (the student's answer rejected, the teacher's rewrite chosen).
"""

from __future__ import annotations

import asyncio
import logging
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from typing import Any

from pipeline.backends.answers import COMPLETIONS_SCHEMA, NO_PRINCIPLE, Assignment, sample_responses
from pipeline.core.progress import progress
from pipeline.core.recipe import Recipe
from pipeline.core.sources import SeedPrompt, unique_prompts
from pipeline.core.stage import ItemStream, StageReport, conclude, say_loud_drops
from pipeline.core.store import RunStore
from pipeline.stages.feedback.debias import mitigation_effects
from pipeline.stages.feedback.rate import (
    ON_POLICY,
    STUDENTS,
    Answer,
    Item,
    Outcome,
    RatingFailed,
    judge_item,
    rated_aspects,
)
from pipeline.stages.feedback.report import feedback_report, report_markdown
from pipeline.stages.feedback.schema import RATINGS, pairs_schema
from pipeline.teacher.client import TeacherError
from pipeline.teacher.session import concurrency_note, teacher_session
from pipeline.teacher.structured import merge_tallies

log = logging.getLogger(__name__)
STAGE = "feedback"
SAMPLE_DROPPED = "prompt_dropped_by_sample"  # e.g. contaminated: see sample/dropped.jsonl
NO_RETRY = ("a rerun would answer their requests from the response cache and fail them the same way: "
            "change what their reasons name")
ANSWER_COLUMNS = ["completion_id", "prompt_id", "prompt", "prompt_source", "model", "model_path", "completion",
                  "sample_index"]


class FeedbackError(ValueError):
    """A feedback section that cannot run with this recipe; the message names the key."""


def run(recipe: Recipe, store: RunStore) -> StageReport:
    """Rate every sampled answer, binarize into pairs; every item ends as a pair, dropped or failed."""
    check_sources(recipe)
    prompts = unique_prompts(recipe.sample.prompts or recipe.prompts, recipe.task)  # the sample stage's prompts, those it got no answer for included
    pool = read_answers(store, "sample", "completions", [m.name for m in recipe.sample.pool])
    if not pool:
        raise FeedbackError(f"no sampled answers in {store.url}/sample; run `distill stage sample` first")
    excluded = {pid: e.reason for pid, e in store.ledger("sample", "dropped").latest().items()}  # contaminated
    stop, cost = "", {}
    on_policy: dict[str, list[dict]] = {}
    if ON_POLICY in recipe.feedback.sources:
        stop, cost = sample_on_policy(recipe, store, [p for p in prompts if p.prompt_id not in excluded])
        on_policy = read_answers(store, STAGE, ON_POLICY, [])
    items = build_items(recipe, prompts, pool, on_policy)
    judged = asyncio.run(judge_all(recipe, store, items, stop, set(excluded)))
    total = {k: judged.cost.get(k, 0.0) + cost.get(k, 0.0) for k in set(judged.cost) | set(cost)}
    return account_feedback(recipe, store, items, total, judged.stop, judged)


def read_answers(store: RunStore, stage: str, name: str, order: list[str]) -> dict[str, list[dict[str, Any]]]:
    """Completions grouped by prompt, in pool order then sample index."""
    grouped: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for row in store.read_records(stage, name, columns=ANSWER_COLUMNS):
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
            and not any(m.model in STUDENTS for m in recipe.sample.pool):
        raise FeedbackError("feedback.sources has 'correction' but nothing gives a student answer to correct: "
                            "add 'on_policy' to feedback.sources or a pool model with model: sft")


def build_items(recipe: Recipe, prompts: list[SeedPrompt], pool: dict[str, list[dict]],
                on_policy: dict[str, list[dict]]) -> list[Item]:
    """One item per prompt and source (a prompt without answers too: it is dropped, so still accounted
    for); a correction item holds the student's answer to be rewritten."""
    sources = recipe.feedback.sources
    students = {m.name for m in recipe.sample.pool if m.model in STUDENTS}
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
    writer = store.shard_writer(STAGE, name=ON_POLICY, shard_size=cfg.shard_size, id_key="completion_id",
                                schema=COMPLETIONS_SCHEMA)
    done = writer.done_ids()
    todo = [a for p in prompts for i in range(cfg.on_policy_k)
            if (a := Assignment(p, sampler.name, NO_PRINCIPLE, i, cfg.seed)).completion_id not in done]
    if not todo:
        return "", {}
    log.info("feedback: %d on-policy samples from %s", len(todo), sampler.model)
    with writer:
        return sample_responses(sampler, todo, recipe, store, writer, store.ledger(STAGE, "on_policy_failures"),
                                cfg.shard_size, stage=STAGE)


# -- the stage loop --------------------------------------------------------------------------------
class Outbox:
    """Finished items' ratings, pairs and dropped lines, published together and ratings first: an item that
    counts as done (a pair or a dropped line) always has its ratings on disk; a rerun skips ratings it has."""

    def __init__(self, store: RunStore, shard_size: int, aspects: list[str]):
        never = 10**12  # published by flush() only, so the three stay in step
        self.ratings = store.shard_writer(STAGE, "ratings", shard_size=never, id_key="rating_id", schema=RATINGS)
        self.pairs = store.shard_writer(STAGE, "pairs", shard_size=never, id_key="pair_id",
                                        schema=pairs_schema(aspects))
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


@dataclass
class Judged:
    """How the rating loop ended: why it stopped early (if it did), its cost, each rater's parse tally, and
    whether some item failed in a way a rerun asks again for (an unusable reply, a failed request)."""

    stop: str = ""
    cost: dict[str, float] = field(default_factory=dict)
    parsing: dict[str, dict[str, Any]] = field(default_factory=dict)
    concurrency: dict[str, dict[str, Any]] = field(default_factory=dict)  # per endpoint (session.concurrency_settled)
    rerun_sends: bool = False


async def judge_all(recipe: Recipe, store: RunStore, items: list[Item], stop: str,
                    excluded: set[str] = frozenset()) -> Judged:
    """Judge every item not yet done, streaming; a stop drains what is in flight and starts nothing new.
    Items of `excluded` prompts (sample dropped them, e.g. contaminated) are dropped with that reason."""
    judged = Judged()

    async def judge(item: Item) -> Outcome:
        try:
            return await judge_item(rater, recipe, item, panel)
        except (RatingFailed, TeacherError):  # the unusable replies are marked, a failed request is not cached
            judged.rerun_sends = True
            raise

    async with teacher_session(recipe, store, STAGE) as session:
        rater = session.for_role("rater")
        panel = [session.for_endpoint(name, "rater") for name in recipe.feedback.panel] or None
        with Outbox(store, recipe.feedback.shard_size, rated_aspects(recipe.feedback)) as outbox:
            done = outbox.done_items()
            todo = []
            for item in items if not stop else []:
                if item.item_id in done:
                    continue
                if item.prompt_id in excluded:
                    outbox.add(item, Outcome(dropped=SAMPLE_DROPPED))
                elif not item.answers or (item.source != "correction" and len(item.answers) < 2):
                    outbox.add(item, Outcome(dropped="no_student_answer" if item.source == "correction"
                                             else "fewer_than_2_answers"))
                else:
                    todo.append(item)
            bar = progress(STAGE, len(todo), "prompt")
            stream = ItemStream(store.ledger(STAGE), lambda it: it.item_id, progress=bar)
            stream.stopped = stop
            async for item, outcome in stream.results(todo, judge, session.concurrency("rater")):
                outbox.add(item, outcome)
            bar.close()
    judged.stop, judged.cost, judged.parsing = stream.stopped, session.usage(), session.parse_tallies()
    judged.concurrency = session.concurrency_settled()
    return judged


# -- the stage's accounting ------------------------------------------------------------------------
def account_feedback(recipe: Recipe, store: RunStore, items: list[Item], cost: dict[str, float],
                     stop: str, judged: Judged | None = None) -> StageReport:
    """Every item is a pair, failed or dropped (or pending); stats.json, report.json and report.md from the store."""
    pairs = list(store.read_records(STAGE, "pairs"))
    pair_ids = {p["pair_id"] for p in pairs}
    dropped = store.ledger(STAGE, "dropped").latest()
    failed = store.ledger(STAGE).compact(pair_ids | set(dropped))
    item_ids = {i.item_id for i in items}
    pending = item_ids - pair_ids - set(failed) - set(dropped)
    ratings = list(store.read_records(STAGE, "ratings",
                                      columns=["item_id", "completion_id", "aspect", "position", "order", "rating",
                                               "model", "attempt", "judge_model"]))
    counts = {"input": len(item_ids), "prompts": len({i.prompt_id for i in items}), "output": len(pair_ids),
              "failed": len(failed), "dropped": len(dropped), "pending": len(pending)}
    judged = judged or Judged()
    before = store.read_json(store.join(STAGE, "stats.json"), {}) or {}
    stats = {"counts": counts, **feedback_stats(recipe, store, items, pairs, ratings, failed, dropped), "teacher": cost,
             "parsing": merge_tallies(before.get("parsing"), judged.parsing), "concurrency": judged.concurrency}
    report = feedback_report(pairs, ratings, mitigation_effects(recipe.feedback, pairs, ratings,
                                                                stats["dropped_by_reason"]))
    report["parsing"] = stats["parsing"]
    store.write_json(store.join(STAGE, "stats.json"), stats)
    store.write_json(store.join(STAGE, "report.json"), report)
    store.write_bytes(store.join(STAGE, "report.md"), report_markdown(report, stats).encode())
    status, message = conclude(
        STAGE, stop=stop, pending=len(pending), failed=len(failed), total=len(item_ids) - len(dropped),
        max_failure_rate=recipe.feedback.max_failure_rate, ledger=store.join(STAGE, "failures.jsonl"),
        saved=f"{len(pair_ids)} pairs", retry="rerun to retry them" if judged.rerun_sends else NO_RETRY,
        done=(f"{len(pair_ids)} pairs from {len(item_ids)} items, {len(failed)} failed, {len(dropped)} dropped; "
              f"mean margin {report['margin']['mean']}" + concurrency_note(judged.concurrency)))
    message, stats["warnings"] = say_loud_drops(
        STAGE, message, [r.reason for r in [*failed.values(), *dropped.values()]], len(item_ids))
    store.write_json(store.join(STAGE, "stats.json"), stats)
    return StageReport(STAGE, status, counts, cost,
                       {"pairs": store.join(STAGE), "report": store.join(STAGE, "report.md")}, message)


def feedback_stats(recipe: Recipe, store: RunStore, items: list[Item], pairs: list[dict[str, Any]],
                   ratings: list[dict[str, Any]], failed: dict, dropped: dict) -> dict[str, Any]:
    """Outcomes per source, reasons, re-asks, margin violations and the on-policy samples, for stats.json."""
    pair_ids = {p["pair_id"] for p in pairs}
    by_source: dict[str, Counter[str]] = defaultdict(Counter)
    for item in items:
        outcome = ("pairs" if item.item_id in pair_ids else "failed" if item.item_id in failed else
                   "dropped" if item.item_id in dropped else "pending")
        by_source[item.source]["items"] += 1
        by_source[item.source][outcome] += 1
    margin = recipe.feedback.pairs.min_margin
    on_policy_ids = {r["completion_id"] for r in store.read_records(STAGE, ON_POLICY, columns=["completion_id"])}
    return {
        "by_source": {s: dict(c) for s, c in sorted(by_source.items())},
        "dropped_by_reason": dict(Counter(d.reason for d in dropped.values())),
        "failed_by_reason": dict(Counter(f.reason.split(" (", 1)[0][:80] for f in failed.values())),
        "ratings": len(ratings),
        "ratings_after_reask": sum(r["attempt"] > 1 for r in ratings),
        "margin_violations": sum(p["score_chosen"] <= p["score_rejected"] + margin for p in pairs),
        "on_policy_samples": len(on_policy_ids),
        "on_policy_failed": len(store.ledger(STAGE, "on_policy_failures").compact(on_policy_ids)),
    }
