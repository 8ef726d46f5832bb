"""dSFT data (UltraChat style): the teacher plays both the user and the assistant in multi-turn dialogues.

Seed prompts are deduplicated and decontaminated first; self-instruct and self-prompting may then grow them
(every new instruction through the same filter); each prompt becomes a simulated dialogue; duplicate
dialogues are removed last, in input order.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import logging
import time
from collections import Counter
from collections.abc import Iterable, Iterator
from typing import Any

from pipeline.core.decontam import CONTAMINATED, Decontaminator, load_decontaminator
from pipeline.core.idset import IdSet
from pipeline.core.ledger import tally
from pipeline.core.progress import progress
from pipeline.core.recipe import GenerateConfig, Recipe
from pipeline.core.sources import SeedPrompt, iter_prompts
from pipeline.core.stage import ItemStream, StageReport, conclude, loud_drops
from pipeline.core.store import RunStore
from pipeline.core.templates import render
from pipeline.stages.generate.dedup import DialogueDedup, remove_duplicate_dialogues
from pipeline.stages.generate.dialogue import Dialogue, simulate_dialogue
from pipeline.stages.generate.filters import DialogueFilters
from pipeline.stages.generate.instruction_filter import InstructionFilter
from pipeline.stages.generate.neardup import NearDuplicateIndex
from pipeline.stages.generate.schema import DIALOGUES
from pipeline.stages.generate.self_instruct import expand
from pipeline.stages.generate.self_prompting import self_prompt
from pipeline.stages.generate.worklist import PromptList
from pipeline.teacher.session import RoleClient, TeacherSession, concurrency_note, teacher_session

log = logging.getLogger(__name__)
STAGE = "generate"
CHUNK = 2000  # prompts selected (kept or dropped) between writes of the work list and the dropped ledger


def select_prompts(seeds: Iterable[SeedPrompt], cfg: GenerateConfig, decon: Decontaminator,
                   seen: IdSet) -> Iterator[tuple[SeedPrompt, tuple[str, dict | None] | None]]:
    """Each seed whose id is not in `seen` (the same prompt twice is one item), with why it is dropped before
    the teacher is paid (empty, contaminated, a near duplicate of an earlier one), or None when it is kept."""
    with contextlib.ExitStack() as stack:
        near = stack.enter_context(NearDuplicateIndex(cfg.filters.near_dup_threshold)) if cfg.filters.dedup else None
        for s in seeds:
            if not seen.add_new(s.prompt_id):
                continue
            if not s.prompt:
                yield s, ("empty_prompt", None)
            elif decon and (match := decon.match(s.prompt)) is not None:
                yield s, (match.reason, match.detail())
            elif near is not None and near.seen(s.prompt, s.prompt_id):
                yield s, ("near_duplicate_prompt", None)
            else:
                yield s, None


def _record(seed: SeedPrompt, dlg: Dialogue, model: str) -> dict:
    blob = json.dumps(dlg.messages, sort_keys=True).encode()
    return {
        "prompt": seed.prompt, "prompt_id": seed.prompt_id, "messages": dlg.messages,
        "source": seed.source, "teacher_model": model,
        "root_prompt_id": seed.root, "parent_prompt_id": seed.parent_prompt_id, "depth": seed.depth,
        "rounds": sum(m["role"] == "assistant" for m in dlg.messages), "target_rounds": dlg.target_rounds,
        "stop_reason": dlg.stop_reason, "stop_detail": dlg.stop_detail, "contaminated_by": dlg.contaminated_by,
        "prompt_tokens": dlg.prompt_tokens, "completion_tokens": dlg.completion_tokens,
        "truecased_turns": dlg.truecased, "dialogue_sha": hashlib.sha256(blob).hexdigest(),
    }


def run(recipe: Recipe, store: RunStore) -> StageReport:
    """Generate the dSFT dialogues; resumable, every prompt ends in the output, failures or dropped."""
    return asyncio.run(_run(recipe, store))


async def _run(recipe: Recipe, store: RunStore) -> StageReport:
    cfg = recipe.generate
    extra: dict[str, Any] = {"seconds": {}}
    decon = load_decontaminator(recipe.decontamination)
    with PromptList() as prompts, contextlib.ExitStack() as stack:  # prompts: kept and grown, in input order
        # each dialogue is shingled as it is written, while the teacher answers others
        dedup = stack.enter_context(DialogueDedup(prompts, cfg.filters.near_dup_threshold)) if cfg.filters.dedup \
            else None
        async with teacher_session(recipe, store, STAGE) as session:
            t0 = time.perf_counter()
            seen = IdSet()  # every input prompt's id: what a grown prompt repeats is not a new item
            inputs = ledger_seed_drops(store, iter_prompts(recipe.prompts, recipe.task), cfg, decon, seen, prompts)
            extra["seconds"]["select_prompts"] = round(time.perf_counter() - t0, 3)
            t0 = time.perf_counter()
            grown = await grow_prompts(store, session.for_role("instruction_writer"), prompts, cfg, decon, extra)
            extra["seconds"]["expansion"] = round(time.perf_counter() - t0, 3)
            prompts.extend(grown)
            seen.update(s.prompt_id for s in grown)
            skip = store.shard_writer(STAGE).done_set() | store.ledger(STAGE, "dropped").ids()
            todo = sum(s.prompt_id not in skip for s in prompts)
            t0 = time.perf_counter()
            stop = await simulate_all(recipe, store, session, (s for s in prompts if s.prompt_id not in skip),
                                      todo, decon, dedup)
            extra["seconds"]["dialogues"] = round(time.perf_counter() - t0, 3)
        extra["concurrency"] = session.concurrency_settled()
        if not stop and dedup is not None:  # only over the finished set: the decision must not depend on timing
            remove_duplicate_dialogues(store, STAGE, prompts, cfg.filters.near_dup_threshold, dedup)
    counts = {"input": inputs + len(grown), "unique": len(seen)}
    return _finish(recipe, store, counts, session.usage(), extra, stop)


def ledger_seed_drops(store: RunStore, seeds: Iterable[SeedPrompt], cfg: GenerateConfig, decon: Decontaminator,
                      seen: IdSet, kept: PromptList) -> int:
    """Stream the seeds: those that pass go to `kept`, the others to the dropped ledger (once, with what
    matched), both a chunk at a time; returns how many seeds were read."""
    ledger = store.ledger(STAGE, "dropped")
    already = ledger.ids()
    keep: list[SeedPrompt] = []
    drops: list[tuple[str, str, int, dict | None]] = []
    read = 0

    def counted() -> Iterator[SeedPrompt]:
        nonlocal read
        for seed in seeds:
            read += 1
            yield seed

    for seed, drop in select_prompts(counted(), cfg, decon, seen):
        if drop is None:
            keep.append(seed)
        elif seed.prompt_id not in already:
            drops.append((seed.prompt_id, drop[0], 1, drop[1]))
        if len(keep) + len(drops) >= CHUNK:
            kept.extend(keep)
            ledger.record_many(drops)
            keep, drops = [], []
    kept.extend(keep)
    ledger.record_many(drops)
    return read


async def grow_prompts(store: RunStore, writer: RoleClient, seeds: PromptList, cfg: GenerateConfig,
                       decon: Decontaminator, extra: dict[str, Any]) -> list[SeedPrompt]:
    """Self-instruct, then self-prompting from every prompt so far; writes instructions.jsonl (with lineage)
    and the contaminated proposals; returns the new prompts. Expansion compares every proposal with every
    prompt kept, so it holds them (the stream is for inputs of more prompts than expansion is meant for)."""
    grown: list[SeedPrompt] = []
    si, sp = cfg.self_instruct, cfg.self_prompting
    if not (si.enabled and si.target_count > len(seeds)) and not sp.enabled:
        return grown
    kept = list(seeds)
    filt = InstructionFilter(cfg.instruction_filter, [s.prompt for s in kept], decon)
    if si.enabled and si.target_count > len(kept):
        new, extra["self_instruct"] = await expand(writer, kept, si, filt, cfg.seed)
        grown += new
    if sp.enabled:
        new, extra["self_prompting"] = await self_prompt(writer, kept + grown, cfg, filt)
        grown += new
    rows = [{"prompt": s.prompt, "prompt_id": s.prompt_id, "source": s.source, "root_prompt_id": s.root,
             "parent_prompt_id": s.parent_prompt_id, "depth": s.depth} for s in grown]
    store.write_bytes(store.join(STAGE, "instructions.jsonl"), "".join(json.dumps(r) + "\n" for r in rows).encode())
    contaminated = [{"prompt": text, "reason": m.reason, **m.detail()} for text, m in filt.contaminated]
    store.write_bytes(store.join(STAGE, "instructions_contaminated.jsonl"),
                      "".join(json.dumps(r) + "\n" for r in contaminated).encode())
    extra["contaminated_instructions_by_file"] = dict(Counter(r["eval_file"] for r in contaminated))
    return grown


async def simulate_all(recipe: Recipe, store: RunStore, session: TeacherSession, todo: Iterable[SeedPrompt],
                       total: int, decon: Decontaminator, dedup: DialogueDedup | None = None) -> str:
    """Simulate the dialogues of `todo` (a stream of `total` prompts) and publish them shard by shard (and to
    `dedup`); returns why it stopped early, if it did."""
    cfg = recipe.generate
    filters = DialogueFilters(cfg.filters)
    user_system = render("generate_user_simulator.jinja", persona=None)
    bar = progress(STAGE, total, "dialogue")
    stream = ItemStream(store.ledger(STAGE), lambda s: s.prompt_id, dropped=store.ledger(STAGE, "dropped"),
                        progress=bar)
    assistant, user_simulator = session.for_role("assistant"), session.for_role("user_simulator")
    with store.shard_writer(STAGE, shard_size=cfg.shard_size, schema=DIALOGUES) as writer:
        # Twice the endpoints' concurrency in dialogues: a request slot freed by one is taken at once by a
        # dialogue already waiting on the client's semaphore.
        async for seed, dialogue in stream.results(
                todo, lambda s: simulate_dialogue(assistant, user_simulator, s, cfg, filters, user_system, decon),
                session.concurrency("assistant", "user_simulator", live_factor=2)):
            record = _record(seed, dialogue, assistant.cfg.model)
            writer.add(record, flush=False)
            if dedup is not None:
                dedup.add(record)
            if writer.full:  # publish the shard off the event loop: requests in flight keep going
                await asyncio.to_thread(writer.flush)
    bar.close()
    return stream.stopped


def _finish(recipe: Recipe, store: RunStore, counts: dict[str, int], cost: dict[str, float],
            extra: dict[str, Any], stop: str) -> StageReport:
    """Account for every prompt from what the store holds (`counts` brings the input's), write stats.json and
    the report; the shards and ledgers are read as streams."""
    out_ids = store.shard_writer(STAGE).done_set()
    out = len(out_ids)
    failed = tally(store.ledger(STAGE), _reason_kind, out_ids)
    dropped = tally(store.ledger(STAGE, "dropped"), _reason_kind)
    stop_reasons: Counter[str] = Counter()
    rounds: Counter[int] = Counter()
    tokens: Counter[str] = Counter()
    turns_by_file: Counter[str] = Counter()
    for r in store.read_records(STAGE, columns=["stop_reason", "rounds", "prompt_tokens", "completion_tokens",
                                                "truecased_turns", "contaminated_by"]):
        stop_reasons[r["stop_reason"]] += 1
        rounds[r["rounds"]] += 1
        tokens["prompt"] += r["prompt_tokens"]
        tokens["completion"] += r["completion_tokens"]
        tokens["truecased_turns"] += r["truecased_turns"]
        turns_by_file.update([r["contaminated_by"]] if r["contaminated_by"] else [])
    unique = counts["unique"]
    pending = unique - out - failed.items - dropped.items
    counts = {**counts, "output": out, "failed": failed.items, "dropped": dropped.items, "pending": pending}
    warnings = loud_drops(STAGE, dropped.by_reason + failed.by_reason, unique)
    store.write_json(store.join(STAGE, "stats.json"), {
        "counts": counts, "warnings": warnings,
        "dropped_by_reason": dict(dropped.by_reason), "failed_by_reason": dict(failed.by_reason),
        "decontamination": {"eval_files": recipe.decontamination.eval_files, "ngram": recipe.decontamination.ngram,
                            "prompts_by_file": dict(dropped.by_file), "user_turns_by_file": dict(turns_by_file),
                            "instructions_by_file": extra.pop("contaminated_instructions_by_file", {})},
        "dialogue_stop_reasons": dict(stop_reasons),
        "rounds_histogram": {str(k): v for k, v in sorted(rounds.items())},
        "tokens": dict(tokens), "teacher": cost, **extra,
    })
    status, message = conclude(
        STAGE, stop=stop, pending=pending, failed=failed.items, total=unique - dropped.items,
        max_failure_rate=recipe.generate.max_failure_rate, ledger=store.join(STAGE, "failures.jsonl"),
        saved=f"{out} dialogues",
        done=(f"{out} dialogues, {failed.items} failed, {dropped.items} dropped; "
              f"{int(cost['prompt_tokens'] + cost['completion_tokens'])} teacher tokens paid, "
              f"{int(cost['cached'])} cached responses reused, ${cost['usd']:.4f}" + _shortfall(extra)
              + concurrency_note(extra.get("concurrency", {}))))
    message = "\n".join([message, *warnings])
    log.info("generate: %s", message)
    return StageReport(STAGE, status, counts, cost, {"data": store.join(STAGE)}, message)


def _shortfall(extra: dict[str, Any]) -> str:
    """Where an expansion stopped short of its target, and why (also in stats.json)."""
    return "".join(f"; {name.replace('_', '-')} reached {s['total']} of {s['target']} prompts ({s['stop_reason']})"
                   for name in ("self_instruct", "self_prompting")
                   if (s := extra.get(name)) and not s.get("reached", True))


def _reason_kind(reason: str) -> str:
    return CONTAMINATED if reason.startswith(CONTAMINATED) else reason.split(":", 1)[0].split(" (", 1)[0][:60]
