"""The run store: one directory per run (local path or fsspec URL), manifest, shards, failure ledger."""

from __future__ import annotations

import io
import json
import os
import re
import time
import uuid
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import fsspec
import pyarrow as pa
import pyarrow.parquet as pq
from fsspec.implementations.local import LocalFileSystem

from pipeline.core.idset import IdSet
from pipeline.core.ledger import Failure, FailureLedger

__all__ = ["COMMIT_MARKERS", "Failure", "FailureLedger", "RunStore", "ShardWriter", "StageState", "StoreError"]


class StoreError(RuntimeError):
    """The run directory is not in a usable state."""


@dataclass
class StageState:
    fingerprint: str | None = None
    status: str = "pending"
    counts: dict[str, int] = field(default_factory=dict)
    cost: dict[str, float] = field(default_factory=dict)
    started_at: float | None = None
    finished_at: float | None = None
    seconds: float = 0.0
    message: str = ""
    outputs: dict[str, str] = field(default_factory=dict)


class RunStore:
    """`<root>/<run_name>/`: the only channel through which stages hand data to each other."""

    round = 1  # the on-policy round a view of the store is for (pipeline.core.rounds); the run itself is round 1

    def __init__(self, root: str | os.PathLike[str], run_name: str, create: bool = True):
        if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*", run_name):
            raise StoreError(f"run name '{run_name}': use letters, digits, '.', '_' and '-' only")
        self.root = str(root)
        self.run_name = run_name
        self.fs, base = fsspec.core.url_to_fs(self.root)
        self.is_local = isinstance(self.fs, LocalFileSystem)
        if self.is_local:
            base = str(Path(base).resolve())
        self.path = f"{base.rstrip('/')}/{run_name}"
        if create:
            self.fs.makedirs(self.path, exist_ok=True)

    @classmethod
    def open_existing(cls, run_dir: str) -> RunStore:
        """Open a run from its directory (path or URL); it must hold a manifest."""
        parent, _, name = str(run_dir).rstrip("/").rpartition("/")
        store = cls(parent or ".", name, create=False)
        if not store.fs.exists(store.join("manifest.json")):
            raise StoreError(f"{run_dir}: no manifest.json here; is this a run directory?")
        return store

    def join(self, *parts: str) -> str:
        return "/".join([self.path, *parts])

    @property
    def url(self) -> str:
        """The run directory as a string a user (or a worker) can open."""
        return self.path if self.is_local else self.fs.unstrip_protocol(self.path)

    def stage_dir(self, stage: str) -> str:
        path = self.join(stage)
        self.fs.makedirs(path, exist_ok=True)
        return path

    # -- atomic writes ---------------------------------------------------------------------------
    def write_bytes(self, path: str, data: bytes) -> None:
        """Write a whole file atomically: readers see the old file or the new one, never a part."""
        parent = path.rsplit("/", 1)[0]
        self.fs.makedirs(parent, exist_ok=True)
        if self.is_local:
            tmp = f"{parent}/.tmp-{uuid.uuid4().hex}-{path.rsplit('/', 1)[1]}"
            with open(tmp, "wb") as fh:
                fh.write(data)
                fh.flush()
                os.fsync(fh.fileno())
            os.replace(tmp, path)
        else:
            self.fs.pipe_file(path, data)  # object stores publish a put whole or not at all

    def write_json(self, path: str, obj: Any) -> None:
        self.write_bytes(path, json.dumps(obj, indent=2, sort_keys=True, default=str).encode())

    def read_bytes(self, path: str) -> bytes | None:
        """A whole file in one read (one GET on an object store, so a writer replacing it meanwhile gives the
        old or the new object, never an error); None when it does not exist."""
        try:
            return self.fs.cat_file(path)
        except FileNotFoundError:
            return None

    def read_json(self, path: str, default: Any = None) -> Any:
        raw = self.read_bytes(path)
        return default if raw is None else json.loads(raw)

    # -- manifest --------------------------------------------------------------------------------
    @property
    def manifest_path(self) -> str:
        return self.join("manifest.json")

    def read_manifest(self) -> dict[str, Any]:
        try:
            return self.read_json(self.manifest_path, default={}) or {}
        except json.JSONDecodeError as exc:
            raise StoreError(f"{self.manifest_path}: manifest is not valid JSON ({exc})") from None

    def write_manifest(self, manifest: dict[str, Any]) -> None:
        self.write_json(self.manifest_path, manifest)

    def init_manifest(self, recipe_snapshot: dict[str, Any], versions: dict[str, str],
                      stages: list[str] | None = None) -> None:
        """Record the recipe, the versions and the run's stages in order (`stage_names`)."""
        manifest = self.read_manifest()
        manifest.update({"run_name": self.run_name, "recipe": recipe_snapshot, "versions": versions})
        if stages is not None:
            manifest["plan"] = stages
        manifest.setdefault("created_at", time.time())
        manifest.setdefault("stages", {})
        self.write_manifest(manifest)

    def stage_names(self) -> list[str]:
        """The run's stages in order: as the runner planned them, else as they were recorded."""
        manifest = self.read_manifest()
        return list(manifest.get("plan") or manifest.get("stages", {}))

    def state_key(self, stage: str) -> str:
        """The stage's entry in the manifest (a round's view adds its round)."""
        return stage

    def policy(self) -> tuple[RunStore, str]:
        """Where the model that answers as the policy lives, as (store, stage): this run's SFT model in round 1."""
        return self, "sft"

    def stage_state(self, stage: str) -> StageState:
        raw = self.read_manifest().get("stages", {}).get(self.state_key(stage))
        return StageState(**raw) if raw else StageState()

    def set_stage_state(self, stage: str, state: StageState) -> None:
        manifest = self.read_manifest()
        manifest.setdefault("stages", {})[self.state_key(stage)] = asdict(state)
        self.write_manifest(manifest)

    def reset_stage(self, stage: str) -> None:
        """Remove a stage's outputs (its inputs or settings changed); the response cache stays."""
        path = self.join(stage)
        if self.fs.exists(path):
            self.fs.rm(path, recursive=True)
        self.set_stage_state(stage, StageState())

    # -- records ---------------------------------------------------------------------------------
    def shard_writer(self, stage: str, name: str = "data", shard_size: int = 1000,
                     id_key: str = "prompt_id", schema: pa.Schema | None = None) -> ShardWriter:
        """A writer of `<stage>/<name>-NNNNN.parquet`; with a `schema` every shard has exactly those columns and types."""
        return ShardWriter(self, self.stage_dir(stage), name, shard_size, id_key, schema)

    def shard_paths(self, stage: str, name: str = "data") -> list[str]:
        return _list_shards(self.fs, self.join(stage), name)

    def read_records(self, stage: str, name: str = "data",
                     columns: list[str] | None = None) -> Iterator[dict[str, Any]]:
        """Stream the records (or only `columns` of them) of a stage's complete shards, shard by shard."""
        for path in self.shard_paths(stage, name):
            with self.fs.open(path, "rb") as fh:
                table = pq.read_table(fh, columns=columns)
            yield from table.to_pylist()

    def count_records(self, stage: str, name: str = "data") -> int:
        total = 0
        for path in self.shard_paths(stage, name):
            with self.fs.open(path, "rb") as fh:
                total += pq.ParquetFile(fh).metadata.num_rows
        return total

    # -- directories (models, checkpoints) --------------------------------------------------------
    def upload_dir(self, local: str | os.PathLike[str], *parts: str) -> None:
        """Copy a local directory into the run, its completion markers last.

        An object store has no rename, so a directory is committed by the files its readers look for:
        `config.json` (a model is whole: local_model) and `trainer_state.json` (a checkpoint is whole:
        last_checkpoint) go up after every other file. A kill mid-upload leaves a directory without its
        marker, which readers treat as absent; each single file is one PUT, visible whole or not at all.
        """
        local = Path(local)
        files = sorted((p for p in local.rglob("*") if p.is_file()),
                       key=lambda p: (p.name in COMMIT_MARKERS, str(p)))
        for path in files:
            target = self.join(*parts, *path.relative_to(local).parts)
            if self.is_local:
                self.write_bytes(target, path.read_bytes())
            else:
                self.fs.put_file(str(path), target)

    def download_dir(self, local: str | os.PathLike[str], *parts: str) -> bool:
        """Copy `<run>/<parts>` to a local directory; False when there is nothing there."""
        remote = self.join(*parts)
        if not self.fs.exists(remote):
            return False
        self.fs.get(remote.rstrip("/") + "/", str(local).rstrip("/") + "/", recursive=True)
        return True

    def ledger(self, stage: str, name: str = "failures") -> FailureLedger:
        """`failures.jsonl` (items that did not make it) or another ledger such as `dropped.jsonl`."""
        return FailureLedger(self, stage, name)


