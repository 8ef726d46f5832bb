"""Evaluation sets in the field's formats, read one way for evaluation and for decontamination.

Accepted rows (JSONL, a JSON array, parquet, or a local Hugging Face dataset directory):
`turns` (MT-Bench question.jsonl: question_id, category, turns, reference per turn), `instruction`
(AlpacaEval: instruction, optional output/generator/dataset), `prompt`, or `messages` (every user turn).
A row's own answers (AlpacaEval's `output`, the assistant turns of `messages`) are its `outputs`: a baseline
to compare models with, as AlpacaEval compares every model with its reference outputs.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any

SHAPES = ("'turns' (MT-Bench question.jsonl)", "'instruction' (AlpacaEval)", "'prompt'", "'messages' (chat)")
_ID_KEYS = ("question_id", "id", "prompt_id")


class EvalSetError(ValueError):
    """An evaluation file or row of an unknown shape; the message names the file, the row and the shapes."""


@dataclass(frozen=True)
class EvalRow:
    """One evaluation item as read: its user turns, a reference answer per turn (or None), the rest."""

    item_id: str
    category: str
    turns: tuple[str, ...]
    references: tuple[str | None, ...]
    where: str  # file and line (or row), for messages
    fields: dict[str, Any] = field(default_factory=dict, compare=False)
    outputs: tuple[str, ...] | None = None  # an answer for every turn shipped with the row, else None


def default_id(turns: list[str] | tuple[str, ...]) -> str:
    """sha256 of the prompt (as prompt_id everywhere), of the turns' JSON for a multi-turn item."""
    text = turns[0] if len(turns) == 1 else json.dumps(list(turns))
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def parse_row(row: Any, where: str) -> EvalRow:
    """One row of any accepted shape; anything else is an error naming `where` and the shapes."""
    if not isinstance(row, dict):
        raise EvalSetError(f"{where}: expected an object with one of {', '.join(SHAPES)}; got {type(row).__name__}")
    turns, references = _turns(row, where)
    if not turns or not all(isinstance(t, str) and t.strip() for t in turns):
        raise EvalSetError(f"{where}: the user turns must be non-empty strings")
    turns = [t.strip() for t in turns]
    item_id = next((str(row[k]) for k in _ID_KEYS if row.get(k) is not None), None) or default_id(turns)
    category = str(row.get("category") or row.get("dataset") or "general")
    used = {"turns", "instruction", "prompt", "messages", "reference", "category", *_ID_KEYS}
    extra = {k: v for k, v in row.items() if k not in used}
    return EvalRow(item_id, category, tuple(turns), tuple(references), where, extra, _outputs(row, len(turns)))


def _outputs(row: dict[str, Any], n: int) -> tuple[str, ...] | None:
    """The answers a row ships for all its turns: AlpacaEval's `output`, or the assistant turns of `messages`."""
    if "turns" not in row and "instruction" in row and isinstance(row.get("output"), str) and row["output"].strip():
        return (row["output"],)
    if "messages" in row and isinstance(row["messages"], list) and not any(k in row for k in ("turns", "instruction",
                                                                                              "prompt")):
        answers = [m.get("content") for m in row["messages"] if isinstance(m, dict) and m.get("role") == "assistant"]
        if len(answers) >= n and all(isinstance(a, str) and a.strip() for a in answers[:n]):
            return tuple(answers[:n])
    return None


def _turns(row: dict[str, Any], where: str) -> tuple[list[str], list[str | None]]:
    if "turns" in row:
        turns = row["turns"]
        if not isinstance(turns, list):
            raise EvalSetError(f"{where}: 'turns' should be a list of user turns")
        return turns, _references(row.get("reference"), len(turns), where)
    if "instruction" in row:
        text = row["instruction"] + (f"\n\n{row['input']}" if row.get("input") else "")
        return [text], [row.get("reference")]
    if "prompt" in row:
        return [row["prompt"]], [row.get("reference")]
    if "messages" in row:
        messages = row["messages"] if isinstance(row["messages"], list) else []
        users = [m.get("content") for m in messages if isinstance(m, dict) and m.get("role") == "user"]
        answers = [m.get("content") for m in messages if isinstance(m, dict) and m.get("role") == "assistant"]
        return users, [answers[i] if i < len(answers) else None for i in range(len(users))]
    raise EvalSetError(f"{where}: expected one of {', '.join(SHAPES)}; found keys {sorted(row)}")


