"""Recurring runs: a series ingests only prompts no earlier run of it used, and records what each produced."""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field
from typing import Any

from pipeline.core.recipe import Recipe, SeriesConfig
from pipeline.core.rounds import final_model
from pipeline.core.sources import iter_prompts
from pipeline.core.store import RunStore


class NothingNew(RuntimeError):
    """Every prompt of the source was used by an earlier run of the series."""


@dataclass
class SeriesEntry:
    run_name: str
    run_dir: str
    created_at: float
    new_prompts: int
    status: str = "running"
    model: str | None = None
    datasets: dict[str, str] = field(default_factory=dict)
    promotion: dict[str, Any] = field(default_factory=dict)
    data: str = "accumulate"  # series.data of this run
    trained_on: list[str] = field(default_factory=list)  # earlier runs whose data this run trained on too
    warm_start_from: str | None = None


class Series:
    """`<storage.root>/series/<name>/series.json` plus one prompt-id file per run."""

    def __init__(self, recipe: Recipe, name: str):
        self.name = name
        self.store = RunStore(recipe.storage.root, "series")
        self.path = self.store.join(name)
        self.store.fs.makedirs(self.path, exist_ok=True)

    @property
    def index_path(self) -> str:
        return f"{self.path}/series.json"

    def entries(self) -> list[SeriesEntry]:
        raw = self.store.read_json(self.index_path, default={"runs": []})
        return [SeriesEntry(**e) for e in raw["runs"]]

    def _save(self, entries: list[SeriesEntry], current_model: str | None) -> None:
        self.store.write_json(self.index_path, {"series": self.name, "current_model": current_model,
                                                "runs": [asdict(e) for e in entries]})

    @property
    def current_model(self) -> str | None:
        return self.store.read_json(self.index_path, default={}).get("current_model")

    def seen_ids(self) -> set[str]:
        """Prompt ids used by the completed runs of this series."""
        seen: set[str] = set()
        for e in self.entries():
            if e.status == "completed":
                with self.store.fs.open(f"{self.path}/{e.run_name}.prompt_ids.json", "rb") as fh:
                    seen.update(json.loads(fh.read()))
        return seen

    def prepare_run(self, recipe: Recipe, run_store: RunStore) -> Recipe:
        """Write this run's new prompts into the run directory and point the recipe at them; with
        `series.data: accumulate` its sft and dpo also train on the earlier completed runs' data, and with
        `series.warm_start` sft starts from the series' current model."""
        seen = self.seen_ids()
        fresh = [p for p in iter_prompts(recipe.prompts, recipe.task) if p.prompt_id not in seen]
        if not fresh:
            raise NothingNew(f"series '{self.name}': no prompt in {recipe.prompts.source} is new "
                             f"({len(seen)} used by earlier runs)")
        path = run_store.join("inputs", "prompts.jsonl")
        run_store.write_bytes(path, "".join(json.dumps({"prompt": p.prompt}) + "\n" for p in fresh).encode())
        self.store.write_json(f"{self.path}/{run_store.run_name}.prompt_ids.json", [p.prompt_id for p in fresh])
        entries = [e for e in self.entries() if e.run_name != run_store.run_name]
        update = {"prompts": recipe.prompts.model_copy(update={"source": path, "limit": None}),
                  "series": self._training_data(recipe, entries)}
        current = self.current_model
        if recipe.series.warm_start and current:
            update["sft"] = recipe.sft.model_copy(update={"model": current})
        entries.append(SeriesEntry(run_store.run_name, run_store.url, time.time(), len(fresh), data=recipe.series.data,
                                   trained_on=list(update["series"].previous_runs),
                                   warm_start_from=current if "sft" in update else None))
        self._save(entries, current)
        return recipe.model_copy(update=update)

    @staticmethod
    def _training_data(recipe: Recipe, entries: list[SeriesEntry]) -> SeriesConfig:
        """series.previous_runs: the recipe's own, plus every completed earlier run when accumulating."""
        runs = list(recipe.series.previous_runs)
        if recipe.series.data == "accumulate":
            runs += [e.run_dir for e in entries if e.status == "completed" and e.run_dir not in runs]
        return recipe.series.model_copy(update={"previous_runs": runs})

    def record(self, run_store: RunStore, status: str, promotion: dict[str, Any] | None = None) -> SeriesEntry:
        """Mark a run finished; its datasets join the series, and its model becomes current if promoted."""
        entries = self.entries()
        entry = next(e for e in entries if e.run_name == run_store.run_name)
        entry.status = status
        states = run_store.read_manifest().get("stages", {})
        entry.datasets = {name: run_store.join(name) for name in ("generate", "feedback")
                          if states.get(name, {}).get("status") == "completed"}
        for stage in ("dpo", "sft"):
            if states.get(stage, {}).get("status") == "completed":
                entry.model = final_model(run_store) if stage == "dpo" else run_store.join(stage, "model")
                break
        entry.promotion = promotion or {}
        current = self.current_model
        if status == "completed" and entry.model and (promotion or {}).get("promote", current is None):
            current = entry.model
        self._save(entries, current)
        return entry
