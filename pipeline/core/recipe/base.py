"""Shared pieces of the recipe sections: the strict base model, the error type, path checks."""

from __future__ import annotations

from pathlib import Path

from pydantic import BaseModel, ConfigDict

BUILTIN_TEACHER = "builtin"  # teacher.base_url: the recipe's task serves its own teacher on loopback
BUILTIN_STUDENT = "builtin:tiny"  # sft.model: a tiny student built offline from the task's texts
TASK_PROMPTS = "task"  # prompts.source: the recipe's task supplies the prompts


class RecipeError(ValueError):
    """A recipe that cannot be used; the message names the file and the key path."""


class Section(BaseModel):
    """A recipe section: unknown keys are errors, assignments are validated."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)


# Relative paths in a recipe are resolved against the recipe file's folder while it is validated.
BASE_DIR: dict[str, Path | None] = {"dir": None}


def existing_path(value: str, what: str) -> str:
    """`value` as an absolute path that exists (relative to the recipe's folder); URLs are checked when read."""
    if "://" in value:
        return value
    base = BASE_DIR.get("dir")
    path = Path(value).expanduser()
    if not path.is_absolute() and base is not None:
        path = base / path
    if not path.exists():
        raise ValueError(f"{what} '{value}' does not exist (looked at {path})")
    return str(path.resolve())


def local_path_or_id(value: str) -> str:
    """A model directory next to the recipe becomes an absolute path; anything else stays as given (a hub id)."""
    base = BASE_DIR.get("dir")
    if value.startswith("builtin:") or base is None or "://" in value or Path(value).is_absolute():
        return value
    candidate = base / Path(value).expanduser()
    return str(candidate.resolve()) if candidate.exists() else value
