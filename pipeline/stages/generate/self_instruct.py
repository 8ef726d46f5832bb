"""Self-instruct expansion of seed prompts: the teacher proposes new tasks from sampled examples."""

from __future__ import annotations

import logging
import random
import re
from collections import Counter
from typing import Any

from pipeline.core.recipe import SelfInstructConfig
from pipeline.core.sources import SeedPrompt, prompt_id
from pipeline.core.templates import render
from pipeline.stages.generate.expansion import Exhaustion, ask_in_order, offer_all, request_seed
from pipeline.stages.generate.instruction_filter import Candidate, InstructionFilter
from pipeline.teacher.messages import ChatRequest
from pipeline.teacher.session import RoleClient

log = logging.getLogger(__name__)
SOURCE = "self_instruct"
_TASK_LINE = re.compile(r"^\s*(?:\d+[.)]\s*)?\**task\**\s*\d*\s*[:.]\s*(.+?)\s*$", re.IGNORECASE)


def parse_tasks(text: str, finish_reason: str) -> list[Candidate]:
    """Lines that start with `Task:`; with finish_reason 'length' the last one may be cut off."""
    found = [Candidate(m.group(1)) for line in text.splitlines() if (m := _TASK_LINE.match(line))]
    if found and finish_reason == "length":
        found[-1].cut_off = True
    return found


async def expand(writer: RoleClient, seeds: list[SeedPrompt], cfg: SelfInstructConfig, filt: InstructionFilter,
                 seed: int = 0) -> tuple[list[SeedPrompt], dict[str, Any]]:
    """Grow the seed set to `target_count` prompts, or until proposing is exhausted; returns the new prompts
    and stats (proposed, kept, rejected by reason, the stop reason).

    Requests are a deterministic function of the seeds and what was kept so far, so a resumed run
    replays them from the response cache. `writer` is the instruction writer's client.
    """
    human = [s.prompt for s in seeds]
    generated: list[str] = []
    stats: Counter[str] = Counter()
    rejected_before = Counter(filt.rejected)  # the filter is shared with self-prompting
    exhaustion = Exhaustion(cfg.exhaustion, cfg.target_count)
    while len(human) + len(generated) < cfg.target_count:
        need = cfg.target_count - len(human) - len(generated)
        # a round is `requests_per_round` live, or as many as fit in one batch file when the writer batches
        per_round = writer.cfg.batch_max_requests if writer.cfg.batch else cfg.requests_per_round
        n_requests = max(1, min(per_round, -(-need // cfg.tasks_per_request)))
        rnd = exhaustion.rounds
        requests = [_request(human, generated, cfg, random.Random(f"{seed}:{rnd}:{i}"), request_seed(seed, rnd, i))
                    for i in range(n_requests)]
        cands = [c for res in await ask_in_order(writer, requests, stats) if res is not None
                 for c in parse_tasks(res.text, res.finish_reason)]
        flags = await offer_all(filt, cands, need)
        generated += [c.text for c, ok in zip(cands, flags, strict=True) if ok]
        stats["proposed"] += len(cands)
        if exhaustion.after_round(len(cands), sum(flags), len(human) + len(generated)):
            break
    total = len(human) + len(generated)
    if total < cfg.target_count:
        log.warning("self-instruct stopped at %d of %d prompts: %s", total, cfg.target_count, exhaustion.reason)
    rejected = {f"rejected_{k}": v for k, v in (filt.rejected - rejected_before).items()}
    summary = {**dict(stats), **rejected, "kept": len(generated), **exhaustion.summary(total)}
    return [SeedPrompt(t, prompt_id(t), SOURCE) for t in generated], summary


def _request(human: list[str], generated: list[str], cfg: SelfInstructConfig, rng: random.Random,
             sampling_seed: int) -> ChatRequest:
    n_seed = min(len(human), cfg.seed_examples_per_request)
    n_gen = min(len(generated), cfg.examples_per_request - n_seed)
    examples = rng.sample(human, n_seed) + rng.sample(generated, n_gen)
    rng.shuffle(examples)
    text = render("generate_self_instruct.jinja", examples=examples, count=cfg.tasks_per_request)
    return ChatRequest(messages=[{"role": "user", "content": text}], temperature=cfg.temperature,
                       max_tokens=64 * cfg.tasks_per_request, seed=sampling_seed)
