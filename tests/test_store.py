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
    import os
    import sys
    from pipeline.core.store import RunStore
    store = RunStore(sys.argv[1], "run")
    w = store.shard_writer("generate", shard_size=2000)
    i = 0
    while True:  # incompressible rows, so that publishing a shard takes a while (a kill can land in it)
        w.add({"prompt_id": f"id-{i}", "text": os.urandom(1000).hex(), "n": i})
        i += 1
        if i % 2000 == 0:  # that add filled the buffer and published it
            print("published", flush=True)
""")

MANIFEST_WRITER = textwrap.dedent("""
    import sys
    from pipeline.core.store import RunStore
    store = RunStore(sys.argv[1], "run")
    store.init_manifest({"recipe": "r" * 50000}, {"v": "1"})
    i = 0
    while True:
        m = store.read_manifest()
        m["counter"] = i
        m["padding"] = ["y" * 100] * (i % 500)
        store.write_manifest(m)
        print("wrote", flush=True)
        i += 1
""")


def kill_mid_write(script: str, root: Path | str, writes: int, fraction: float) -> None:
    """SIGKILL the writer `fraction` of a write interval after its `writes`-th reported write: timed by its
    output, so a loaded machine delays the kill along with the writer."""
    proc = subprocess.Popen([sys.executable, "-c", script, str(root)], stdout=subprocess.PIPE, text=True)
    try:
        seen = []
        while len(seen) < writes:
            line = proc.stdout.readline()
            assert line, f"the writer stopped after {len(seen)} writes"
            seen.append(time.monotonic())
        interval = (seen[-1] - seen[0]) / max(1, writes - 1)
        time.sleep(fraction * interval)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)


@pytest.mark.parametrize("fraction", [0.5, 0.85, 0.9, 0.95])
def test_killed_shard_write_leaves_no_partial_shard(tmp_path: Path, fraction: float):
    kill_mid_write(WRITER, tmp_path, writes=3, fraction=fraction)
    store = RunStore(tmp_path, "run")
    shards = store.shard_paths("generate")
    assert len(shards) >= 3, "every shard the writer reported must be visible"
    for path in shards:  # every visible shard is whole
        assert pq.ParquetFile(path).metadata.num_rows == 2000
    ds = datasets.load_dataset("parquet", data_files=str(tmp_path / "run/generate/data-*.parquet"), split="train")
    assert ds["n"] == list(range(2000 * len(shards)))
    # a rerun continues numbering after the last whole shard and knows what is done
    w = store.shard_writer("generate", shard_size=2000)
    assert w.done_ids() == {f"id-{i}" for i in range(len(ds))}
    w.add({"prompt_id": "new", "text": "y", "n": -1})
    assert w.flush().endswith(f"data-{len(shards):05d}.parquet")


@pytest.mark.parametrize("fraction", [0.2, 0.5, 0.9])
def test_manifest_survives_a_crash_mid_write(tmp_path: Path, fraction: float):
    kill_mid_write(MANIFEST_WRITER, tmp_path, writes=20, fraction=fraction)
    manifest = json.loads((tmp_path / "run" / "manifest.json").read_text())
    # one whole version the writer wrote: its padding belongs to its counter, the recipe is intact
    assert manifest["counter"] >= 19
    assert len(manifest["padding"]) == manifest["counter"] % 500
    assert manifest["recipe"] == {"recipe": "r" * 50000}


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
