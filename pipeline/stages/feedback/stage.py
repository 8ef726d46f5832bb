"""AI feedback (UltraFeedback): the rater scores every answer on each aspect; the ratings become DPO pairs.

Pairs come from up to three sources: `pool` (the sample stage's answers), `on_policy` (k samples of this
run's student, best vs worst) and `correction` (the student's answer rejected, the teacher's rewrite chosen).
"""

from __future__ import annotations

import asyncio
import itertools
import logging
from collections import Counter, defaultdict
from collections.abc import Callable, Container, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

from pipeline.backends.answers import COMPLETIONS_SCHEMA, NO_PRINCIPLE, Assignment, sample_responses
from pipeline.core.idset import IdSet
from pipeline.core.ledger import LedgerTally, tally
from pipeline.core.progress import progress
from pipeline.core.recipe import Recipe
from pipeline.core.sources import SeedPrompt, iter_unique_prompts
from pipeline.core.stage import ItemStream, StageReport, conclude, say_loud_drops
from pipeline.core.store import RunStore
from pipeline.stages.feedback.answerbook import AnswerBook
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


class FeedbackError(ValueError):
    """A feedback section that cannot run with this recipe; the message names the key."""


def run(recipe: Recipe, store: RunStore) -> StageReport:
    """Rate every sampled answer, binarize into pairs; every item ends as a pair, dropped or failed."""
    check_sources(recipe)
    src = recipe.sample.prompts or recipe.prompts

    def prompts() -> Iterator[SeedPrompt]:  # the sample stage's prompts, those it got no answer for included
        return iter_unique_prompts(src, recipe.task)

    with AnswerBook() as pool, AnswerBook() as on_policy:
        if not pool.load(store, "sample", "completions", [m.name for m in recipe.sample.pool]):
            raise FeedbackError(f"no sampled answers in {store.url}/sample; run `distill stage sample` first")
        excluded = store.ledger("sample", "dropped").ids()  # e.g. contaminated
        stop, cost = "", {}
        if ON_POLICY in recipe.feedback.sources:
            stop, cost = sample_on_policy(recipe, store, (p for p in prompts() if p.prompt_id not in excluded))
            on_policy.load(store, STAGE, ON_POLICY, [])

        def items() -> Iterator[Item]:
            return build_items(recipe, prompts(), pool, on_policy)

        judged = asyncio.run(judge_all(recipe, store, items, stop, excluded))
        total = {k: judged.cost.get(k, 0.0) + cost.get(k, 0.0) for k in set(judged.cost) | set(cost)}
        return account_feedback(recipe, store, items(), total, judged.stop, judged)


def _answers(rows: list[dict[str, Any]]) -> tuple[Answer, ...]:
    return tuple(Answer(r["completion_id"], r["model"], r["completion"]) for r in rows)


def check_sources(recipe: Recipe) -> None:
    cfg = recipe.feedback
    if "correction" in cfg.sources and ON_POLICY not in cfg.sources \
            and not any(m.model in STUDENTS for m in recipe.sample.pool):
        raise FeedbackError("feedback.sources has 'correction' but nothing gives a student answer to correct: "
                            "add 'on_policy' to feedback.sources or a pool model with model: sft")


def build_items(recipe: Recipe, prompts: Iterable[SeedPrompt], pool: AnswerBook,
                on_policy: AnswerBook) -> Iterator[Item]:
    """One item per prompt and source (a prompt without answers too: it is dropped, so still accounted
    for); a correction item holds the student's answer to be rewritten. A stream, a prompt at a time."""
    sources = recipe.feedback.sources
    students = {m.name for m in recipe.sample.pool if m.model in STUDENTS}
    for p in prompts:
        rows = pool.get(p.prompt_id)
        mine = on_policy.get(p.prompt_id) if ON_POLICY in sources else []
        if "pool" in sources:
            yield Item("pool", p.prompt_id, p.prompt, _answers(rows))
        if ON_POLICY in sources:
            yield Item(ON_POLICY, p.prompt_id, p.prompt, _answers(mine))
        if "correction" in sources:
            drafts = mine if ON_POLICY in sources else [r for r in rows if r["model"] in students]
            yield Item("correction", p.prompt_id, p.prompt, _answers(drafts[:1]))