_SHARD_RE = r"{name}-(\d{{5}})\.parquet"
# what says "this model / checkpoint / built student is whole" (readers look for them)
COMMIT_MARKERS = ("config.json", "trainer_state.json", "student.json")


def _list_shards(fs: fsspec.AbstractFileSystem, directory: str, name: str) -> list[str]:
    if not fs.exists(directory):
        return []
    pattern = re.compile(_SHARD_RE.format(name=re.escape(name)))
    found = []
    for entry in fs.ls(directory, detail=False):
        base = entry.rstrip("/").rsplit("/", 1)[-1]
        if pattern.fullmatch(base):
            found.append(entry)
    return sorted(found)


class ShardWriter:
    """Buffers records and publishes them as numbered parquet shards, each written atomically.

    A killed process loses only its unpublished buffer; `done_ids` tells a rerun what is finished. With a
    schema every shard carries the same types, so a column that is all null in one shard (an aspect rated N/A
    throughout) is not typed `null` there and `double` in the next, which readers such as `datasets` reject.
    """

    def __init__(self, store: RunStore, directory: str, name: str, shard_size: int, id_key: str,
                 schema: pa.Schema | None = None):
        self.store, self.directory, self.name = store, directory, name
        self.shard_size, self.id_key, self.schema = shard_size, id_key, schema
        self._buffer: list[dict[str, Any]] = []
        existing = _list_shards(store.fs, directory, name)
        self._next_index = (int(re.search(r"(\d{5})\.parquet$", existing[-1]).group(1)) + 1) if existing else 0

    def done_ids(self) -> set[str]:
        ids: set[str] = set()
        for values in self._id_columns():
            ids.update(values)
        return ids

    def done_set(self) -> IdSet:
        """The ids in the published shards as a compact `IdSet` (16 bytes an id: for a rerun of many items)."""
        ids = IdSet()
        for values in self._id_columns():
            ids.update(values)
        return ids

    def _id_columns(self) -> Iterator[list[str]]:
        for path in _list_shards(self.store.fs, self.directory, self.name):
            with self.store.fs.open(path, "rb") as fh:
                yield pq.read_table(fh, columns=[self.id_key]).column(self.id_key).to_pylist()

    def add(self, record: dict[str, Any], flush: bool = True) -> None:
        """Buffer a record; a full buffer is published as a shard (unless the caller does that itself)."""
        self._check(record)
        self._buffer.append(record)
        if flush and self.full:
            self.flush()

    @property
    def full(self) -> bool:
        return len(self._buffer) >= self.shard_size

    def extend(self, records: Iterable[dict[str, Any]]) -> None:
        for record in records:
            self.add(record)

    def flush(self) -> str | None:
        if not self._buffer:
            return None
        records, self._buffer = self._buffer, []
        path = f"{self.directory}/{self.name}-{self._next_index:05d}.parquet"
        self._next_index += 1
        sink = io.BytesIO()
        pq.write_table(self._table(records), sink)
        self.store.write_bytes(path, sink.getvalue())
        return path

    def _table(self, records: list[dict[str, Any]]) -> pa.Table:
        return pa.Table.from_pylist(records, schema=self.schema)

    def _check(self, record: dict[str, Any]) -> None:
        unknown = sorted(set(record) - set(self.schema.names)) if self.schema is not None else []
        if unknown:  # from_pylist would drop them without a word
            raise StoreError(f"{self.directory}/{self.name}: a record holds columns {unknown} that the stage's "
                             "schema does not declare; add them to the schema")

    def close(self) -> None:
        self.flush()

    def __enter__(self) -> ShardWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        # Publish what is finished even when the stage stops on an error (budget cap, Ctrl-C).
        self.flush()
