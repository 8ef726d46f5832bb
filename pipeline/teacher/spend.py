"""What a run has paid, read back from its spend ledger and batch journal (for `distill status` and reports)."""

from __future__ import annotations

from typing import Any

from pipeline.core.store import RunStore
from pipeline.teacher.batch_journal import BatchJournal
from pipeline.teacher.cache import cache_path_for, open_cache
from pipeline.teacher.ledger import SpendLedger


def spend_summary(store: RunStore) -> dict[str, Any]:
    """Per stage (and endpoint within it) and per endpoint: requests, batch requests, tokens, dollars, cache
    hits; the caps the run's recipe sets; the batches sent. Empty numbers when nothing was paid yet."""
    recipe = store.read_manifest().get("recipe") or {}
    cache_dir = (recipe.get("storage") or {}).get("cache_dir")
    path = cache_path_for(store, cache_dir)
    if not store.is_local:  # bring this worker's copy up to date with what other workers paid for
        open_cache(store, cache_dir).close()
    if path.exists():
        ledger = SpendLedger.open(path)
        try:
            summary = ledger.summary()
        finally:
            ledger.close()
    else:
        summary = {"stages": {}, "endpoints": {}, "total": SpendLedger.empty_totals()}
    for stage in store.stage_names():
        summary["stages"].setdefault(stage, {**SpendLedger.empty_totals(), "endpoints": {}})
    caps = {"teacher": (recipe.get("teacher") or {}).get("max_cost_usd")}
    caps.update({name: (cfg or {}).get("max_cost_usd") for name, cfg in (recipe.get("endpoints") or {}).items()})
    for name, cap in caps.items():
        if cap is not None:
            summary["endpoints"].setdefault(name, SpendLedger.empty_totals())["max_cost_usd"] = cap
    summary["total_usd"] = summary["total"]["usd"]
    summary["budget"] = {"max_cost_usd": (recipe.get("budget") or {}).get("max_cost_usd")}
    summary["batches"] = batches(store)
    return summary


def batches(store: RunStore) -> list[dict[str, Any]]:
    """Every batch the run sent, oldest first, with its status and counts."""
    folder = store.join("batches")
    if not store.fs.exists(folder):
        return []
    found = []
    for path in store.fs.ls(folder, detail=False):
        name = str(path).rstrip("/").rsplit("/", 1)[-1]
        found += BatchJournal(store, name).summary()
    return sorted(found, key=lambda e: e.get("created_at", 0))
