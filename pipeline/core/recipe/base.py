"""Shared pieces of the recipe sections: the strict base model, the error type, path checks."""

from __future__ import annotations

from pathlib import Path

from pydantic import BaseModel, ConfigDict, ValidationInfo

BUILTIN_TEACHER = "builtin"  # teacher.base_url: the recipe's task serves its own teacher on loopback
BUILTIN_STUDENT = "builtin:tiny"  # sft.model: a tiny student built offline from the task's texts
TASK_PROMPTS = "task"  # prompts.source: the recipe's task supplies the prompts


class RecipeError(ValueError):
    """A recipe that cannot be used; the message names the file and the key path."""


class Section(BaseModel):
    """A recipe section: unknown keys are errors, assignments are validated."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)


def recipe_dir(info: ValidationInfo | None) -> Path | None:
    """The recipe file's folder, which relative paths in it are resolved against: the loader passes it as the
    validation context (`{"base_dir": ...}`); None for a recipe built in code or from a run's snapshot."""
    context = info.context if info is not None else None
    return (context or {}).get("base_dir")


def existing_path(value: str, what: str, info: ValidationInfo | None = None) -> str:
    """`value` as an absolute path that exists (relative to the recipe's folder); URLs are checked when read."""
    if "://" in value:
        return value
    base = recipe_dir(info)
    path = Path(value).expanduser()
    if not path.is_absolute() and base is not None:
        path = base / path
    if not path.exists():
        raise ValueError(f"{what} '{value}' does not exist (looked at {path})")
    return str(path.resolve())


def local_path_or_id(value: str, info: ValidationInfo | None = None) -> str:
    """A model directory next to the recipe becomes an absolute path; anything else stays as given (a hub id)."""
    base = recipe_dir(info)
    if value.startswith("builtin:") or base is None or "://" in value or Path(value).is_absolute():
        return value
    candidate = base / Path(value).expanduser()
    return str(candidate.resolve()) if candidate.exists() else value
