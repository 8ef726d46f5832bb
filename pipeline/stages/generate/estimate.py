"""What the generate stage will ask before it runs: self-instruct requests, then per seed prompt its drawn
number of rounds of assistant and user-simulator turns, each turn seeing the dialogue so far."""

from __future__ import annotations

import math
import random
import statistics

from pipeline.core.recipe import Recipe
from pipeline.core.sources import iter_prompts
from pipeline.core.templates import render
from pipeline.stages.generate.stage import dialogue_rounds, select_prompts
from pipeline.teacher.demand import Planner, RolePlan


def demand(recipe: Recipe, plan: Planner) -> None:
    cfg = recipe.generate
    seeds = list(iter_prompts(recipe.prompts, recipe.task))
    kept = select_prompts(seeds, cfg, {})
    assistant, user = plan.role("assistant"), plan.role("user_simulator")
    lengths = [assistant.tokens(s.prompt) for s in kept] or [0.0]
    si = cfg.self_instruct
    if si.enabled and si.target_count > len(seeds):
        new = si.target_count - len(seeds)
        self_instruct(plan, [s.prompt for s in seeds], new)
        mean_rounds = (cfg.min_rounds + cfg.max_rounds) / 2
        dialogue(assistant, user, plan, statistics.mean(lengths), mean_rounds, count=new)
    for seed, tokens in zip(kept, lengths, strict=False):
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


def self_instruct(plan: Planner, seeds: list[str], new: int) -> None:
    """Requests of `tasks_per_request` proposals each until `new` are kept (at the assumed keep rate)."""
    si = plan.recipe.generate.self_instruct
    writer = plan.role("instruction_writer")
    examples = random.Random(0).sample(seeds, min(len(seeds), si.examples_per_request))
    text = render("generate_self_instruct.jinja", examples=examples, count=si.tasks_per_request)
    per_request = si.tasks_per_request * plan.recipe.estimate.self_instruct_keep_rate
    out = min(si.tasks_per_request * (plan.reply.instruction + 2), 64 * si.tasks_per_request)
    writer.add_messages([{"role": "user", "content": text}], out, math.ceil(new / per_request))
