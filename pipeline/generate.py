"""dSFT data (UltraChat style): the teacher plays both the user and the assistant in multi-turn dialogues."""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import random
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field

from pipeline.data import SeedPrompt, iter_prompts, read_texts
from pipeline.filters import DialogueFilters, truecase
from pipeline.progress import progress
from pipeline.prompts import render
from pipeline.recipe import GenerateConfig, Recipe
from pipeline.self_instruct import expand
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
from pipeline.textsim import NearDuplicateIndex, NgramIndex
from pipeline.work import stream_map

log = logging.getLogger(__name__)
STAGE = "generate"


class Dropped(Exception):
    """A dialogue removed by a filter (not a failure): it goes to dropped.jsonl with the filter's name."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


@dataclass
class Dialogue:
    messages: list[dict[str, str]]
    target_rounds: int
    stop_reason: str = "rounds"
    prompt_tokens: int = 0
    completion_tokens: int = 0
    truecased: int = 0
    events: list[str] = field(default_factory=list)


def _flip(messages: list[dict[str, str]], system: str) -> list[dict[str, str]]:
    """The user simulator's view: its own (user) turns become 'assistant', the assistant's become 'user'."""
    swap = {"user": "assistant", "assistant": "user"}
    return [{"role": "system", "content": system}] + [{"role": swap[m["role"]], "content": m["content"]}
                                                      for m in messages]


async def simulate_dialogue(client: TeacherClient, seed: SeedPrompt, cfg: GenerateConfig,
                            filters: DialogueFilters, user_system: str) -> Dialogue:
    """Alternate the teacher as assistant and as a user simulator for a drawn number of rounds."""
    rounds = random.Random(f"{cfg.seed}:{seed.prompt_id}").randint(cfg.min_rounds, cfg.max_rounds)
    fix = truecase if cfg.filters.truecase else (lambda t: t)
    first = fix(seed.prompt)
    dlg = Dialogue([{"role": "user", "content": first}], rounds, truecased=int(first != seed.prompt))
    for r in range(rounds):
        reply = await client.chat(ChatRequest(dlg.messages, cfg.temperature, cfg.max_tokens))
        dlg.prompt_tokens += reply.prompt_tokens
        dlg.completion_tokens += reply.completion_tokens
        text = reply.text.strip()
        problem = ("truncated" if reply.finish_reason == "length" and cfg.filters.drop_truncated else
                   "empty" if cfg.filters.drop_empty and filters.degenerate(text) else None)
        if problem:
            if r == 0:
                raise Dropped(f"{problem}_assistant_turn")
            dlg.messages.pop()  # the unanswered user turn goes too: every dialogue ends on the assistant
            dlg.stop_reason = problem
            break
        if pattern := filters.disclaimer(text):
            raise Dropped(f"disclaimer: {pattern}")
        fixed = fix(text)
        dlg.truecased += int(fixed != text)
        dlg.messages.append({"role": "assistant", "content": fixed})
        if r == rounds - 1:
            break
        user = await client.chat(ChatRequest(_flip(dlg.messages, user_system), cfg.user_temperature,
                                             cfg.max_tokens))
        dlg.prompt_tokens += user.prompt_tokens
        dlg.completion_tokens += user.completion_tokens
        turn = user.text.strip()
        if filters.degenerate(turn) or user.finish_reason == "length":
            dlg.stop_reason = "empty_user_turn" if filters.degenerate(turn) else "truncated_user_turn"
            break
        if cfg.filters.drop_role_drift and filters.role_drift(turn):
            dlg.stop_reason = "role_drift"
            break
        dlg.messages.append({"role": "user", "content": fix(turn)})
    return dlg


def select_prompts(seeds: list[SeedPrompt], cfg: GenerateConfig, dropped: dict[str, str]) -> list[SeedPrompt]:
    """Exact and near duplicates and contaminated prompts are dropped before the teacher is paid."""
    near = NearDuplicateIndex(cfg.filters.near_dup_threshold) if cfg.filters.dedup else None
    decon = (NgramIndex((t for f in cfg.decontamination.eval_files for t in read_texts(f)),
                        cfg.decontamination.ngram) if cfg.decontamination.eval_files else None)
    seen: set[str] = set()
    kept = []
    for s in seeds:
        if s.prompt_id in seen:
            continue  # the same prompt twice is one item
        seen.add(s.prompt_id)
        if not s.prompt:
            dropped[s.prompt_id] = "empty_prompt"
        elif decon is not None and decon.contaminated(s.prompt):
            dropped[s.prompt_id] = "contaminated"
        elif near is not None and near.seen(s.prompt):
            dropped[s.prompt_id] = "near_duplicate_prompt"
        else:
            kept.append(s)
    return kept


def _record(seed: SeedPrompt, dlg: Dialogue, model: str) -> dict:
    blob = json.dumps(dlg.messages, sort_keys=True).encode()
    return {
        "prompt": seed.prompt, "prompt_id": seed.prompt_id, "messages": dlg.messages,
        "source": seed.source, "teacher_model": model,
        "rounds": sum(m["role"] == "assistant" for m in dlg.messages), "target_rounds": dlg.target_rounds,
        "stop_reason": dlg.stop_reason, "prompt_tokens": dlg.prompt_tokens,
        "completion_tokens": dlg.completion_tokens, "truecased_turns": dlg.truecased,
        "dialogue_sha": hashlib.sha256(blob).hexdigest(),
    }


def run(recipe: Recipe, store: RunStore) -> StageReport:
    """Generate the dSFT dialogues; resumable, every prompt ends in the output, failures or dropped."""
    return asyncio.run(_run(recipe, store))


async def _run(recipe: Recipe, store: RunStore) -> StageReport:
    cfg = recipe.generate
    client = teacher_for_stage(recipe, store)
    failures, dropped_ledger = store.ledger(STAGE), store.ledger(STAGE, "dropped")
    extra: dict[str, object] = {}
    stop_message = ""
    try:
        seeds = list(iter_prompts(recipe.prompts))
        if cfg.self_instruct.enabled and cfg.self_instruct.target_count > len(seeds):
            new, extra["self_instruct"] = await expand(client, seeds, cfg.self_instruct, cfg.seed)
            store.write_bytes(store.join(STAGE, "instructions.jsonl"),
                              "".join(json.dumps({"prompt": s.prompt, "prompt_id": s.prompt_id}) + "\n"
                                      for s in new).encode())
            seeds += new
        dropped_now: dict[str, str] = {}
        t_select = time.perf_counter()
        todo_all = select_prompts(seeds, cfg, dropped_now)
        extra["seconds"] = {"select_prompts": round(time.perf_counter() - t_select, 3)}
        writer = store.shard_writer(STAGE, shard_size=cfg.shard_size)
        done = writer.done_ids()
        already_dropped = {f.item_id for f in dropped_ledger.entries()}
        dropped_ledger.record_many((pid, reason, 1) for pid, reason in dropped_now.items()
                                   if pid not in already_dropped)
        seen_dialogues = {r["dialogue_sha"] for r in _columns(store, ["dialogue_sha"])}
        todo = [s for s in todo_all if s.prompt_id not in done and s.prompt_id not in already_dropped]
        filters = DialogueFilters(cfg.filters)
        user_system = render("generate_user_simulator.jinja", persona=None)
        # Twice the teacher's concurrency in dialogues: a request slot freed by one is taken at once by a
        # dialogue already waiting on the client's semaphore (measured: 10% more requests/s than 1x).
        bar = progress(STAGE, len(todo), "dialogue")
        t_dialogues = time.perf_counter()
        with writer:
            stopped: list[str] = []  # set once: the budget or a fatal error; in-flight work drains, nothing new starts
            async for seed, result in stream_map(todo, lambda s: simulate_dialogue(client, s, cfg, filters, user_system),
                                                 2 * recipe.teacher.max_concurrency, stop=lambda: bool(stopped)):
                bar.update(1)
                if isinstance(result, (BudgetExceeded, TeacherFatal)):
                    stopped.append(str(result))
                    continue
                if isinstance(result, Dropped):
                    dropped_ledger.record(seed.prompt_id, result.reason)
                elif isinstance(result, TeacherError):
                    failures.record(seed.prompt_id, result.reason, result.attempts)
                elif isinstance(result, BaseException):
                    failures.record(seed.prompt_id, f"{type(result).__name__}: {result}")
                else:
                    record = _record(seed, result, recipe.teacher.model)
                    if cfg.filters.dedup and record["dialogue_sha"] in seen_dialogues:
                        dropped_ledger.record(seed.prompt_id, "duplicate_dialogue")
                        continue
                    seen_dialogues.add(record["dialogue_sha"])
                    writer.add(record, flush=False)
                    if writer.full:  # publish the shard off the event loop: requests in flight keep going
                        await asyncio.to_thread(writer.flush)
        bar.close()
        extra["seconds"]["dialogues"] = round(time.perf_counter() - t_dialogues, 3)
        stop_message = stopped[0] if stopped else ""
    finally:
        await client.aclose()
        if client.cache is not None:
            client.cache.close()
    return _finish(recipe, store, seeds, client, extra, stop_message)


def _finish(recipe: Recipe, store: RunStore, seeds: list[SeedPrompt], client: TeacherClient,
            extra: dict[str, object], stop_message: str) -> StageReport:
    """Account for every prompt from what the store holds, write stats.json and the report."""
    out_ids = {r["prompt_id"] for r in _columns(store, ["prompt_id"])}
    failed = store.ledger(STAGE).compact(out_ids)
    dropped = store.ledger(STAGE, "dropped").latest()
    stop_reasons: Counter[str] = Counter()
    rounds: Counter[int] = Counter()
    tokens = Counter()
    for r in _columns(store, ["stop_reason", "rounds", "prompt_tokens", "completion_tokens", "truecased_turns"]):
        stop_reasons[r["stop_reason"]] += 1
        rounds[r["rounds"]] += 1
        tokens["prompt"] += r["prompt_tokens"]
        tokens["completion"] += r["completion_tokens"]
        tokens["truecased_turns"] += r["truecased_turns"]
    unique = len({s.prompt_id for s in seeds})
    pending = unique - len(out_ids) - len(failed) - len(dropped)
    counts = {"input": len(seeds), "unique": unique, "output": len(out_ids), "failed": len(failed),
              "dropped": len(dropped), "pending": pending}
    stats = {
        "counts": counts,
        "dropped_by_reason": dict(Counter(_reason_kind(d.reason) for d in dropped.values())),
        "failed_by_reason": dict(Counter(_reason_kind(f.reason) for f in failed.values())),
        "dialogue_stop_reasons": dict(stop_reasons),
        "rounds_histogram": {str(k): v for k, v in sorted(rounds.items())},
        "tokens": dict(tokens),
        "teacher": client.usage.as_cost(),
        **extra,
    }
    store.write_json(store.join(STAGE, "stats.json"), stats)
    cost = client.usage.as_cost()
    failure_rate = len(failed) / max(1, unique - len(dropped))
    if stop_message:
        status, message = "failed", f"stopped early: {stop_message} ({len(out_ids)} dialogues saved)"
    elif pending:
        status, message = "failed", f"{pending} prompts neither generated nor recorded as failed; rerun to resume"
    elif failure_rate > recipe.generate.max_failure_rate:
        status, message = "failed", (f"{len(failed)} of {unique} prompts failed (> generate.max_failure_rate="
                                     f"{recipe.generate.max_failure_rate}); see {store.join(STAGE, 'failures.jsonl')}"
                                     "; rerun to retry them")
    else:
        status = "completed"
        message = (f"{len(out_ids)} dialogues, {len(failed)} failed, {len(dropped)} dropped; "
                   f"{int(cost['prompt_tokens'] + cost['completion_tokens'])} teacher tokens paid, "
                   f"{int(cost['cached'])} cached responses reused, ${cost['usd']:.4f}")
    log.info("generate: %s", message)
    return StageReport(STAGE, status, counts, cost, {"data": store.join(STAGE)}, message)


def _reason_kind(reason: str) -> str:
    return reason.split(":", 1)[0].split(" (", 1)[0][:60]


def _columns(store: RunStore, columns: list[str]) -> Iterator[dict]:
    import pyarrow.parquet as pq

    for path in store.shard_paths(STAGE):
        with store.fs.open(path, "rb") as fh:
            yield from pq.read_table(fh, columns=columns).to_pylist()
