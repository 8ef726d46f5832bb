"""`distill estimate`: what a recipe will cost before anything is paid."""

from __future__ import annotations

import json

import click

from pipeline.cli.common import EXIT_FAILED, CliError, load, set_option
from pipeline.core.sources import DataError
from pipeline.run.estimate import estimate as estimate_run
from pipeline.run.estimate import estimate_table


@click.command()
@click.argument("recipe", type=click.Path(dir_okay=False))
@click.option("--json", "as_json", is_flag=True, help="Print an object with `stages` (per endpoint and role: "
              "requests, tokens, dollars live and batch) and `total_usd`.")
@set_option
def estimate(recipe: str, as_json: bool, overrides: tuple[str, ...]) -> None:
    """Expected requests, tokens and dollars per stage and endpoint; exits non-zero when over a cap."""
    rec = load(recipe, overrides)
    try:
        result = estimate_run(rec)
    except (DataError, ValueError, FileNotFoundError) as exc:
        raise CliError(f"{recipe}: {exc}") from None
    if as_json:
        click.echo(json.dumps(result, indent=2, sort_keys=True))
    else:
        for line in estimate_table(result):
            click.echo(line)
    for note in result["notes"]:
        click.echo(f"note: {note}", err=True)
    if result["over_caps"]:
        raise CliError("over a cap: " + "; ".join(result["over_caps"]), EXIT_FAILED)
