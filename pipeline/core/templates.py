"""Prompt templates: Jinja files shipped in the `pipeline.prompts` package (prompts/ in the tree), one per prompt."""

from __future__ import annotations

import fnmatch
import hashlib
from functools import cache
from importlib import resources

import jinja2

_ENV = jinja2.Environment(undefined=jinja2.StrictUndefined, keep_trailing_newline=False,
                          trim_blocks=True, lstrip_blocks=True)


def _folder() -> resources.abc.Traversable:
    return resources.files("pipeline.prompts")


def template_names() -> list[str]:
    return sorted(p.name for p in _folder().iterdir() if p.name.endswith(".jinja"))


@cache
def _source(name: str) -> str:
    path = _folder() / name
    if not path.is_file():
        raise FileNotFoundError(f"prompt template '{name}' is not in the prompts package "
                                f"(have: {', '.join(template_names())})")
    return path.read_text(encoding="utf-8")


@cache
def _compiled(name: str) -> jinja2.Template:
    return _ENV.from_string(_source(name))


def render(name: str, **variables: object) -> str:
    """Render `prompts/<name>` with the given variables (a missing variable is an error)."""
    return _compiled(name).render(**variables).strip()


def templates_hash(patterns: tuple[str, ...]) -> str:
    """One hash over every template whose file name matches one of the glob patterns."""
    digest = hashlib.sha256()
    for name in template_names():
        if any(fnmatch.fnmatch(name, pat) for pat in patterns):
            digest.update(name.encode() + b"\0" + _source(name).encode() + b"\0")
    return digest.hexdigest()
