"""What the feedback stage will ask of the rater before it runs: per prompt and source one rating request per
aspect over all its answers (some asked again), and a rewrite per correction item."""

from __future__ import annotations

import statistics

from pipeline.core.recipe import PoolModel, Recipe, role_endpoint
from pipeline.core.sources import unique_prompts
from pipeline.core.templates import render
from pipeline.stages.feedback.rate import ASPECT_TITLES, ON_POLICY, STUDENTS, TYPE_HINTS
from pipeline.stages.feedback.ratings import SCALES
from pipeline.teacher.demand import Planner, RolePlan


def demand(recipe: Recipe, plan: Planner) -> None:
    cfg = recipe.feedback
    rater = plan.role("rater")
    aspects = [*cfg.aspects, *(["overall"] if cfg.overall_critique else [])]
    pool_answer = statistics.mean([_answer(plan, m) for m in recipe.sample.pool] or [plan.reply.answer])
    students = [m for m in recipe.sample.pool if m.model in STUDENTS]
    draft = _answer(plan, cfg.on_policy_sampler if ON_POLICY in cfg.sources else (students or [None])[0])
    correction = render("feedback_correction.jinja", question="", draft="", reminder="")
    for prompt in unique_prompts(recipe.sample.prompts or recipe.prompts, recipe.task):
        tokens = rater.tokens(prompt.prompt)
        if "pool" in cfg.sources and recipe.sample.k >= 2:
            rate(rater, plan, aspects, tokens, [pool_answer] * recipe.sample.k)
        if ON_POLICY in cfg.sources:
            rate(rater, plan, aspects, tokens, [_answer(plan, cfg.on_policy_sampler)] * cfg.on_policy_k)
        if "correction" in cfg.sources and (ON_POLICY in cfg.sources or students):
            rewrite = min(plan.reply.assistant, cfg.max_tokens_per_answer)
            rater.add(rater.tokens(correction) + tokens + draft + rater.overhead(1), rewrite)
            changed = 1 - recipe.estimate.correction_unchanged_rate  # an unchanged draft is not rated
            rate(rater, plan, aspects, tokens, [draft, rewrite], changed)


def rate(rater: RolePlan, plan: Planner, aspects: list[str], prompt_tokens: float, answers: list[float],
         share: float = 1.0) -> None:
    """One request per aspect showing every answer (for `share` of such items); some replies are asked again."""
    cfg = plan.recipe.feedback
    n = len(answers)
    out = min(plan.reply.rating * n, cfg.max_tokens_per_answer * n + 64)
    for aspect in aspects:
        text = render("feedback_rating.jinja", aspect_title=ASPECT_TITLES[aspect],
                      rubric=render(f"feedback_{aspect}.jinja"), instruction="", texts=[""] * n,
                      type_hint=TYPE_HINTS.get(aspect, ""), scale_max=SCALES[aspect][1], allow_na=aspect == "honesty",
                      reminder="", structured=role_endpoint(plan.recipe, "rater")[1].structured != "off")
        rater.add(rater.tokens(text) + prompt_tokens + sum(answers) + rater.overhead(1), out,
                  share * (1 + plan.reask_rate) * cfg.orders)  # one request per order shown


def _answer(plan: Planner, member: PoolModel | None) -> float:
    """The length assumed for an answer of a pool member (capped by its max_tokens)."""
    return plan.reply.answer if member is None else min(plan.reply.answer, member.max_tokens)
