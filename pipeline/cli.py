"""The `distill` command line: validate, run, stage, status, report, toy-teacher, build-student."""

from __future__ import annotations

import logging
import sys
from pathlib import Path

import click

from pipeline.recipe import Recipe, RecipeError, load_recipe
from pipeline.stages import STAGE_ORDER, fingerprint, parse_stages

log = logging.getLogger("pipeline")

EXIT_FAILED, EXIT_BAD_INPUT, EXIT_NOT_IMPLEMENTED = 1, 2, 3


class CliError(click.ClickException):
    def __init__(self, message: str, code: int = EXIT_FAILED):
        super().__init__(message)
        self.exit_code = code


def _setup_logging(verbose: bool) -> None:
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO, stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    for noisy in ("httpx", "httpx2", "httpcore", "httpcore2", "openai", "urllib3", "filelock"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def _load(recipe_path: str, overrides: tuple[str, ...]) -> Recipe:
    try:
        return load_recipe(recipe_path, list(overrides))
    except RecipeError as exc:
        raise CliError(str(exc), EXIT_BAD_INPUT) from None


set_option = click.option("--set", "overrides", multiple=True, metavar="KEY.PATH=VALUE",
                          help="Override a recipe key, e.g. --set dpo.args.beta=0.05 (repeatable).")


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("-v", "--verbose", is_flag=True, help="Debug logging.")
@click.version_option(package_name="zephyr-distill")
def main(verbose: bool) -> None:
    """Distill a teacher into a small chat model, Zephyr style: generate, sft, sample, feedback, dpo, evaluate."""
    _setup_logging(verbose)


@main.command()
@click.argument("recipe", type=click.Path(dir_okay=False))
@set_option
def validate(recipe: str, overrides: tuple[str, ...]) -> None:
    """Check a recipe file; print each stage's fingerprint. Writes nothing."""
    rec = _load(recipe, overrides)
    click.echo(f"{recipe}: valid recipe '{rec.name}'")
    memo: dict[str, str] = {}
    for name in STAGE_ORDER:
        click.echo(f"  {name:<9} fingerprint {fingerprint(name, rec, memo)}")


def _run(rec: Recipe, run_name: str | None, stages: list[str], force: bool) -> None:
    from pipeline.runner import StageFailed, StageNotImplemented, run_pipeline
    from pipeline.store import StoreError

    try:
        store, reports = run_pipeline(rec, run_name, stages, force=force)
    except StageNotImplemented as exc:
        raise CliError(str(exc), EXIT_NOT_IMPLEMENTED) from None
    except (StageFailed, StoreError) as exc:
        raise CliError(str(exc)) from None
    except KeyboardInterrupt:
        raise CliError("interrupted; run the same command again to resume where it stopped", 130) from None
    for rep in reports:
        click.echo(f"{rep.stage}: {rep.message or rep.status}")
    _print_status(store)


@main.command()
@click.argument("recipe", type=click.Path(dir_okay=False))
@click.option("--run-name", default=None, help="Run directory name (default: the recipe's `name`); "
              "reuse it to resume.")
@click.option("--stages", default=None, help=f"Comma-separated subset of {','.join(STAGE_ORDER)} (default: all).")
@click.option("--force", is_flag=True, help="Redo the chosen stages even if they completed.")
@click.option("--series", default=None, help="Recurring series name: use only prompts no earlier run used.")
@click.option("--prefect/--no-prefect", default=True, show_default=True,
              help="Run as the Prefect `distill` flow (shown in the UI when PREFECT_API_URL is set), "
                   "or directly.")
@set_option
def run(recipe: str, run_name: str | None, stages: str | None, force: bool, series: str | None, prefect: bool,
        overrides: tuple[str, ...]) -> None:
    """Run the pipeline (all stages, or --stages) in one run directory; finished stages are skipped."""
    rec = _load(recipe, overrides)
    try:
        chosen = parse_stages(stages)
    except ValueError as exc:
        raise CliError(f"--stages: {exc}", EXIT_BAD_INPUT) from None
    if not prefect:
        if series:
            raise CliError("--series needs the Prefect flow (drop --no-prefect)", EXIT_BAD_INPUT)
        _run(rec, run_name, chosen, force)
        return
    _run_flow(recipe, overrides, run_name, chosen, force, series)


def _run_flow(recipe: str, overrides: tuple[str, ...], run_name: str | None, stages: list[str], force: bool,
              series: str | None) -> None:
    from flows.distill import distill
    from flows.params import DistillRequest
    from pipeline.runner import StageFailed, StageNotImplemented
    from pipeline.store import RunStore

    request = DistillRequest(recipe_path=recipe, run_name=run_name, stages=stages, overrides=list(overrides),
                             series=series, force=force)
    state = distill(request, return_state=True)
    if state.is_completed():
        result = state.result()
        if result.get("status") == "nothing new":
            click.echo(f"series '{series}': no new prompts; nothing to do", err=True)
            return
        for name, rep in result.get("stages", {}).items():
            click.echo(f"{name}: {rep.get('message') or rep.get('status')}")
        _print_status(RunStore.open_existing(result["run_dir"]))
        return
    try:
        state.result()
    except StageNotImplemented as exc:
        raise CliError(str(exc), EXIT_NOT_IMPLEMENTED) from None
    except StageFailed as exc:
        raise CliError(str(exc)) from None
    except Exception as exc:  # the flow's own error, already logged by Prefect
        raise CliError(f"{type(exc).__name__}: {exc}") from None
    raise CliError(f"the distill flow ended {state.name}")


@main.command()
@click.option("--cpu-pool", default="cpu", show_default=True)
@click.option("--gpu-pool", default="gpu", show_default=True)
@click.option("--cron", default=None, help="Also register `distill/nightly`, a recurring series on this schedule "
              "(e.g. '0 2 * * *').")
@click.option("--gpu-slots", default=1, show_default=True, help="GPU stages that may run at once (global limit).")
def deploy(cpu_pool: str, gpu_pool: str, cron: str | None, gpu_slots: int) -> None:
    """Register the deployments with the Prefect server at PREFECT_API_URL (pools and limits too)."""
    from flows.deploy import deploy_all

    for name in deploy_all(cpu_pool, gpu_pool, cron, gpu_slots):
        click.echo(f"deployed {name}")
    click.echo(f"start workers: prefect worker start --pool {cpu_pool}   and   prefect worker start --pool {gpu_pool}")


@main.command()
@click.option("--gpu-pool", default="gpu", show_default=True, help="The name GPU stage deployments get.")
@click.option("--cron", default=None, help="Also serve `distill/nightly` on this schedule.")
def serve(gpu_pool: str, cron: str | None) -> None:
    """Serve every deployment from this one process (a single machine; no work pools needed)."""
    from flows.deploy import serve_all

    serve_all(gpu_pool, cron)


@main.command()
@click.argument("name", type=click.Choice(STAGE_ORDER))
@click.argument("recipe", type=click.Path(dir_okay=False))
@click.option("--run-name", required=True, help="Run directory name under storage.root.")
@click.option("--force", is_flag=True, help="Redo the stage even if it completed.")
@set_option
def stage(name: str, recipe: str, run_name: str, force: bool, overrides: tuple[str, ...]) -> None:
    """Run one stage (no Prefect needed); it reads its inputs from the run directory."""
    _run(_load(recipe, overrides), run_name, [name], force)


def _print_status(store) -> None:  # noqa: ANN001
    from pipeline.runner import status_rows

    rows = status_rows(store)
    click.echo(f"run {store.run_name}  ({store.url})")
    header = f"{'stage':<9} {'status':<10} {'items':>7} {'failures':>8} {'cost $':>9} {'time s':>8}  fingerprint"
    click.echo(header)
    click.echo("-" * len(header))
    for r in rows:
        click.echo(f"{r['stage']:<9} {r['status']:<10} {r['items']:>7} {r['failures']:>8} "
                   f"{r['cost_usd']:>9.4f} {r['seconds']:>8.1f}  {r['fingerprint']}")
    for r in rows:
        if r["status"] == "failed" and r["message"]:
            click.echo(f"{r['stage']} failed: {r['message']}")


def _open_run(run: str, root: str | None, recipe_path: str | None):  # noqa: ANN202 - a RunStore
    """A run directory (path or URL), or a run name under --root / the recipe's storage.root / ./runs."""
    from pipeline.store import RunStore, StoreError

    try:
        if root is None and recipe_path is None and ("/" in run or Path(run).exists()):
            return RunStore.open_existing(run)
        base = root or (_load(recipe_path, ()).storage.root if recipe_path else "runs")
        return RunStore.open_existing(f"{base.rstrip('/')}/{run}")
    except StoreError as exc:
        raise CliError(str(exc), EXIT_BAD_INPUT) from None


@main.command()
@click.argument("run", metavar="RUN_DIR_OR_NAME")
@click.option("--root", default=None, help="storage.root to look in when RUN is a name (default: ./runs, "
              "or the recipe's with --recipe).")
@click.option("--recipe", "recipe_path", default=None, type=click.Path(dir_okay=False),
              help="Take storage.root from this recipe.")
def status(run: str, root: str | None, recipe_path: str | None) -> None:
    """Show a table of a run's stages: status, items, failures, cost and time."""
    _print_status(_open_run(run, root, recipe_path))


@main.command()
@click.argument("run", metavar="RUN_DIR_OR_NAME")
@click.option("--root", default=None, help="storage.root to look in when RUN is a name (default: ./runs, "
              "or the recipe's with --recipe).")
@click.option("--recipe", "recipe_path", default=None, type=click.Path(dir_okay=False),
              help="Take storage.root from this recipe.")
def report(run: str, root: str | None, recipe_path: str | None) -> None:
    """Rebuild a run's report (evaluate/report.json, report.md, plots) from its store and summarise it."""
    from pipeline.report import write_report

    store = _open_run(run, root, recipe_path)
    rep = write_report(store)
    for label, m in (rep.get("evaluation") or {}).get("models", {}).items():
        acc = f", accuracy {m['accuracy']['mean']:.3f}" if m["accuracy"] else ""
        vs = m["vs_baseline"]
        win = f", win rate vs {vs['baseline']} {vs['win_rate']:.3f} ± {vs['stderr']:.3f}" if vs and vs["n"] else ""
        judge = f"judge {m['judge']['mean']:.2f}" if m["judge"]["n"] else "judge n/a"
        click.echo(f"{label:<12} {judge}{acc}{win}")
    if rep.get("promotion"):
        click.echo(f"promotion gate: {'promote' if rep['promotion']['promote'] else 'keep'} "
                   f"({rep['promotion']['reason']})")
    for note in rep["notes"]:
        click.echo(f"note: {note}", err=True)
    click.echo(f"report: {store.join('evaluate', 'report.md')}")


@main.command("toy-teacher")
@click.option("--port", default=8000, show_default=True, type=int)
@click.option("--host", default="127.0.0.1", show_default=True)
@click.option("--error-rate", default=0.3, show_default=True, type=float, help="Share of facts it gets wrong.")
@click.option("--latency-ms", default=0.0, show_default=True, type=float)
@click.option("--seed", default=0, show_default=True, type=int)
def toy_teacher(port: int, host: str, error_rate: float, latency_ms: float, seed: int) -> None:
    """Serve the built-in rule-based teacher over the OpenAI chat-completions protocol."""
    from pipeline.toy.teacher_server import ToyTeacherConfig, serve

    click.echo(f"toy teacher on http://{host}:{port}/v1 (Ctrl-C stops it)", err=True)
    serve(ToyTeacherConfig(error_rate=error_rate, latency_ms=latency_ms, seed=seed), host=host, port=port)


@main.command("build-student")
@click.argument("out_dir", type=click.Path(file_okay=False))
@click.option("--prompts", default=2000, show_default=True, help="Toy prompts to train the tokenizer on.")
def build_student_cmd(out_dir: str, prompts: int) -> None:
    """Build the tiny offline student (BPE tokenizer + small Llama) into OUT_DIR."""
    from pipeline.toy.student import build_student
    from pipeline.toy.task import corpus

    path = build_student(out_dir, corpus(prompts, seed=0))
    click.echo(f"tiny student saved to {path}")


if __name__ == "__main__":
    main()
