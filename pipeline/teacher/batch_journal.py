"""The batch journal: `batches/<endpoint>/<submission>.json` in the run directory, one file per batch sent.

An entry is written before its batch is created (with the id of its uploaded input and the key the batch
carries in its metadata, so a batch whose creation a kill interrupted can be found again), and again with
the batch id before the batch is first polled. A rerun reads the entries not yet consumed and polls those
batches instead of sending their requests again.
"""

from __future__ import annotations

import logging
import time
import uuid
from typing import Any

from pipeline.core.store import RunStore

log = logging.getLogger(__name__)


class BatchJournal:
    """The batches of one endpoint of a run (any stage, any model)."""

    def __init__(self, store: RunStore, endpoint: str):
        self.store, self.endpoint = store, endpoint
        self.folder = store.join("batches", endpoint)

    def new_entry(self, stage: str, model: str, input_file_id: str, lines: dict[str, str]) -> dict[str, Any]:
        """An entry for a batch about to be created: `lines` maps each custom id to the role that asked it."""
        return {"submission": uuid.uuid4().hex, "endpoint": self.endpoint, "stage": stage, "model": model,
                "input_file_id": input_file_id, "batch_id": None, "status": "submitting", "created_at": time.time(),
                "consumed": False, "request_counts": {}, "requests": len(lines), "lines": lines}

    def write(self, entry: dict[str, Any]) -> None:
        self.store.write_json(f"{self.folder}/{entry['submission']}.json", entry)

    def open_entries(self, model: str) -> list[dict[str, Any]]:
        """Entries of `model` whose results have not been taken in yet, oldest first."""
        fs = self.store.fs
        if not fs.exists(self.folder):
            return []
        entries = []
        for path in fs.ls(self.folder, detail=False):
            if not str(path).endswith(".json") or str(path).rsplit("/", 1)[-1].startswith(".tmp-"):
                continue
            entry = self.store.read_json(str(path), default=None)
            if entry and not entry.get("consumed") and entry.get("model") == model:
                entries.append(entry)
        return sorted(entries, key=lambda e: e["created_at"])

    def summary(self) -> list[dict[str, Any]]:
        """Every batch of this endpoint without its line list (for `distill status --json`)."""
        fs = self.store.fs
        if not fs.exists(self.folder):
            return []
        out = []
        for path in sorted(fs.ls(self.folder, detail=False)):
            if str(path).endswith(".json") and not str(path).rsplit("/", 1)[-1].startswith(".tmp-"):
                entry = self.store.read_json(str(path), default=None) or {}
                requests = entry.get("requests", len(entry.get("lines", {})))
                out.append({k: v for k, v in entry.items() if k != "lines"} | {"requests": requests})
        return out
