"""One loader for every recipe: a file, inline YAML (the Prefect form), `--set` overrides, a stored snapshot."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from pipeline.core.recipe.base import RecipeError
from pipeline.core.recipe.model import Recipe


class _Loader(yaml.SafeLoader):
    """YAML 1.1 reads `2e-5` as a string; recipes are full of such learning rates."""


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:\d[\d_]*(?:\.\d*)?|\.\d+)[eE][-+]?\d+$|^[-+]?(?:\d[\d_]*)?\.\d+$|^[-+]?\d[\d_]*\.$"),
    list("-+0123456789."),
)


def parse_yaml(text: str, origin: str) -> Any:
    """YAML as recipes are read (`2e-5` is a number); a syntax error names the origin, line and column."""
    try:
        return yaml.load(text, Loader=_Loader)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(exc, "problem", None) or str(exc)
        raise RecipeError(f"{origin}:{where}: malformed YAML: {problem}") from None


def parse_override(item: str) -> tuple[list[str], Any]:
    """Split `a.b.c=value`; the value is read as YAML (numbers, booleans, lists)."""
    if "=" not in item:
        raise RecipeError(f"--set '{item}': expected KEY.PATH=VALUE, e.g. --set dpo.beta=0.05")
    key, raw = item.split("=", 1)
    if not key.strip():
        raise RecipeError(f"--set '{item}': the key path is empty")
    try:
        value = yaml.load(raw, Loader=_Loader) if raw.strip() else ""
    except yaml.YAMLError as exc:
        raise RecipeError(f"--set '{item}': the value is not valid YAML ({exc})") from None
    return key.strip().split("."), value


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    for item in overrides:
        path, value = parse_override(item)
        node = data
        for part in path[:-1]:
            child = node.get(part)
            if child is None:
                child = node[part] = {}
            if not isinstance(child, dict):
                raise RecipeError(f"--set '{item}': '{part}' is not a section")
            node = child
        node[path[-1]] = value
    return data


def _format_validation(exc: ValidationError, origin: str) -> str:
    lines = [f"{origin}: invalid recipe ({exc.error_count()} problem{'s' if exc.error_count() > 1 else ''})"]
    for err in exc.errors():
        loc = ".".join(str(p) for p in err["loc"]) or "(top level)"
        msg = err["msg"].removeprefix("Value error, ")
        if err["type"] == "extra_forbidden":
            msg = "unknown key"
        elif err["type"].endswith("_type") or err["type"].endswith("_parsing"):
            msg = f"{msg}, got {err.get('input')!r}"
        lines.append(f"  {loc}: {msg}" if err["loc"] else f"  {msg}")  # a cross-key check names its keys
    return "\n".join(lines)


def recipe_from_dict(data: Any, origin: str = "<recipe>", base_dir: Path | None = None) -> Recipe:
    """Validate recipe data (a parsed file or a run's snapshot); an empty recipe is an error."""
    if not data:
        raise RecipeError(f"{origin}: the recipe is empty; start from configs/quickstart.yaml")
    if not isinstance(data, dict):
        raise RecipeError(f"{origin}: expected a mapping of sections at the top level, got {type(data).__name__}")
    try:
        return Recipe.model_validate(data, context={"base_dir": base_dir})
    except ValidationError as exc:
        raise RecipeError(_format_validation(exc, origin)) from None


def load_recipe_text(text: str, origin: str, overrides: list[str] | None = None,
                     base_dir: Path | None = None) -> Recipe:
    """Parse, override and validate recipe YAML held in memory (the Prefect form's inline recipe)."""
    data = parse_yaml(text, origin)
    if isinstance(data, dict) and overrides:
        data = apply_overrides(data, overrides)
    return recipe_from_dict(data, origin=origin, base_dir=base_dir)


def load_recipe(path: str | Path, overrides: list[str] | None = None) -> Recipe:
    """Read, override and validate a recipe file; every error names the file and the key path."""
    path = Path(path)
    if not path.is_file():
        raise RecipeError(f"{path}: recipe file not found")
    return load_recipe_text(path.read_text(encoding="utf-8"), str(path), overrides, path.parent.resolve())
