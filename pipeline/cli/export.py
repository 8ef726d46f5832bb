"""`distill export`: a run's data as a datasets.DatasetDict (ultrachat_200k / ultrafeedback_binarized splits)."""

from __future__ import annotations

import click

from pipeline.cli.common import EXIT_BAD_INPUT, CliError, open_run, recipe_option, root_option, run_argument
from pipeline.export.dataset import ExportError, ExportOptions, check_hub_target, export_run, push_to_hub


@click.command("export")
@run_argument
@click.argument("out", metavar="OUT")
@root_option
@recipe_option
@click.option("--test-share", type=float, default=0.1, show_default=True,
              help="Share of prompts (by a hash of prompt_id) in the test splits.")
@click.option("--split-seed", type=int, default=0, show_default=True, help="Salt of that hash.")
@click.option("--license", "license_", default="other", show_default=True,
              help="Licence field of the dataset card (the teacher's terms of use apply to its outputs).")
@click.option("--push-to-hub", "repo", default=None, metavar="OWNER/NAME",
              help="Also push the splits and the card to this Hugging Face dataset repo (token: HF_TOKEN or "
                   "`huggingface-cli login`).")
@click.option("--private", is_flag=True, help="Create the hub repository as private.")
@click.option("--overwrite", is_flag=True, help="Replace OUT if it exists.")
@click.option("--rounds", is_flag=True, help="Every on-policy round's pairs in the prefs splits, with a `round` "
              "column (default: round 1's, the run's own feedback).")
def export(run: str, out: str, root: str | None, recipe_path: str | None, test_share: float, split_seed: int,
           license_: str, repo: str | None, private: bool, overwrite: bool, rounds: bool) -> None:
    """Save RUN's dialogues and pairs as one DatasetDict in OUT (save_to_disk) with a README.md dataset card:
    train_sft/test_sft/train_gen/test_gen (generate) and train_prefs/test_prefs (feedback)."""
    store = open_run(run, root, recipe_path)
    options = ExportOptions(test_share=test_share, seed=split_seed, license=license_, rounds=rounds)
    try:
        if repo:
            check_hub_target(repo)  # before anything is written
        dd, card = export_run(store, out, options, overwrite=overwrite)
    except ExportError as exc:
        raise CliError(str(exc), EXIT_BAD_INPUT) from None
    for name, split in dd.items():
        click.echo(f"{name:<12} {split.num_rows:>7} rows")
    click.echo(f"saved to {out} (load_from_disk); card {out.rstrip('/')}/README.md")
    if repo:
        try:
            url = push_to_hub(dd, card, repo, private)
        except Exception as exc:  # noqa: BLE001 - the hub's own error, said plainly; OUT is already complete
            raise CliError(f"--push-to-hub {repo}: {type(exc).__name__}: {exc} (the export in {out} is complete)") from None
        click.echo(f"pushed to {url}")
