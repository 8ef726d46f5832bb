"""Iterative self-prompting (Zephyr's dSFT recipe): the instruction writer answers an instruction, then writes a
follow-on instruction from the instruction and its answer; each new instruction grows the tree in turn.

Every proposal passes the instruction filter (length, unsuitable, contamination, ROUGE-L to everything kept).
Requests are seeded and made in a fixed order, so a resumed run replays them from the response cache.
"""

from __future__ import annotations

import logging
import re
from collections import Counter
from dataclasses import dataclass
from typing import Any

from pipeline.core.recipe import GenerateConfig
from pipeline.core.sources import SeedPrompt, prompt_id
from pipeline.core.templates import render
from pipeline.stages.generate.dialogue import assistant_request, casing
from pipeline.stages.generate.expansion import Exhaustion, ask_in_order, offer_all, request_seed
from pipeline.stages.generate.instruction_filter import Candidate, InstructionFilter
from pipeline.teacher.messages import ChatRequest, ChatResult
from pipeline.teacher.session import RoleClient

log = logging.getLogger(__name__)
SOURCE = "self_prompting"
BATCH = 256  # proposals asked together; fixed (not the teacher's concurrency) so the data never depends on it
_LINE = re.compile(r"^\s*\**\s*(?:new |follow-on )?instruction\s*\**\s*:\s*\**\s*(.+?)\s*$", re.IGNORECASE | re.MULTILINE)


@dataclass
class Node:
    """An instruction in a self-prompting tree, with how many follow-ons it has and how often it was asked."""

    prompt: SeedPrompt
    children: int = 0
    tries: int = 0


def parse_instruction(text: str, finish_reason: str) -> Candidate | None:
    """The line after `Instruction:` (else the first non-empty line); cut off when the reply hit max_tokens."""
    m = _LINE.search(text)
    line = m.group(1) if m else next((ln.strip() for ln in text.splitlines() if ln.strip()), "")
    line = line.strip().strip('"').strip()
    return Candidate(line, cut_off=finish_reason == "length") if line else None


async def self_prompt(writer: RoleClient, roots: list[SeedPrompt], cfg: GenerateConfig,
                      filt: InstructionFilter) -> tuple[list[SeedPrompt], dict[str, Any]]:
    """Grow a tree below every root: `branching` follow-ons per instruction, `depth` generations, each branch
    asked up to `attempts_per_branch` times; stops at `target_count` prompts (roots included), when the tree is
    complete, or on the exhaustion rule. `writer` is the instruction writer's client."""
    sp = cfg.self_prompting
    nodes = [Node(r) for r in {r.prompt_id: r for r in roots}.values()]
    new: list[SeedPrompt] = []
    stats: Counter[str] = Counter()
    rejected_before = Counter(filt.rejected)
    exhaustion = Exhaustion(sp.exhaustion, sp.target_count)
    while True:
        frontier = [(n, n.tries + k) for n in nodes if n.prompt.depth < sp.depth
                    for k in range(min(sp.branching - n.children, sp.branching * sp.attempts_per_branch - n.tries))]
        if not frontier:
            exhaustion.reason = exhaustion.reason or (
                f"tree_complete: every instruction above depth {sp.depth} has {sp.branching} follow-ons or used "
                f"its {sp.attempts_per_branch} attempts per branch")
            break
        proposed = accepted = 0
        for start in range(0, len(frontier), BATCH):
            room = None if sp.target_count is None else sp.target_count - len(roots) - len(new)
            grown = await _grow(writer, frontier[start:start + BATCH], cfg, filt, stats, room)
            proposed += len(frontier[start:start + BATCH])
            accepted += len(grown)
            new += [g.prompt for g in grown]
            nodes += grown
            if room is not None and len(grown) >= room:
                break
        if exhaustion.after_round(proposed, accepted, len(roots) + len(new)):
            break
    total = len(roots) + len(new)
    if sp.target_count is not None and total < sp.target_count:
        log.warning("self-prompting stopped at %d of %d prompts: %s", total, sp.target_count, exhaustion.reason)
    rejected = {f"rejected_{k}": v for k, v in (filt.rejected - rejected_before).items()}
    by_depth = Counter(p.depth for p in new)
    summary = {**dict(stats), **rejected, "kept": len(new), "kept_by_depth": dict(sorted(by_depth.items())),
               **exhaustion.summary(total)}
    return new, summary


async def _grow(writer: RoleClient, batch: list[tuple[Node, int]], cfg: GenerateConfig, filt: InstructionFilter,
                stats: Counter[str], room: int | None) -> list[Node]:
    """One batch of proposals: answer each instruction, ask for a follow-on, filter in order; the new nodes."""
    fix = casing(cfg)
    answers = await ask_in_order(writer, [assistant_request([{"role": "user", "content": fix(n.prompt.prompt, [])}],
                                                            cfg) for n, _ in batch], stats)
    requests = [_refine_request(n, attempt, answer, cfg) for (n, attempt), answer in zip(batch, answers, strict=True)]
    replies = await ask_in_order(writer, [r for r in requests if r is not None], stats)
    it = iter(replies)
    cands = [None if req is None else _candidate(next(it)) for req in requests]
    stats["proposed"] += sum(c is not None for c in cands)
    flags = await offer_all(filt, cands, room)
    grown = []
    for (node, _), cand, ok in zip(batch, cands, flags, strict=True):
        node.tries += 1
        if ok and cand is not None:
            node.children += 1
            parent = node.prompt
            grown.append(Node(SeedPrompt(cand.text, prompt_id(cand.text), SOURCE, parent.root, parent.prompt_id,
                                         parent.depth + 1)))
    return grown


def _refine_request(node: Node, attempt: int, answer: ChatResult | None, cfg: GenerateConfig) -> ChatRequest | None:
    if answer is None:
        return None
    sp = cfg.self_prompting
    text = render("generate_self_prompting.jinja", instruction=node.prompt.prompt, answer=answer.text.strip())
    return ChatRequest([{"role": "user", "content": text}], temperature=sp.temperature, max_tokens=sp.max_tokens,
                       seed=request_seed(cfg.seed, "self_prompting", node.prompt.prompt_id, attempt))


def _candidate(reply: ChatResult | None) -> Candidate | None:
    return None if reply is None else parse_instruction(reply.text, reply.finish_reason)
