"""The `distill` command line (outside the library core: it may start Prefect flows)."""

from __future__ import annotations

import click

from pipeline.cli import postgres, review, runs, server, tools
from pipeline.cli import run as run_commands
from pipeline.cli.common import as_cli_error, setup_logging
from pipeline.cli.estimate import estimate
from pipeline.cli.export import export
from pipeline.cli.preview import preview


class MappedGroup(click.Group):
    """Every command's known errors (see pipeline.run.errors) end as a message and an exit code, never a
    traceback; an unexpected one (a bug) keeps its traceback."""

    def invoke(self, ctx: click.Context) -> object:
        try:
            return super().invoke(ctx)
        except click.ClickException:
            raise
        except Exception as exc:
            known = as_cli_error(exc)
            if known is None:
                raise
            raise known from None


@click.group(cls=MappedGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.option("-v", "--verbose", is_flag=True, help="Debug logging.")
@click.version_option(package_name="zephyr-distill")
def main(verbose: bool) -> None:
    """Distill a teacher into a small chat model, Zephyr style: generate, sft, sample, feedback, dpo, evaluate."""
    setup_logging(verbose)


for command in (run_commands.validate, estimate, preview, run_commands.run, run_commands.stage, runs.status, runs.report,
                review.review, tools.deploy, tools.serve, tools.teacher, tools.build_student, export, server.server,
                postgres.postgres):
    main.add_command(command)
