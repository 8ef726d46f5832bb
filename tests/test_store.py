"""Run store: atomic shards and manifest under SIGKILL, fsspec URLs, the failure ledger."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import datasets
import pyarrow.parquet as pq
import pytest

from pipeline.core.store import RunStore, StoreError

WRITER = textwrap.dedent("""
    import sys
    from pipeline.core.store import RunStore
    store = RunStore(sys.argv[1], "run")
    w = store.shard_writer("generate", shard_size=2000)
    i = 0
    print("ready", flush=True)
    while True:  # big rows so that a shard takes a while to write
        w.add({"prompt_id": f"id-{i}", "text": "x" * 2000, "n": i})
        i += 1
""")

MANIFEST_WRITER = textwrap.dedent("""
    import sys
    from pipeline.core.store import RunStore
    store = RunStore(sys.argv[1], "run")
    store.init_manifest({"recipe": "r" * 50000}, {"v": "1"})
    print("ready", flush=True)
    i = 0
    while True:
        m = store.read_manifest()
        m["counter"] = i
        m["padding"] = ["y" * 100] * (i % 500)
        store.write_manifest(m)
        i += 1
""")


def _start_and_kill(script: str, root: Path, after_s: float) -> None:
    proc = subprocess.Popen([sys.executable, "-c", script, str(root)], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "ready"
    time.sleep(after_s)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)


@pytest.mark.parametrize("after_s", [0.7, 1.3, 2.1])
def test_killed_shard_write_leaves_no_partial_shard(tmp_path: Path, after_s: float):
    _start_and_kill(WRITER, tmp_path, after_s)
    store = RunStore(tmp_path, "run")
    shards = store.shard_paths("generate")
    assert shards, "the writer should have published at least one shard"
    for path in shards:  # every visible shard is whole
        assert pq.ParquetFile(path).metadata.num_rows == 2000
    ds = datasets.load_dataset("parquet", data_files=str(tmp_path / "run/generate/data-*.parquet"), split="train")
    assert len(ds) == 2000 * len(shards)
    assert len(set(ds["prompt_id"])) == len(ds)
    # a rerun continues numbering after the last whole shard and knows what is done
    w = store.shard_writer("generate", shard_size=2000)
    assert len(w.done_ids()) == len(ds)
    w.add({"prompt_id": "new", "text": "y", "n": -1})
    assert w.flush().endswith(f"data-{len(shards):05d}.parquet")


def test_manifest_survives_a_crash_mid_write(tmp_path: Path):
    for after_s in (0.5, 1.1):
        _start_and_kill(MANIFEST_WRITER, tmp_path, after_s)
        manifest = json.loads((tmp_path / "run" / "manifest.json").read_text())
        assert manifest["counter"] >= 0 and manifest["recipe"]["recipe"].startswith("r")


@pytest.mark.parametrize("root", ["memory://bucket/runs", "file://{tmp}/runs"])
def test_store_works_on_fsspec_urls(tmp_path: Path, root: str):
    store = RunStore(root.format(tmp=tmp_path), "r1")
    store.init_manifest({"name": "x"}, {"v": "1"})
    with store.shard_writer("feedback", name="pairs", shard_size=3) as w:
        for i in range(7):
            w.add({"prompt_id": f"p{i}", "score": float(i)})
    assert len(store.shard_paths("feedback", "pairs")) == 3
    assert [r["prompt_id"] for r in store.read_records("feedback", "pairs")] == [f"p{i}" for i in range(7)]
    assert store.count_records("feedback", "pairs") == 7
    ledger = store.ledger("feedback")
    ledger.record("p9", "judge output unparseable", attempts=3)
    ledger.record("p8", "HTTP 500")
    assert set(ledger.latest()) == {"p8", "p9"}
    assert set(ledger.compact({"p8"})) == {"p9"}
    reopened = RunStore.open_existing(store.url)
    assert reopened.read_manifest()["recipe"] == {"name": "x"}


def test_ledger_ignores_a_line_cut_short_and_sums_attempts(tmp_path: Path):
    store = RunStore(tmp_path, "r")
    ledger = store.ledger("generate")
    ledger.record("a", "HTTP 429", attempts=7)
    ledger.record("a", "HTTP 500", attempts=7)
    with open(ledger.path, "a") as fh:
        fh.write('{"item_id": "b", "stage": "gen')  # a crash mid-append
    latest = ledger.latest()
    assert set(latest) == {"a"} and latest["a"].attempts == 14 and latest["a"].reason == "HTTP 500"


def test_bad_run_names_and_missing_runs_are_clear_errors(tmp_path: Path):
    with pytest.raises(StoreError, match="run name"):
        RunStore(tmp_path, "../escape")
    with pytest.raises(StoreError, match="no manifest.json"):
        RunStore.open_existing(str(tmp_path / "nothing-here"))
    assert not (tmp_path / "nothing-here").exists()  # looking does not create
