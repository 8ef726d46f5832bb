"""The `distill` command line (outside the library core: it may start Prefect flows)."""

from __future__ import annotations

import importlib

import click

from pipeline.cli.common import as_cli_error, setup_logging

# Each command's module (pipeline.cli.<module>) is imported when that command runs or help lists it: importing
# them all would make `distill status` load every stage, Prefect and the training stack first.
COMMANDS = {
    "validate": ("run", "validate"), "estimate": ("estimate", "estimate"), "preview": ("preview", "preview"),
    "run": ("run", "run"), "stage": ("run", "stage"), "status": ("runs", "status"), "report": ("runs", "report"),
    "review": ("review", "review"),
    "deploy": ("tools", "deploy"), "serve": ("tools", "serve"), "teacher": ("tools", "teacher"),
    "build-student": ("tools", "build_student"), "export": ("export", "export"), "server": ("server", "server"),
    "postgres": ("postgres", "postgres"),
}


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


class DistillGroup(MappedGroup):
    """`distill`: its commands (COMMANDS) are loaded when asked for."""

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted(set(COMMANDS) | set(self.commands))

    def get_command(self, ctx: click.Context, name: str) -> click.Command | None:
        if name in COMMANDS and name not in self.commands:
            module, attr = COMMANDS[name]
            self.add_command(getattr(importlib.import_module(f"pipeline.cli.{module}"), attr), name)
        return super().get_command(ctx, name)


@click.group(cls=DistillGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.option("-v", "--verbose", is_flag=True, help="Debug logging.")
@click.version_option(package_name="zephyr-distill")
def main(verbose: bool) -> None:
    """Distill a teacher into a small chat model, Zephyr style: generate, sft, sample, feedback, dpo, evaluate."""
    setup_logging(verbose)