def sample_on_policy(recipe: Recipe, store: RunStore, prompts: Iterable[SeedPrompt]) -> tuple[str, dict[str, float]]:
    """k answers per prompt from this run's student, into feedback/on_policy-*.parquet (resumable)."""
    cfg = recipe.feedback
    sampler = cfg.on_policy_sampler
    writer = store.shard_writer(STAGE, name=ON_POLICY, shard_size=cfg.shard_size, id_key="completion_id",
                                schema=COMPLETIONS_SCHEMA)
    done = writer.done_set()
    todo = (a for p in prompts for i in range(cfg.on_policy_k)
            if (a := Assignment(p, sampler.name, NO_PRINCIPLE, i, cfg.seed)).completion_id not in done)
    first = next(todo, None)
    if first is None:
        return "", {}
    log.info("feedback: on-policy samples from %s", sampler.model)
    with writer:
        return sample_responses(sampler, itertools.chain([first], todo), recipe, store, writer,
                                store.ledger(STAGE, "on_policy_failures"), cfg.shard_size, stage=STAGE)


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
        self._rating_ids = self.ratings.done_set()
        self._drops: list[tuple[str, str]] = []
        self._items = 0

    def done_items(self) -> IdSet:
        return self.pairs.done_set() | self.dropped.ids()

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


def unrated_outcome(item: Item, excluded: Container[str]) -> Outcome | None:
    """How an item ends without a rating (sample dropped its prompt, or it has too few answers), or None."""
    if item.prompt_id in excluded:
        return Outcome(dropped=SAMPLE_DROPPED)
    if not item.answers or (item.source != "correction" and len(item.answers) < 2):
        return Outcome(dropped="no_student_answer" if item.source == "correction" else "fewer_than_2_answers")
    return None


async def judge_all(recipe: Recipe, store: RunStore, items: Callable[[], Iterable[Item]], stop: str,
                    excluded: Container[str] = frozenset()) -> Judged:
    """Judge every item not yet done, streaming; a stop drains what is in flight and starts nothing new.
    Items of `excluded` prompts (sample dropped them, e.g. contaminated) are dropped with that reason.
    `items` gives the stream anew: one pass ledgers the unrated items and counts the rest, the next rates them."""
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
            to_rate = 0
            for item in items() if not stop else []:
                if item.item_id not in done:
                    if (outcome := unrated_outcome(item, excluded)) is not None:
                        outbox.add(item, outcome)
                    else:
                        to_rate += 1
            todo = (it for it in (items() if not stop else [])
                    if it.item_id not in done and unrated_outcome(it, excluded) is None)
            bar = progress(STAGE, to_rate, "prompt")
            stream = ItemStream(store.ledger(STAGE), lambda it: it.item_id, progress=bar)
            stream.stopped = stop
            async for item, outcome in stream.results(todo, judge, session.concurrency("rater")):
                outbox.add(item, outcome)
            bar.close()
    judged.stop, judged.cost, judged.parsing = stream.stopped, session.usage(), session.parse_tallies()
    judged.concurrency = session.concurrency_settled()
    return judged


