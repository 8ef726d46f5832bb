"""One place that turns the errors the pipeline raises into a message and an exit code (never a traceback),
for the CLI and for Prefect flow runs' final states alike."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager

EXIT_FAILED, EXIT_BAD_INPUT = 1, 2


class StageFailed(RuntimeError):
    """A stage stopped, or would stop; the message says why and what to do."""


class DistillFailed(RuntimeError):
    """An error already turned into its message (stage, what, what to do) and exit code: a Prefect flow run's
    final state carries exactly this text, and the CLI prints it as is."""

    def __init__(self, message: str, code: int = EXIT_FAILED):
        super().__init__(message)
        self.code = code


# A pipeline error class derived from ValueError is bad input (a file, key or item); the rest are failures.
ADVICE = {
    "ChatTemplateError": "give sft.chat_template (a training variant or a Jinja file) or use another student",
    "TrainingError": "fix the setting named above and run the same command again",
    "BudgetExceeded": "raise the budget named above or lower the work, then run the same command to resume",
    "TeacherFatal": "fix the endpoint (key, model name, base_url) and run the same command to resume",
    "StoreError": "check storage.root and the run name",
    "ReviewPending": "answer the review as the message says, then run the same command again (finished work is kept)",
    "ReviewTimedOut": "run the same command again to be asked again, or answer in a file with `distill review RUN`",
}
PLAIN = ("StageFailed", "CliError")  # messages that already say what to do: shown without their class name


def is_known(exc: BaseException) -> bool:
    """An error the pipeline raises on purpose: its class is defined in the `pipeline` package."""
    return type(exc).__module__.split(".")[0] == "pipeline"


def advice(exc: BaseException) -> str:
    for cls in type(exc).__mro__:
        if cls.__name__ in ADVICE:
            return ADVICE[cls.__name__]
    return "fix what the message names and run the same command again (finished work is kept)"


def explain(exc: BaseException) -> DistillFailed | None:
    """The message and exit code for a known error; None for an unexpected one (a bug: let its traceback show)."""
    if isinstance(exc, DistillFailed):
        return exc
    if not is_known(exc):
        return None
    code = EXIT_BAD_INPUT if isinstance(exc, ValueError) else EXIT_FAILED
    name = type(exc).__name__
    text = str(exc) if name in PLAIN else f"{name}: {exc}"
    stage = getattr(exc, "stage", None)  # set by the runner on what a stage raised
    if stage and f"'{stage}'" not in text.split(":")[0]:
        text = f"stage '{stage}': {text}"
    if name == "CliError":
        return DistillFailed(text, getattr(exc, "exit_code", code))
    return DistillFailed(f"{text}\n  what to do: {advice(exc)}", code)


@contextmanager
def explained() -> Iterator[None]:
    """Re-raise a known error as DistillFailed, so that a flow run fails with the mapped message, not a class name."""
    try:
        yield
    except Exception as exc:
        known = explain(exc)
        if known is None or known is exc:
            raise
        raise known from None


class KnownWithoutTraceback(logging.Filter):
    """Prefect logs a failed task or flow run with its traceback; for a known error the message is the whole
    story, so the record keeps its text and loses the traceback (in the console and the UI alike)."""

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        if exc is not None and explain(exc) is not None:
            record.exc_info, record.exc_text = None, None
        return True


def quiet_known_tracebacks() -> None:
    for name in ("prefect.task_runs", "prefect.flow_runs"):
        logger = logging.getLogger(name)
        if not any(isinstance(f, KnownWithoutTraceback) for f in logger.filters):
            logger.addFilter(KnownWithoutTraceback())
