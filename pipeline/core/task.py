"""Task plugins: what a task supplies (prompts, a checker, a built-in teacher, a student corpus) and how one is found.

A recipe names a task as `task: NAME` (registered under the `zephyr_distill.tasks` entry-point group) or as
`task: package.module:Class`. Nothing in the core knows any particular task.
"""

from __future__ import annotations

import importlib
import importlib.metadata
from collections.abc import Callable, Mapping
from contextlib import AbstractContextManager
from functools import cache
from typing import Any

from pydantic import BaseModel

ENTRY_POINT_GROUP = "zephyr_distill.tasks"


class TaskError(ValueError):
    """A task or checker that cannot be found or cannot supply what a recipe asks of it."""


class Task:
    """Base class of task plugins: override what your task has; the defaults say it has nothing."""

    name: str = "task"
    # the options model of the task's built-in teacher (`teacher.base_url: builtin`), None when it has none
    teacher_options: type[BaseModel] | None = None

    def prompts(self, count: int, seed: int) -> list[str]:
        """`count` training prompts drawn with `seed`."""
        raise TaskError(f"task '{self.name}' supplies no training prompts; give prompts.source a file")

    def heldout(self, count: int, seed: int) -> list[dict[str, Any]] | None:
        """Evaluation items (`turns` or `prompt`, optional `id`, `category`, `reference`, any fields the checker
        reads), never among the training prompts; None when the task has no held-out set."""
        return None

    @property
    def has_checker(self) -> bool:
        return type(self).check is not Task.check

    def check(self, item: Mapping[str, Any], answer: str) -> bool | float:
        """Ground truth: whether (or how well, 0..1) `answer` answers the item's last turn."""
        raise TaskError(f"task '{self.name}' has no checker")

    def data_files(self) -> list[str]:
        """Files the task reads its prompts or held-out set from: their contents are part of the fingerprints."""
        return []

    def corpus(self, size: int, seed: int) -> list[str] | None:
        """Texts to train the built-in tiny student's tokenizer on (None: the prompts are used)."""
        return None

    def count_teacher_tokens(self, text: str) -> int | None:
        """How the built-in teacher counts a text's tokens in its `usage` (None: unknown; estimates guess)."""
        return None

    def serve_teacher(self, options: BaseModel) -> AbstractContextManager[str]:
        """Start the task's built-in teacher; the context yields its OpenAI-compatible base URL."""
        raise TaskError(f"task '{self.name}' has no built-in teacher")


def registered_tasks() -> dict[str, importlib.metadata.EntryPoint]:
    return {ep.name: ep for ep in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP)}


def _import(ref: str) -> Any:
    module_name, _, attr = ref.partition(":")
    if not module_name or not attr:
        raise TaskError(f"'{ref}' should look like package.module:Name")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise TaskError(f"cannot import '{module_name}' ({exc})") from None
    try:
        return getattr(module, attr)
    except AttributeError:
        raise TaskError(f"module '{module_name}' has no '{attr}'") from None


@cache
def load_task(ref: str) -> Task:
    """The task named `ref`: a registered name or `package.module:Class` (a Task subclass or instance)."""
    if ":" in ref:
        found = _import(ref)
    else:
        tasks = registered_tasks()
        if ref not in tasks:
            raise TaskError(f"no task named '{ref}'; registered tasks: {sorted(tasks) or 'none'} "
                            "(or write package.module:Class)")
        found = tasks[ref].load()
    task = found() if isinstance(found, type) else found
    if not isinstance(task, Task):
        raise TaskError(f"'{ref}' is not a pipeline.core.task.Task (got {type(task).__name__})")
    return task


@cache
def load_callable(ref: str) -> Callable[..., Any]:
    """A function named `package.module:function` (e.g. `evaluate.checker`)."""
    found = _import(ref)
    if not callable(found):
        raise TaskError(f"'{ref}' is not callable")
    return found
