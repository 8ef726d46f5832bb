"""Self-instruct expansion of seed prompts: the teacher proposes new tasks from sampled examples."""

from __future__ import annotations

import asyncio
import logging
import random
import re
from collections import Counter
from dataclasses import dataclass

from pipeline.core.recipe import SelfInstructConfig
from pipeline.core.sources import SeedPrompt, prompt_id
from pipeline.core.templates import render
from pipeline.stages.generate.textsim import rouge_l, words
from pipeline.teacher.client import BudgetExceeded, TeacherError, TeacherFatal
from pipeline.teacher.messages import ChatRequest
from pipeline.teacher.session import RoleClient

log = logging.getLogger(__name__)
_TASK_LINE = re.compile(r"^\s*(?:\d+[.)]\s*)?\**task\**\s*\d*\s*[:.]\s*(.+?)\s*$", re.IGNORECASE)


@dataclass
class Candidate:
    text: str
    cut_off: bool = False


def parse_tasks(text: str, finish_reason: str) -> list[Candidate]:
    """Lines that start with `Task:`; with finish_reason 'length' the last one may be cut off."""
    found = [Candidate(m.group(1)) for line in text.splitlines() if (m := _TASK_LINE.match(line))]
    if found and finish_reason == "length":
        found[-1].cut_off = True
    return found


class InstructionFilter:
    """Keeps an instruction only if it is well-formed and not too close (ROUGE-L) to any kept one."""

    def __init__(self, cfg: SelfInstructConfig, kept: list[str]):
        self.cfg = cfg
        self.kept_tokens = [words(t) for t in kept]
        self.unsuitable = [re.compile(p, re.IGNORECASE) for p in cfg.unsuitable_patterns]
        self.rejected: Counter[str] = Counter()

    def reason_to_drop(self, cand: Candidate) -> str | None:
        n = len(cand.text.split())
        if cand.cut_off:
            return "cut_off"
        if n <= self.cfg.min_words or n > self.cfg.max_words:
            return "length"
        if any(p.search(cand.text) for p in self.unsuitable):
            return "unsuitable"
        if not cand.text[0].isalnum():
            return "malformed"
        toks = words(cand.text)
        if any(rouge_l(toks, other) > self.cfg.rouge_threshold for other in self.kept_tokens):
            return "too_similar"
        return None

    def offer(self, cand: Candidate) -> bool:
        reason = self.reason_to_drop(cand)
        if reason:
            self.rejected[reason] += 1
            return False
        self.kept_tokens.append(words(cand.text))
        return True


async def expand(client: RoleClient, seeds: list[SeedPrompt], cfg: SelfInstructConfig,
                 seed: int = 0) -> tuple[list[SeedPrompt], dict[str, int]]:
    """Grow the seed set to `target_count` prompts; returns the new prompts and filter counts.

    Requests are a deterministic function of the seeds and what was kept so far, so a resumed run
    replays them from the response cache.
    """
    human = [s.prompt for s in seeds]
    generated: list[str] = []
    filt = InstructionFilter(cfg, human)
    stats: Counter[str] = Counter()
    rounds = 0
    while len(human) + len(generated) < cfg.target_count and rounds < cfg.max_rounds:
        need = cfg.target_count - len(human) - len(generated)
        # a round is as many requests as run at once (live) or fit in one batch file (Batch API)
        per_round = client.cfg.batch_max_requests if client.cfg.batch else client.cfg.max_concurrency
        n_requests = max(1, min(per_round, -(-need // cfg.tasks_per_request)))
        requests = [_request(human, generated, cfg, random.Random(f"{seed}:{rounds}:{i}"))
                    for i in range(n_requests)]
        results = await asyncio.gather(*(client.chat(r) for r in requests), return_exceptions=True)
        for res in results:
            if isinstance(res, (BudgetExceeded, TeacherFatal)):
                raise res
            if isinstance(res, TeacherError):
                stats["request_failed"] += 1
                continue
            if isinstance(res, BaseException):
                raise res
            for cand in parse_tasks(res.text, res.finish_reason):
                stats["proposed"] += 1
                if len(human) + len(generated) < cfg.target_count and filt.offer(cand):
                    generated.append(cand.text)
        rounds += 1
    stats.update({f"rejected_{k}": v for k, v in filt.rejected.items()})
    stats["kept"] = len(generated)
    stats["rounds"] = rounds
    if len(human) + len(generated) < cfg.target_count:
        log.warning("self-instruct stopped at %d of %d prompts after %d rounds (generate.self_instruct.max_rounds)",
                    len(human) + len(generated), cfg.target_count, rounds)
    return [SeedPrompt(t, prompt_id(t), "self_instruct") for t in generated], dict(stats)


def _request(human: list[str], generated: list[str], cfg: SelfInstructConfig, rng: random.Random) -> ChatRequest:
    n_seed = min(len(human), cfg.seed_examples_per_request)
    n_gen = min(len(generated), cfg.examples_per_request - n_seed)
    examples = rng.sample(human, n_seed) + rng.sample(generated, n_gen)
    rng.shuffle(examples)
    text = render("generate_self_instruct.jinja", examples=examples, count=cfg.tasks_per_request)
    return ChatRequest(messages=[{"role": "user", "content": text}], temperature=cfg.temperature,
                       max_tokens=64 * cfg.tasks_per_request)
