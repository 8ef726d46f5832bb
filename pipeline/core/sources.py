"""Prompt sources: JSONL, parquet, a local HF dataset directory, or the recipe's task; stable prompt ids."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from pipeline.core.idset import IdSet
from pipeline.core.recipe import PromptSource
from pipeline.core.task import load_task


class DataError(ValueError):
    """An input file or row that is not what the recipe promised; the message names file and row."""


def prompt_id(prompt: str) -> str:
    """sha256 hex of the prompt text, as in ultrachat_200k / ultrafeedback_binarized."""
    return hashlib.sha256(prompt.encode("utf-8")).hexdigest()


@dataclass(frozen=True)
class SeedPrompt:
    prompt: str
    prompt_id: str
    source: str = "seed"
    # lineage of a prompt grown by self-prompting: the seed it descends from, its parent, generations below it
    root_prompt_id: str | None = None
    parent_prompt_id: str | None = None
    depth: int = 0

    @property
    def root(self) -> str:
        return self.root_prompt_id or self.prompt_id


def _from_row(row: dict, column: str | None, where: str) -> str:
    cols = [column] if column else [c for c in ("prompt", "messages") if c in row]
    if not cols or cols[0] not in row:
        raise DataError(f"{where}: expected a '{column or 'prompt'}' or 'messages' column, found {sorted(row)}")
    value = row[cols[0]]
    if cols[0] == "messages":
        users = [m.get("content") for m in (value or []) if isinstance(m, dict) and m.get("role") == "user"]
        if not users or not isinstance(users[0], str):
            raise DataError(f"{where}: 'messages' has no user turn to take the prompt from")
        return users[0]
    if not isinstance(value, str):
        raise DataError(f"{where}: '{cols[0]}' should be a string, got {type(value).__name__}")
    return value


def _rows(path: Path) -> Iterator[tuple[dict, str]]:
    if path.is_dir():
        import datasets

        try:
            ds = datasets.load_from_disk(str(path))
        except FileNotFoundError:
            files = sorted(str(p) for p in path.rglob("*.parquet"))
            if not files:
                raise DataError(f"{path}: neither a saved HF dataset nor a folder of parquet files") from None
            ds = datasets.load_dataset("parquet", data_files=files, split="train")
        if isinstance(ds, datasets.DatasetDict):
            ds = ds[next(iter(ds))]
        for i, row in enumerate(ds):
            yield row, f"{path} row {i}"
    elif path.suffix == ".parquet":
        import pyarrow.parquet as pq

        i = 0
        for batch in pq.ParquetFile(path).iter_batches(batch_size=4096):  # a batch at a time, not the file
            for row in batch.to_pylist():
                yield row, f"{path} row {i}"
                i += 1
    elif path.suffix in (".jsonl", ".json"):
        with path.open(encoding="utf-8") as fh:
            for lineno, line in enumerate(fh, 1):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as exc:
                    raise DataError(f"{path} line {lineno}: not valid JSON ({exc.msg})") from None
                if not isinstance(row, dict):
                    raise DataError(f"{path} line {lineno}: expected a JSON object, got {type(row).__name__}")
                yield row, f"{path} line {lineno}"
    else:
        raise DataError(f"{path}: unsupported prompts format (use .jsonl, .parquet or a dataset directory)")


def iter_prompts(src: PromptSource, task: str | None = None) -> Iterator[SeedPrompt]:
    """Stream prompts from the source (a file, or the task named `task`), in order, each with its sha256 id."""
    if src.from_task:
        if task is None:
            raise DataError("prompts.source is 'task' but the recipe names no task")
        plugin = load_task(task)
        texts: Iterator[tuple[str, str]] = ((p, plugin.name) for p in plugin.prompts(src.count, src.seed))
    else:
        path = Path(src.source)
        texts = ((_from_row(row, src.column, where), path.name) for row, where in _rows(path))
    for index, (text, origin) in enumerate(texts):
        if index < src.skip:
            continue
        if src.limit is not None and index - src.skip >= src.limit:
            return
        text = text.strip()
        yield SeedPrompt(text, prompt_id(text), origin)


def iter_unique_prompts(src: PromptSource, task: str | None = None) -> Iterator[SeedPrompt]:
    """The source's non-empty prompts, each once (by prompt id), in order, as a stream (16 bytes an id held)."""
    seen = IdSet()
    for p in iter_prompts(src, task):
        if p.prompt and seen.add_new(p.prompt_id):
            yield p


def unique_prompts(src: PromptSource, task: str | None = None) -> list[SeedPrompt]:
    """The source's non-empty prompts, each once (by prompt id), in order."""
    return list(iter_unique_prompts(src, task))
