"""One place that turns the errors the pipeline raises into a message and an exit code (never a traceback)."""

from __future__ import annotations

from pipeline.cli.common import EXIT_BAD_INPUT, EXIT_FAILED, CliError

# A pipeline error class derived from ValueError is bad input (a file, key or item); the rest are failures.
ADVICE = {
    "ChatTemplateError": "give sft.chat_template (a training variant or a Jinja file) or use another student",
    "TrainingError": "fix the setting named above and run the same command again",
    "BudgetExceeded": "raise the budget named above or lower the work, then run the same command to resume",
    "TeacherFatal": "fix the endpoint (key, model name, base_url) and run the same command to resume",
    "StoreError": "check storage.root and the run name",
}


def is_known(exc: BaseException) -> bool:
    """An error the pipeline raises on purpose: its class is defined in the `pipeline` package."""
    return type(exc).__module__.split(".")[0] == "pipeline"


def advice(exc: BaseException) -> str:
    for cls in type(exc).__mro__:
        if cls.__name__ in ADVICE:
            return ADVICE[cls.__name__]
    return "fix what the message names and run the same command again (finished work is kept)"


def as_cli_error(exc: BaseException) -> CliError | None:
    """The message and exit code for a known error; None for an unexpected one (a bug: let its traceback show)."""
    if isinstance(exc, CliError):
        return exc
    if not is_known(exc):
        return None
    code = EXIT_BAD_INPUT if isinstance(exc, ValueError) else EXIT_FAILED
    name = type(exc).__name__
    text = str(exc) if name in ("StageFailed", "CliError") else f"{name}: {exc}"
    return CliError(f"{text}\n  what to do: {advice(exc)}", code)
