"""`distill preview`: a few prompts through every stage, shown in the terminal (and as Prefect artifacts when
it runs as the `preview` flow), with the full run's estimate beside what the preview paid."""

from __future__ import annotations

import textwrap
from typing import Any

import click

from pipeline.cli.common import CliError, as_cli_error, set_option
from pipeline.cli.run import checked
from pipeline.core.recipe import Recipe
from pipeline.run.preview import DEFAULT_STEPS, PreviewPlan, PreviewStore, open_preview, run_preview
from pipeline.run.preview_items import PreviewItems, preview_items_and_spend

WIDTH = 100


@click.command()
@click.argument("recipe", type=click.Path(dir_okay=False))
@click.option("-n", "n", type=click.IntRange(min=1), default=5, show_default=True,
              help="Prompts (and evaluation items) to run through every stage.")
@click.option("--steps", type=click.IntRange(min=1), default=DEFAULT_STEPS, show_default=True,
              help="Training steps of sft and dpo (the preview's models are not the full run's).")
@click.option("--run-name", default=None, help="The run the preview is for (default: the recipe's `name`); "
              "`distill run` with the same name reuses the preview's cached requests.")
@click.option("--prefect/--no-prefect", default=None,
              help="Run as the Prefect `preview` flow, its items as artifacts too (default: only when a Prefect "
                   "API is set, PREFECT_API_URL).")
@set_option
def preview(recipe: str, n: int, steps: int, run_name: str | None, prefect: bool | None,
            overrides: tuple[str, ...]) -> None:
    """Run n prompts through every stage (sft and dpo train a few steps only) and show the dialogues, answers,
    ratings, pairs and verdicts, and what the preview paid beside the full run's estimate. Writes under
    <run>/preview/; the full run reuses its cached requests."""
    rec = checked(recipe, overrides)
    plan = PreviewPlan(n, steps)
    as_flow = _prefect_api_set() if prefect is None else prefect
    if as_flow:
        run_preview_flow(recipe, overrides, run_name, plan)
    else:
        try:
            run_preview(rec, plan, open_preview(rec, run_name))
        except KeyboardInterrupt:
            raise CliError("interrupted; run the same command again to go on where it stopped", 130) from None
    store = open_preview(rec, run_name)
    items, spend = preview_items_and_spend(store, rec, n)
    for line in preview_text(store, rec, plan, items, spend):
        click.echo(line)


def _prefect_api_set() -> bool:
    from prefect.settings import get_current_settings

    return bool(get_current_settings().api.url)


def run_preview_flow(recipe: str, overrides: tuple[str, ...], run_name: str | None, plan: PreviewPlan) -> None:
    """The preview as the Prefect `preview` flow (a temporary server when no API is set, as `distill run`)."""
    from pipeline.cli.server import prefect_api
    from pipeline.flows.preview import PreviewRequest
    from pipeline.flows.preview import preview as preview_flow

    request = PreviewRequest(recipe_path=recipe, run_name=run_name, n=plan.n, steps=plan.steps,
                             overrides=list(overrides))
    with prefect_api():
        state = preview_flow(request, return_state=True)
        try:
            state.result()
        except Exception as exc:  # noqa: BLE001 - whatever the flow raised (Prefect logged it) becomes a CLI error
            raise as_cli_error(exc) or CliError(f"{type(exc).__name__}: {exc}") from None
    if not state.is_completed():
        raise CliError(f"the preview flow ended {state.name}")


