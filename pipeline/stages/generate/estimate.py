"""What the generate stage will ask before it runs: self-instruct and self-prompting requests, then per prompt its
drawn number of rounds of assistant and user-simulator turns, each turn seeing the dialogue so far."""

from __future__ import annotations

import math
import random
import statistics

from pipeline.core.decontam import load_decontaminator
from pipeline.core.idset import IdSet
from pipeline.core.recipe import Recipe
from pipeline.core.sources import iter_prompts
from pipeline.core.templates import render
from pipeline.stages.generate.dialogue import dialogue_rounds
from pipeline.stages.generate.stage import select_prompts
from pipeline.teacher.demand import Planner, RolePlan


def demand(recipe: Recipe, plan: Planner) -> None:
    cfg = recipe.generate
    seeds = list(iter_prompts(recipe.prompts, recipe.task))
    decon = load_decontaminator(recipe.decontamination)
    kept = [s for s, drop in select_prompts(seeds, cfg, decon, IdSet()) if drop is None]
    assistant, user = plan.role("assistant"), plan.role("user_simulator")
    lengths = [assistant.tokens(s.prompt) for s in kept] or [0.0]
    grown = self_instruct(plan, [s.prompt for s in kept]) + self_prompting(plan, len(kept), statistics.mean(lengths))
    if grown:
        mean_rounds = (cfg.min_rounds + cfg.max_rounds) / 2
        dialogue(assistant, user, plan, statistics.mean(lengths), mean_rounds, count=grown)
    for seed, tokens in zip(kept, lengths, strict=True):
        dialogue(assistant, user, plan, tokens, dialogue_rounds(cfg, seed.prompt_id))


def dialogue(assistant: RolePlan, user: RolePlan, plan: Planner, prompt_tokens: float, rounds: float,
             count: float = 1.0) -> None:
    """Round i: the assistant sees the prompt and i earlier exchanges; the user simulator (system prompt, the
    dialogue flipped) sees one assistant turn more. Dialogues that filters end early cost less."""
    cfg = plan.recipe.generate
    a_out, u_out = min(plan.reply.assistant, cfg.max_tokens), min(plan.reply.user_simulator, cfg.max_tokens)
    system = user.tokens(render("generate_user_simulator.jinja", persona=None))
    whole, part = int(rounds), rounds - int(rounds)
    for i in range(math.ceil(rounds)):
        share = count * (part if i == whole else 1.0)
        assistant.add(prompt_tokens + i * (a_out + u_out) + assistant.overhead(2 * i + 1), a_out, share)
        if i < rounds - 1:
            user.add(system + prompt_tokens + (i + 1) * a_out + i * u_out + user.overhead(2 * i + 3), u_out, share)


def self_instruct(plan: Planner, seeds: list[str]) -> float:
    """Requests of `tasks_per_request` proposals each until the target is kept (at the assumed keep rate);
    returns the prompts it adds."""
    si = plan.recipe.generate.self_instruct
    if not si.enabled or si.target_count <= len(seeds):
        return 0.0
    new = si.target_count - len(seeds)
    writer = plan.role("instruction_writer")
    examples = random.Random(0).sample(seeds, min(len(seeds), si.examples_per_request))
    text = render("generate_self_instruct.jinja", examples=examples, count=si.tasks_per_request)
    per_request = si.tasks_per_request * plan.recipe.estimate.self_instruct_keep_rate
    out = min(si.tasks_per_request * (plan.reply.instruction + 2), 64 * si.tasks_per_request)
    writer.add_messages([{"role": "user", "content": text}], out, math.ceil(new / per_request))
    return float(new)


def self_prompting(plan: Planner, roots: float, prompt_tokens: float) -> float:
    """Each instruction above `depth` is answered once (the same request as its dialogue's first turn) and asked
    for `branching` follow-ons, each branch up to `attempts_per_branch` times; a proposal is kept at the
    assumed keep rate. Returns the prompts it adds (capped by `target_count`)."""
    cfg = plan.recipe.generate
    sp = cfg.self_prompting
    if not sp.enabled:
        return 0.0
    keep = plan.recipe.estimate.self_instruct_keep_rate
    succeed = 1 - (1 - keep) ** sp.attempts_per_branch  # a branch grows a child
    tries = sum((1 - keep) ** k for k in range(sp.attempts_per_branch))  # proposals a branch makes
    room = math.inf if sp.target_count is None else max(0.0, sp.target_count - roots)
    writer = plan.role("instruction_writer")
    answer = min(plan.reply.assistant, cfg.max_tokens)
    refine = writer.tokens(render("generate_self_prompting.jinja", instruction="", answer=""))
    level, added = roots, 0.0
    for _ in range(sp.depth):
        if added >= room:
            break
        share = min(1.0, (room - added) / (level * sp.branching * succeed)) if level else 0.0
        writer.add(prompt_tokens + writer.overhead(1), answer, level * share)
        writer.add(refine + prompt_tokens + answer + writer.overhead(1), min(plan.reply.instruction, sp.max_tokens),
                   level * share * sp.branching * tries)
        level = level * share * sp.branching * succeed
        added += level
    return added
