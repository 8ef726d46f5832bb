"""`distill status` and `report`: look at a run that exists."""

from __future__ import annotations

import json

import click

from pipeline.cli.common import open_run, print_status, recipe_option, root_option, run_argument
from pipeline.run.status import preview_spend, review_reports, status_rows
from pipeline.teacher.spend import spend_summary


@click.command()
@run_argument
@root_option
@recipe_option
@click.option("--json", "as_json", is_flag=True, help="Print an object: per stage and per endpoint the requests, "
              "tokens, dollars paid (from the spend ledger) and cache hits; the same for `distill preview` (`preview`); the caps; "
              "the batches sent; the reviews' reports by round.")
def status(run: str, root: str | None, recipe_path: str | None, as_json: bool) -> None:
    """Show a table of a run's stages: status, items, failures, cost and time."""
    store = open_run(run, root, recipe_path)
    if not as_json:
        print_status(store)
        return
    spend = spend_summary(store)
    stages = {}
    for row in status_rows(store, spend):
        paid = spend["stages"][row["stage"]]
        stages[row["stage"]] = {**{k: v for k, v in row.items() if k not in ("stage", "cost_usd")}, **paid}
    click.echo(json.dumps({"run": store.run_name, "run_dir": store.url, "stages": stages,
                           "preview": preview_spend(spend), "endpoints": spend["endpoints"], "total_usd": spend["total_usd"],
                           "budget": spend["budget"], "batches": spend["batches"],
                           "reviews": review_reports(store)}, indent=2, sort_keys=True))


@click.command()
@run_argument
@root_option
@recipe_option
def report(run: str, root: str | None, recipe_path: str | None) -> None:
    """Rebuild a run's report (evaluate/report.json, report.md, plots) from its store and summarise it."""
    from pipeline.stages.evaluate.report import write_report  # plots and statistics: not for `status`

    store = open_run(run, root, recipe_path)
    rep = write_report(store)
    for label, m in (rep.get("evaluation") or {}).get("models", {}).items():
        acc = f", accuracy {m['accuracy']['mean']:.3f} ± {m['accuracy']['stderr']:.3f}" if m["accuracy"] else ""
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
