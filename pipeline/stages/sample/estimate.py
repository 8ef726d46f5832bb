"""What the sample stage will ask of endpoints before it runs: one request per answer of each `openai` pool
member (the assignment of members to prompts is drawn exactly as the stage draws it)."""

from __future__ import annotations

from pipeline.backends.answers import answer_messages
from pipeline.core.recipe import Recipe
from pipeline.core.sources import unique_prompts
from pipeline.stages.sample.stage import assign_models
from pipeline.teacher.demand import Planner


def demand(recipe: Recipe, plan: Planner) -> None:
    members = {m.name: m for m in recipe.sample.pool if m.backend == "openai"}
    if not members:
        return
    for a in assign_models(unique_prompts(recipe.sample.prompts or recipe.prompts, recipe.task), recipe.sample):
        if a.model in members:
            member = members[a.model]
            plan.pool_member(member).add_messages(answer_messages(a.prompt.prompt, a.principle, member),
                                                  min(plan.reply.answer, member.max_tokens))