# -- the stage's accounting ------------------------------------------------------------------------
def account_feedback(recipe: Recipe, store: RunStore, items: Iterable[Item], cost: dict[str, float],
                     stop: str, judged: Judged | None = None) -> StageReport:
    """Every item is a pair, failed or dropped (or pending); stats.json, report.json and report.md from the store.
    The items and the ledgers are read as streams; the report holds the pairs and ratings it summarises."""
    pairs = list(store.read_records(STAGE, "pairs"))
    pair_ids = IdSet(p["pair_id"] for p in pairs)
    dropped_ledger, failures = store.ledger(STAGE, "dropped"), store.ledger(STAGE)
    dropped = tally(dropped_ledger, lambda reason: reason)
    dropped_ids = dropped_ledger.ids()
    failed = tally(failures, lambda reason: reason.split(" (", 1)[0][:80], pair_ids | dropped_ids)
    outcomes = item_outcomes(items, pair_ids, failures.ids(), dropped_ids)
    ratings = list(store.read_records(STAGE, "ratings",
                                      columns=["item_id", "completion_id", "aspect", "position", "order", "rating",
                                               "model", "attempt", "judge_model"]))
    n_items = sum(c["items"] for c in outcomes.by_source.values())
    pending = sum(c["pending"] for c in outcomes.by_source.values())
    counts = {"input": n_items, "prompts": len(outcomes.prompts), "output": len(pair_ids),
              "failed": failed.items, "dropped": dropped.items, "pending": pending}
    judged = judged or Judged()
    before = store.read_json(store.join(STAGE, "stats.json"), {}) or {}
    stats = {"counts": counts, **feedback_stats(recipe, store, outcomes, pairs, ratings, failed, dropped),
             "teacher": cost, "parsing": merge_tallies(before.get("parsing"), judged.parsing),
             "concurrency": judged.concurrency}
    report = feedback_report(pairs, ratings, mitigation_effects(recipe.feedback, pairs, ratings,
                                                                stats["dropped_by_reason"]))
    report["parsing"] = stats["parsing"]
    store.write_json(store.join(STAGE, "stats.json"), stats)
    store.write_json(store.join(STAGE, "report.json"), report)
    store.write_bytes(store.join(STAGE, "report.md"), report_markdown(report, stats).encode())
    status, message = conclude(
        STAGE, stop=stop, pending=pending, failed=failed.items, total=n_items - dropped.items,
        max_failure_rate=recipe.feedback.max_failure_rate, ledger=store.join(STAGE, "failures.jsonl"),
        saved=f"{len(pair_ids)} pairs", retry="rerun to retry them" if judged.rerun_sends else NO_RETRY,
        done=(f"{len(pair_ids)} pairs from {n_items} items, {failed.items} failed, {dropped.items} dropped; "
              f"mean margin {report['margin']['mean']}" + concurrency_note(judged.concurrency)))
    reasons = (e.reason for e in itertools.chain(failures.iter_entries(), dropped_ledger.iter_entries()))
    message, stats["warnings"] = say_loud_drops(STAGE, message, reasons, n_items)
    store.write_json(store.join(STAGE, "stats.json"), stats)
    return StageReport(STAGE, status, counts, cost,
                       {"pairs": store.join(STAGE), "report": store.join(STAGE, "report.md")}, message)


@dataclass
class ItemOutcomes:
    """Each source's items by outcome, and the prompts they came from (16 bytes a prompt)."""

    by_source: dict[str, Counter[str]] = field(default_factory=lambda: defaultdict(Counter))
    prompts: IdSet = field(default_factory=IdSet)


def item_outcomes(items: Iterable[Item], pairs: Container[str], failed: Container[str],
                  dropped: Container[str]) -> ItemOutcomes:
    """One pass over the items: how each ended (a pair, failed, dropped, or still pending)."""
    out = ItemOutcomes()
    for item in items:
        outcome = ("pairs" if item.item_id in pairs else "failed" if item.item_id in failed else
                   "dropped" if item.item_id in dropped else "pending")
        out.by_source[item.source]["items"] += 1
        out.by_source[item.source][outcome] += 1
        out.prompts.add(item.prompt_id)
    return out


def feedback_stats(recipe: Recipe, store: RunStore, outcomes: ItemOutcomes, pairs: list[dict[str, Any]],
                   ratings: list[dict[str, Any]], failed: LedgerTally, dropped: LedgerTally) -> dict[str, Any]:
    """Outcomes per source, reasons, re-asks, margin violations and the on-policy samples, for stats.json."""
    margin = recipe.feedback.pairs.min_margin
    on_policy_ids = store.shard_writer(STAGE, name=ON_POLICY, id_key="completion_id").done_set()
    return {
        "by_source": {s: dict(c) for s, c in sorted(outcomes.by_source.items())},
        "dropped_by_reason": dict(dropped.by_reason),
        "failed_by_reason": dict(failed.by_reason),
        "ratings": len(ratings),
        "ratings_after_reask": sum(r["attempt"] > 1 for r in ratings),
        "margin_violations": sum(p["score_chosen"] <= p["score_rejected"] + margin for p in pairs),
        "on_policy_samples": len(on_policy_ids),
        "on_policy_failed": tally(store.ledger(STAGE, "on_policy_failures"), str, on_policy_ids).items,
    }
