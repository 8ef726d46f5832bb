"""What every `distill` command shares: exit codes, errors, logging, loading a recipe, finding a run."""

from __future__ import annotations

import logging
import sys
from pathlib import Path

import click

from pipeline.core.recipe import Recipe, RecipeError, load_recipe
from pipeline.core.store import RunStore, StoreError
from pipeline.run.errors import EXIT_BAD_INPUT, EXIT_FAILED, explain
from pipeline.run.status import preview_spend, review_lines, stage_warnings, status_rows
from pipeline.teacher.spend import spend_summary

__all__ = ["EXIT_BAD_INPUT", "EXIT_FAILED", "CliError", "as_cli_error"]


class CliError(click.ClickException):
    def __init__(self, message: str, code: int = EXIT_FAILED):
        super().__init__(message)
        self.exit_code = code


def as_cli_error(exc: BaseException) -> CliError | None:
    """The message and exit code of a known error (pipeline.run.errors); None for a bug, whose traceback shows."""
    if isinstance(exc, CliError):
        return exc
    known = explain(exc)
    return None if known is None else CliError(str(known), known.code)


def setup_logging(verbose: bool) -> None:
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO, stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    for noisy in ("httpx", "httpx2", "httpcore", "httpcore2", "openai", "urllib3", "filelock"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def load(recipe_path: str, overrides: tuple[str, ...]) -> Recipe:
    try:
        return load_recipe(recipe_path, list(overrides))
    except RecipeError as exc:
        raise CliError(str(exc), EXIT_BAD_INPUT) from None


set_option = click.option("--set", "overrides", multiple=True, metavar="KEY.PATH=VALUE",
                          help="Override a recipe key, e.g. --set dpo.args.beta=0.05 (repeatable).")
run_argument = click.argument("run", metavar="RUN_DIR_OR_NAME")
root_option = click.option("--root", default=None, help="storage.root to look in when RUN is a name (default: "
                           "./runs, or the recipe's with --recipe).")
recipe_option = click.option("--recipe", "recipe_path", default=None, type=click.Path(dir_okay=False),
                             help="Take storage.root from this recipe.")


def open_run(run: str, root: str | None, recipe_path: str | None) -> RunStore:
    """A run directory (path or URL), or a run name under --root / the recipe's storage.root / ./runs."""
    try:
        if root is None and recipe_path is None and ("/" in run or Path(run).exists()):
            return RunStore.open_existing(run)
        base = root or (load(recipe_path, ()).storage.root if recipe_path else "runs")
        return RunStore.open_existing(f"{base.rstrip('/')}/{run}")
    except StoreError as exc:
        raise CliError(str(exc), EXIT_BAD_INPUT) from None


def print_status(store: RunStore) -> None:
    spend = spend_summary(store)
    rows = status_rows(store, spend)
    click.echo(f"run {store.run_name}  ({store.url})")
    header = f"{'stage':<11} {'status':<10} {'items':>7} {'failures':>8} {'cost $':>9} {'time s':>8}  fingerprint"
    click.echo(header)
    click.echo("-" * len(header))
    for r in rows:
        click.echo(f"{r['stage']:<11} {r['status']:<10} {r['items']:>7} {r['failures']:>8} "
                   f"{r['cost_usd']:>9.4f} {r['seconds']:>8.1f}  {r['fingerprint']}")
    for r in rows:
        if r["status"] == "failed" and r["message"]:
            click.echo(f"{r['stage']} failed: {r['message']}")
    for line in stage_warnings(store):
        click.echo(line)
    for line in review_lines(store):
        click.echo(line)
    click.echo(f"spent ${spend['total_usd']:.4f} in all (the spend ledger)"
               + (f" of budget.max_cost_usd=${spend['budget']['max_cost_usd']:.2f}"
                  if spend["budget"]["max_cost_usd"] is not None else ""))
    if previews := preview_spend(spend):
        click.echo(f"  of which `distill preview` paid ${sum(p['usd'] for p in previews.values()):.4f} for "
                   f"{sum(p['requests'] for p in previews.values())} requests (its cached answers serve this run)")
    for name, paid in spend["endpoints"].items():
        settled = paid.get("concurrency") or {}
        if settled.get("mode") == "auto":
            click.echo(f"endpoint '{name}': max_concurrency auto settled at {settled['final']} in "
                       f"{settled['stage']} (mean {settled['mean']}, max {settled['max']} of {settled['ceiling']}; "
                       f"{settled['throttled']} answers 429/503)")
    for b in spend["batches"]:
        if not b.get("consumed"):
            click.echo(f"open batch {b.get('batch_id') or '(being created)'} of {b['stage']} on endpoint "
                       f"'{b['endpoint']}' ({b['requests']} requests): the next run of that endpoint takes it in")