def _references(value: Any, n: int, where: str) -> list[str | None]:
    """MT-Bench gives one reference per turn (a list); a single string is the first turn's."""
    if value is None:
        return [None] * n
    if isinstance(value, str):
        return [value] + [None] * (n - 1)
    if isinstance(value, list) and all(v is None or isinstance(v, str) for v in value):
        return [*value[:n], *[None] * (n - len(value))]
    raise EvalSetError(f"{where}: 'reference' should be a string or a list of strings, one per turn")


def raw_rows(path: str | Path) -> Iterator[tuple[Any, str]]:
    """(row, where) of a JSONL file, a JSON array, parquet, or a local HF dataset directory."""
    if "://" in str(path):  # a remote file (s3://...): JSON or JSONL through fsspec
        yield from _json_rows(str(path))
        return
    p = Path(path)
    if p.is_dir():
        yield from _dataset_rows(p)
    elif p.suffix == ".parquet":
        import pyarrow.parquet as pq

        for i, row in enumerate(pq.read_table(p).to_pylist()):
            yield row, f"{p} row {i}"
    elif p.suffix in (".jsonl", ".json"):
        yield from _json_rows(p)
    else:
        raise EvalSetError(f"{p}: unsupported evaluation file (use .jsonl, .json, .parquet or a dataset directory)")


def _json_rows(p: Path | str) -> Iterator[tuple[Any, str]]:
    import fsspec

    with fsspec.open(str(p), "r", encoding="utf-8") as fh:
        text = fh.read()
    if text.lstrip().startswith("["):  # AlpacaEval ships a JSON array
        try:
            rows = json.loads(text)
        except json.JSONDecodeError as exc:
            raise EvalSetError(f"{p} line {exc.lineno}: not valid JSON ({exc.msg})") from None
        yield from ((row, f"{p} item {i}") for i, row in enumerate(rows))
        return
    for lineno, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            yield json.loads(line), f"{p} line {lineno}"
        except json.JSONDecodeError as exc:
            raise EvalSetError(f"{p} line {lineno}: not valid JSON ({exc.msg})") from None


def _dataset_rows(p: Path) -> Iterator[tuple[Any, str]]:
    import datasets

    try:
        ds = datasets.load_from_disk(str(p))
    except FileNotFoundError:
        files = sorted(str(f) for f in p.rglob("*.parquet"))
        if not files:
            raise EvalSetError(f"{p}: neither a saved HF dataset nor a folder of parquet files") from None
        ds = datasets.load_dataset("parquet", data_files=files, split="train")
    if isinstance(ds, datasets.DatasetDict):
        ds = ds[next(iter(ds))]
    yield from ((row, f"{p} row {i}") for i, row in enumerate(ds))


def read_eval_rows(path: str | Path) -> list[EvalRow]:
    """Every item of an evaluation file; a duplicate id or an empty file is an error."""
    rows = [parse_row(row, where) for row, where in raw_rows(path)]
    seen: dict[str, str] = {}
    for row in rows:
        if row.item_id in seen:
            raise EvalSetError(f"{row.where}: id '{row.item_id}' appears twice (first at {seen[row.item_id]})")
        seen[row.item_id] = row.where
    if not rows:
        raise EvalSetError(f"{path}: no evaluation items in it")
    return rows


def cached_eval_rows(path: str) -> tuple[EvalRow, ...]:
    """`read_eval_rows`, parsed once per process while a local file is unchanged (recipe validation and the
    stages that decontaminate all read the same files)."""
    if "://" in str(path):
        return tuple(read_eval_rows(path))
    st = Path(path).stat()
    return _rows_of(str(path), st.st_size, st.st_mtime_ns)


@lru_cache(maxsize=32)
def _rows_of(path: str, size: int, mtime_ns: int) -> tuple[EvalRow, ...]:
    return tuple(read_eval_rows(path))
