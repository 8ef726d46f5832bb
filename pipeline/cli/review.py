"""`distill review`: the review before DPO (feedback.review) as a file a person fills in, for runs without
Prefect; it writes the form, and once every answer is in, records it."""

from __future__ import annotations

import os

import click

from pipeline.cli.common import EXIT_BAD_INPUT, CliError, open_run, recipe_option, root_option, run_argument
from pipeline.core.recipe import RecipeError, ReviewConfig, recipe_from_dict
from pipeline.core.rounds import round_store
from pipeline.core.store import RunStore
from pipeline.review.answers import review_path
from pipeline.review.form import form_path
from pipeline.review.gate import record_form, write_form
from pipeline.review.report import status_line


def review_config(store: RunStore) -> ReviewConfig:
    """The run's feedback.review, from the recipe its manifest recorded."""
    try:
        recipe = recipe_from_dict(store.read_manifest().get("recipe") or {}, f"{store.url}/manifest.json")
    except RecipeError as exc:
        raise CliError(str(exc), EXIT_BAD_INPUT) from None
    if recipe.feedback.review is None:
        raise CliError(f"run {store.url}: its recipe has no feedback.review; set it (e.g. --set "
                       "feedback.review.sample=8) and run the recipe again", EXIT_BAD_INPUT)
    return recipe.feedback.review


def read_form(view: RunStore, path: str | None) -> tuple[str | None, str]:
    """The form's text (None when it is not there yet) and where it is."""
    if path is None:
        raw = view.read_bytes(form_path(view))
        return (None if raw is None else raw.decode()), form_path(view)
    if not os.path.exists(path):
        return None, path
    with open(path, encoding="utf-8") as fh:
        return fh.read(), path


@click.command()
@run_argument
@root_option
@recipe_option
@click.option("--round", "round_", type=click.IntRange(min=1), default=1, show_default=True,
              help="The on-policy round whose pairs to review (dpo.rounds > 1).")
@click.option("--form", "form", type=click.Path(dir_okay=False), default=None,
              help="The form as a local file (default: feedback/review/form.yaml in the run directory).")
def review(run: str, root: str | None, recipe_path: str | None, round_: int, form: str | None) -> None:
    """Review a round's pairs in a file: write the form (prefilled with answers already recorded); once each
    `answer:` is A, B or drop, record it; then run the same `distill run` command again to train dpo on them."""
    store = open_run(run, root, recipe_path)
    cfg, view = review_config(store), round_store(store, round_)
    state = view.stage_state("feedback")
    if state.status != "completed":
        raise CliError(f"run {store.url}: {view.state_key('feedback')} is {state.status}: there are no pairs to "
                       "review yet; run it first", EXIT_BAD_INPUT)
    text, where = read_form(view, form)
    if text is None:
        path, n = write_form(view, cfg, form)
        click.echo(f"wrote the review form {path} ({n} pairs): set each `answer:` to A, B or drop, then run "
                   "this command again to record it")
        return
    record_form(view, cfg, text, where)
    click.echo(status_line(view))
    click.echo(f"report: {review_path(view, 'report.md')}")
    click.echo("recorded; run the same `distill run` (or `distill stage dpo`) command again: dpo trains on the "
               "reviewed pairs")
