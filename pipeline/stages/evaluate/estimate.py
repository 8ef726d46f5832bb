"""What the evaluate stage will ask of the judge before it runs: a grade per turn of every model's answer and,
for each model but the baseline, a comparison with the baseline in both orders (some asked again)."""

from __future__ import annotations

from pipeline.core.recipe import Recipe, role_endpoint
from pipeline.core.templates import render
from pipeline.stages.evaluate.judging import conversation_text, judged_question, references_text
from pipeline.stages.evaluate.records import eval_models, load_eval_set, shows_reference
from pipeline.teacher.demand import Planner


def demand(recipe: Recipe, plan: Planner) -> None:
    cfg = recipe.evaluate
    judge = plan.role("judge")
    structured = role_endpoint(recipe, "judge")[1].structured != "off"
    models = eval_models(cfg)
    answer = min(plan.reply.answer, cfg.max_tokens)
    out = min(plan.reply.judge, cfg.judge_max_tokens)
    again = 1 + plan.reask_rate
    # an answer identical to the baseline's is graded once (the same request) and not compared
    distinct = 1 - recipe.estimate.identical_answer_rate
    graded = 1 + (len(models) - 1) * distinct
    for item in load_eval_set(recipe).items:
        blanks = [""] * len(item.turns)
        shown = shows_reference(cfg, item)
        for turn in range(len(item.turns)):
            context, question = judged_question(item, blanks, turn, shown)
            text = render("judge_single.jinja", context=context, question=question, answer="",
                          structured=structured, reminder="")
            judge.add(judge.tokens(text) + (turn + 1) * answer + judge.overhead(1), out, again * graded)
        question = conversation_text(list(item.turns), answers=False) + (references_text(item) if shown else "")
        text = render("judge_pairwise.jinja", question=question, answer_a="", answer_b="", structured=structured,
                      reminder="")
        pairs = 2 * (len(models) - 1) * distinct  # every model but the baseline, in both orders
        judge.add(judge.tokens(text) + 2 * len(item.turns) * answer + judge.overhead(1), out, again * pairs)