def preview_text(store: PreviewStore, recipe: Recipe, plan: PreviewPlan, items: PreviewItems,
                 spend: list[dict[str, Any]]) -> list[str]:
    """The terminal's preview: what was trimmed, then each kind of item, then the spend beside the estimate."""
    lines = [f"PREVIEW of recipe '{recipe.name}' (run {store.run_name}), not a run: {'; '.join(plan.changes(recipe))}.",
             "The student's answers and the judge's verdicts show what each stage does, not what the full run "
             "reaches.", f"Written to {store.join()} (the run's own stages are untouched; the response cache is "
             "shared, so `distill run` reuses these requests)."]
    lines += _section("dialogues", items, f"dialogues: {items.totals['dialogues']} made from the first "
                      f"{items.totals['prompts']} prompts")
    for i, d in enumerate(items.dialogues, 1):
        lines += [f"[{i}] {d.outcome}"] if d.turns else [_wrap(f"[{i}] {d.prompt}", 0, 1), f"    {d.outcome}"]
        lines += [_wrap(f"{role}: {_text(text)}", 4) for role, text in d.turns]
    lines += _section("answers", items, "pool answers with their ratings")
    for i, a in enumerate(items.answers, 1):
        ratings = ", ".join(f"{k} {_num(v)}" for k, v in a.ratings.items()) or "not rated"
        lines += [_wrap(f"[{i}] {a.prompt}", 0, 1), _wrap(f"{a.model}: {_text(a.text)}", 4),
                  f"    ratings: {ratings}; score {_num(a.score)}"]
    lines += _section("pairs", items, "preference pairs")
    for i, p in enumerate(items.pairs, 1):
        lines += [_wrap(f"[{i}] ({p.source}) {p.prompt}", 0, 1),
                  _wrap(f"chosen: {p.chosen_model}, score {_num(p.score_chosen)}: {_text(p.chosen)}", 4),
                  _wrap(f"rejected: {p.rejected_model}, score {_num(p.score_rejected)}: {_text(p.rejected)}", 4)]
    lines += _section("verdicts", items, f"judge verdicts on models trained {plan.steps} steps only")
    for i, v in enumerate(items.verdicts, 1):
        grades = ", ".join(f"{m} {_num(g)}/10" for m, g in v.grades.items())
        lines += [_wrap(f"[{i}] {v.question}", 0, 1), _wrap(f"{v.model}: {_text(v.model_answer)}", 4),
                  _wrap(f"{v.baseline}: {_text(v.baseline_answer)}", 4),
                  f"    verdict: {v.outcome} (shown first: {v.verdicts[0]}, shown second: {v.verdicts[1]}); "
                  f"grades: {grades}"]
    return lines + spend_text(spend)


def spend_text(spend: list[dict[str, Any]]) -> list[str]:
    """The full run's estimate beside what the preview paid, per stage."""
    lines = ["", "== spend: the full run's estimate (distill estimate) beside the preview's ==",
             f"{'stage':<10} {'full run est.':>22} {'preview est.':>22} {'preview paid':>22} {'cached':>7}",
             f"{'':<10} {'requests':>11} {'$':>10} {'requests':>11} {'$':>10} {'requests':>11} {'$':>10}"]
    for r in spend:
        lines.append(f"{r['stage']:<10} {r['full_requests']:>11.0f} {r['full_usd']:>10.4f} "
                     f"{r['estimated_requests']:>11.0f} {r['estimated_usd']:>10.4f} {r['paid_requests']:>11.0f} "
                     f"{r['paid_usd']:>10.4f} {r['cached']:>7.0f}")
    lines.append("The preview's spend is in the run's spend ledger, labelled preview:<stage>, and counts against "
                 "the run's budget; once the run exists, `distill status RUN --json` shows it under `preview`.")
    return lines


def _section(kind: str, items: PreviewItems, title: str) -> list[str]:
    return ["", f"== {title} ({len(getattr(items, kind))} of {items.total(kind)}) =="]


def _wrap(text: str, indent: int, max_lines: int = 3) -> str:
    lines = textwrap.wrap(" ".join(str(text).split()), WIDTH, initial_indent=" " * indent,
                          subsequent_indent=" " * (indent + 2), max_lines=max_lines, placeholder=" …")
    return "\n".join(lines) or " " * indent


def _text(text: str) -> str:
    return text if text.strip() else "(empty)"


def _num(value: float | None) -> str:
    return "N/A" if value is None else f"{value:g}"
