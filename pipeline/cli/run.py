"""`distill validate`, `run` and `stage`: check a recipe, run the pipeline (as the Prefect flow or directly)."""

from __future__ import annotations

import click

from pipeline.cli.common import EXIT_BAD_INPUT, CliError, as_cli_error, load, print_status, set_option
from pipeline.cli.server import prefect_api
from pipeline.core.recipe import Recipe, unpriced_pool_members
from pipeline.core.store import RunStore
from pipeline.run.checks import check_settings
from pipeline.run.errors import StageFailed
from pipeline.run.registry import STAGE_NAMES, fingerprint, parse_stages
from pipeline.run.runner import chosen_stages, plan, run_pipeline
from pipeline.train.configs import check_trl_args
from pipeline.train.models import TrainingError


def checked(recipe_path: str, overrides: tuple[str, ...]) -> Recipe:
    """The recipe, with the TRL arguments of sft and dpo checked as TRL would read them."""
    rec = load(recipe_path, overrides)
    try:
        check_trl_args(rec)
    except TrainingError as exc:
        raise CliError(f"{recipe_path}: {exc}", EXIT_BAD_INPUT) from None
    return rec


@click.command()
@click.argument("recipe", type=click.Path(dir_okay=False))
@set_option
def validate(recipe: str, overrides: tuple[str, ...]) -> None:
    """Check a recipe file (TRL arguments included); print each stage's fingerprint. Writes nothing."""
    rec = checked(recipe, overrides)
    try:
        check_settings(rec, list(STAGE_NAMES))
    except StageFailed as exc:
        raise CliError(f"{recipe}: {exc}", EXIT_BAD_INPUT) from None
    click.echo(f"{recipe}: valid recipe '{rec.name}'")
    memo: dict[str, str] = {}
    for name in plan(rec):
        click.echo(f"  {name:<11} fingerprint {fingerprint(name, rec, memo)}")
    for note in unpriced_pool_members(rec):
        click.echo(f"note: {note}", err=True)


def run_directly(rec: Recipe, run_name: str | None, stages: list[str], force: bool) -> None:
    try:
        store, reports = run_pipeline(rec, run_name, stages, force=force)
    except KeyboardInterrupt:
        raise CliError("interrupted; run the same command again to resume where it stopped", 130) from None
    except Exception as exc:
        known = as_cli_error(exc)
        if known is None:
            raise
        raise known from None
    for rep in reports:
        click.echo(f"{rep.stage}: {rep.message or rep.status}")
    print_status(store)


@click.command()
@click.argument("recipe", type=click.Path(dir_okay=False))
@click.option("--run-name", default=None, help="Run directory name (default: the recipe's `name`); "
              "reuse it to resume.")
@click.option("--stages", default=None, help=f"Comma-separated subset of {','.join(STAGE_NAMES)}, or a later "
              "round's stage such as dpo@2 (default: all, then later rounds while each is kept).")
@click.option("--force", is_flag=True, help="Redo the chosen stages even if they completed.")
@click.option("--from-round", type=click.IntRange(min=1), default=None,
              help="Redo the on-policy rounds from this one on (dpo.rounds > 1).")
@click.option("--series", default=None, help="Recurring series name: use only prompts no earlier run used.")
@click.option("--prefect/--no-prefect", default=True, show_default=True,
              help="Run as the Prefect `distill` flow (shown in the UI when PREFECT_API_URL is set), "
                   "or directly.")
@set_option
def run(recipe: str, run_name: str | None, stages: str | None, force: bool, from_round: int | None,
        series: str | None, prefect: bool, overrides: tuple[str, ...]) -> None:
    """Run the pipeline (all stages, or --stages) in one run directory; finished stages are skipped."""
    rec = checked(recipe, overrides)
    try:
        chosen = parse_stages(stages) if stages else None
    except ValueError as exc:
        raise CliError(f"--stages: {exc}", EXIT_BAD_INPUT) from None
    if stages and from_round:
        raise CliError("give --stages or --from-round, not both", EXIT_BAD_INPUT)
    if not prefect:
        if series:
            raise CliError("--series needs the Prefect flow (drop --no-prefect)", EXIT_BAD_INPUT)
        try:
            keys = chosen_stages(rec, chosen, from_round)
        except StageFailed as exc:
            raise CliError(str(exc), EXIT_BAD_INPUT) from None
        run_directly(rec, run_name, keys, force or from_round is not None)
        return
    run_flow(recipe, overrides, run_name, chosen, force, series, from_round)


def run_flow(recipe: str, overrides: tuple[str, ...], run_name: str | None, stages: list[str] | None, force: bool,
             series: str | None, from_round: int | None = None) -> None:
    from pipeline.flows.distill import distill
    from pipeline.flows.params import DistillRequest

    later = [key for key in stages or [] if "@" in key]
    request = DistillRequest(recipe_path=recipe, run_name=run_name, overrides=list(overrides), series=series,
                             stages=[key for key in stages or STAGE_NAMES if "@" not in key], round_stages=later,
                             force=force, from_round=from_round)
    with prefect_api():
        state = distill(request, return_state=True)
        try:
            result = state.result()
        except Exception as exc:  # noqa: BLE001 - whatever the flow raised (Prefect logged it) becomes a CLI error
            raise as_cli_error(exc) or CliError(f"{type(exc).__name__}: {exc}") from None
    if not state.is_completed():
        raise CliError(f"the distill flow ended {state.name}")
    if result.get("status") == "nothing new":
        click.echo(f"series '{series}': no new prompts; nothing to do", err=True)
        return
    for name, rep in result.get("stages", {}).items():
        click.echo(f"{name}: {rep.get('message') or rep.get('status')}")
    print_status(RunStore.open_existing(result["run_dir"]))


@click.command()
@click.argument("name", metavar=f"{{{'|'.join(STAGE_NAMES)}}}[@ROUND]")
@click.argument("recipe", type=click.Path(dir_okay=False))
@click.option("--run-name", required=True, help="Run directory name under storage.root.")
@click.option("--force", is_flag=True, help="Redo the stage even if it completed.")
@set_option
def stage(name: str, recipe: str, run_name: str, force: bool, overrides: tuple[str, ...]) -> None:
    """Run one stage (no Prefect needed), e.g. `dpo`, or `dpo@2` of a later on-policy round; it reads its
    inputs from the run directory."""
    try:
        [key] = parse_stages(name)
    except ValueError as exc:
        raise CliError(f"stage '{name}': {exc}", EXIT_BAD_INPUT) from None
    rec = checked(recipe, overrides) if key.split("@")[0] in ("sft", "dpo") else load(recipe, overrides)
    run_directly(rec, run_name, [key], force)
