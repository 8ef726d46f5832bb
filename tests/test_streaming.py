"""Flat memory at scale, checked for correctness (timings are the benchmark's, benchmarks/scale.py): compact
done-sets, a disk-backed near-duplicate index that answers as datasketch's, ledgers that append and prune without
rewrites, a resume that skips what is finished, and a status that never reads the ledgers."""

from __future__ import annotations

import gc
import json
import os
import random
import subprocess
import sys
import tempfile
import tracemalloc
import weakref
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from datasketch import MinHash, MinHashLSH

from pipeline.cli import main as distill
from pipeline.core import scratch
from pipeline.core.heap import steady_heap
from pipeline.core.idset import IdSet
from pipeline.core.ledger import FailureLedger
from pipeline.core.store import RunStore, StageState
from pipeline.stages.generate.neardup import NearDuplicateIndex
from pipeline.stages.generate.textsim import words
from pipeline.tasks.toy.teacher_server import ToyTeacher, ToyTeacherConfig

WORDS = "alpha bravo charlie delta echo foxtrot golf hotel india juliet kilo lima mike".split()


def test_idset_answers_membership_exactly_in_16_bytes_an_id():
    ids = [f"{i:064x}" for i in range(0, 100_000, 2)]
    held = IdSet(ids)
    held.add("late")  # after the bulk: sits among the pending adds until the next merge
    assert len(held) == len(ids) + 1
    assert all(i in held for i in ids) and "late" in held
    assert not any(f"{i:064x}" in held for i in range(1, 100_000, 2)) and "never" not in held
    assert held.nbytes() <= 17 * len(held)
    assert not held.add_new(ids[7]) and held.add_new("fresh") and "fresh" in held


class _ReferenceIndex:
    """The near-duplicate test as it was with datasketch's in-memory MinHashLSH: the answers to match."""

    def __init__(self, threshold: float, shingle: int):
        self.threshold, self.shingle = threshold, shingle
        self.lsh = MinHashLSH(threshold=threshold, num_perm=128)
        template = MinHash(num_perm=128, seed=1)
        self.perm, self.scheme = template.permutations, template.scheme
        self.sigs: dict[str, MinHash] = {}
        self.exact: dict[str, str] = {}

    def match_or_add(self, key: str, text: str) -> str | None:
        toks = words(text)
        if (norm := " ".join(toks)) in self.exact:
            return self.exact[norm]
        grams = {" ".join(toks[i:i + self.shingle]).encode() for i in range(max(1, len(toks) - self.shingle + 1))}
        sig = MinHash(num_perm=128, permutations=self.perm, scheme=self.scheme)
        sig.update_batch(sorted(grams))
        for found in sorted(self.lsh.query(sig)):
            if sig.jaccard(self.sigs[found]) >= self.threshold:
                return found
        self.exact[norm] = key
        self.sigs[key] = sig
        self.lsh.insert(key, sig)
        return None


def _near_copies(n: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    base = [" ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 30))) for _ in range(200)]
    texts = []
    for _ in range(n):
        toks = rng.choice(base).split()
        for _ in range(rng.randint(0, 2)):  # a word or two changed: some stay above the threshold
            toks[rng.randrange(len(toks))] = rng.choice(WORDS)
        texts.append(" ".join(toks) if rng.random() < 0.9 else " ".join(toks).upper())  # upper: an exact copy
    return texts


@pytest.mark.parametrize(("threshold", "shingle"), [(0.9, 3), (0.6, 5)])
def test_near_duplicate_index_on_disk_answers_as_datasketch_lsh(threshold: float, shingle: int):
    texts = _near_copies(3000, seed=int(threshold * 10))
    keys = [f"k{random.Random(i).randrange(10**6):06d}-{i}" for i in range(len(texts))]  # key order != add order
    reference = _ReferenceIndex(threshold, shingle)
    with NearDuplicateIndex(threshold, shingle=shingle) as index:
        got = [index.match_or_add(k, t) for k, t in zip(keys, texts, strict=True)]
    expected = [reference.match_or_add(k, t) for k, t in zip(keys, texts, strict=True)]
    assert got == expected
    assert 300 < sum(g is not None for g in got) < len(texts) - 100  # both answers occur


def test_near_duplicate_signatures_are_datasketch_minhash_values():
    texts = ["", "one", *_near_copies(200, seed=5), "Ünïcode wörds — and 3 + 4 = 7"]
    reference = _ReferenceIndex(0.9, 3)
    with NearDuplicateIndex(0.9, shingle=3) as index:
        for text in texts:
            toks = words(text)
            grams = {" ".join(toks[i:i + 3]).encode() for i in range(max(1, len(toks) - 2))}
            sig = MinHash(num_perm=128, permutations=reference.perm, scheme=reference.scheme)
            sig.update_batch(sorted(grams))
            mine = index.shingle_text(text).sig
            assert mine.dtype == sig.hashvalues.dtype and np.array_equal(mine, sig.hashvalues), text


def test_near_duplicate_index_holds_no_python_objects_per_text():
    rng = random.Random(3)
    texts = [f"request {i}: " + " ".join(rng.choice(WORDS) for _ in range(8)) for i in range(8000)]
    with NearDuplicateIndex(0.9) as index:
        index.seen(texts[0])  # the first add builds the template and imports: not what is measured
        tracemalloc.start()
        for text in texts[1:]:
            index.seen(text)
        grown, _ = tracemalloc.get_traced_memory()
        tracemalloc.stop()
    # datasketch's index took ~2.5 KB a text here (20 MB); what stays is the 16-byte digest of each key
    assert grown < 1_000_000, grown


def _inode(path: str) -> tuple[int, int]:
    st = os.stat(path)
    return st.st_ino, st.st_mtime_ns


def test_steady_heap_sets_the_heap_aside_while_a_stage_runs_and_leaks_nothing():
    class Node:
        pass

    def cycle() -> weakref.ref:
        a, b = Node(), Node()
        a.other, b.other = b, a
        return weakref.ref(a)

    threshold, before = gc.get_threshold(), cycle()  # garbage from before the stage
    with steady_heap():
        assert gc.get_freeze_count() > 0 and gc.get_threshold()[0] >= 10_000
        with steady_heap():  # nested (a stage inside a flow's stage): one freeze, undone by the outermost
            during = cycle()
        assert gc.get_freeze_count() > 0
        gc.collect()
        assert before() is not None and during() is None  # set aside: a full pass does not scan it
    assert gc.get_freeze_count() == 0 and gc.get_threshold() == threshold
    gc.collect()
    assert before() is None  # collected after the stage: nothing leaks


def test_failure_ledger_appends_without_rewrites_and_prunes_only_what_is_superseded(tmp_path: Path):
    ledger = RunStore(tmp_path, "r").ledger("generate")
    ledger.record_many((f"item-{i}", "HTTP 500", 1) for i in range(5000))
    before, first = Path(ledger.path).read_bytes(), _inode(ledger.path)
    ledger.record("item-5000", "HTTP 429", 2)
    assert Path(ledger.path).read_bytes().startswith(before) and _inode(ledger.path)[0] == first[0]
    appended = _inode(ledger.path)
    assert not ledger.prune() and _inode(ledger.path) == appended  # nothing superseded: the file is untouched

    ledger.record("item-3", "timeout", 4)  # item-3 failed again, item-1 later succeeded
    assert ledger.prune(IdSet(["item-1"]))
    entries = list(ledger.iter_entries())
    assert [e.item_id for e in entries[:3]] == ["item-0", "item-2", "item-3"]  # first-seen order, item-1 gone
    assert entries[2].reason == "timeout" and entries[2].attempts == 5
    assert len(entries) == 5000 and len({e.item_id for e in entries}) == 5000


def test_an_append_after_a_line_cut_by_a_kill_is_kept(tmp_path: Path):
    ledger = FailureLedger(RunStore(tmp_path, "r"), "generate")
    ledger.record("a", "HTTP 500")
    with open(ledger.path, "a") as fh:
        fh.write('{"item_id": "b", "stage": "gen')  # a kill mid-append
    ledger.record("c", "HTTP 429")
    assert set(ledger.latest()) == {"a", "c"} and "c" in ledger.ids() and "b" not in ledger.ids()


def test_status_answers_from_the_manifest_without_reading_the_ledgers(tmp_path: Path, monkeypatch):
    store = RunStore(tmp_path, "big")
    store.init_manifest({"name": "big"}, {})
    store.set_stage_state("generate", StageState(status="completed", counts={"output": 199_000, "failed": 1000}))
    store.ledger("generate").record_many((f"item-{i}", "HTTP 500", 1) for i in range(1000))

    def refuse(self):
        raise AssertionError(f"status read {self.path}")

    monkeypatch.setattr(FailureLedger, "_lines", refuse)
    result = CliRunner().invoke(distill, ["status", store.url])
    assert result.exit_code == 0, result.output
    row = next(line for line in result.output.splitlines() if line.startswith("generate"))
    assert row.split()[1:4] == ["completed", "199000", "1000"]


def _prompts_file(path: Path, n: int, empty: int) -> None:
    rng = random.Random(0)
    lines = [{"prompt": f"Request {i}: {' '.join(rng.choice(WORDS) for _ in range(8))}. What is {i % 10} + "
                        f"{rng.randint(0, 9)}?"} for i in range(n)]
    lines += [{"prompt": ""}] * empty + lines[:empty]  # dropped once (empty), and repeats that are one item
    path.write_text("".join(json.dumps(r) + "\n" for r in lines))


def test_resume_skips_every_finished_and_dropped_item_of_a_large_run(tmp_path: Path):
    _prompts_file(tmp_path / "prompts.jsonl", 2000, empty=30)
    with ToyTeacher(ToyTeacherConfig(disclaimer_rate=0.05)) as toy:  # some dialogues dropped as they finish
        recipe = tmp_path / "recipe.yaml"
        recipe.write_text(json.dumps({
            "name": "resume", "storage": {"root": str(tmp_path / "runs")},
            "prompts": {"source": str(tmp_path / "prompts.jsonl")},
            "teacher": {"base_url": toy.base_url, "model": "toy-teacher", "api_key_env": None, "timeout_s": 30},
            "generate": {"min_rounds": 1, "max_rounds": 1, "shard_size": 250}}))
        cmd = [sys.executable, "-m", "pipeline.cli", "stage", "generate", str(recipe), "--run-name", "resume"]
        subprocess.run(cmd, check=True, capture_output=True)
        store = RunStore(tmp_path / "runs", "resume")
        dropped_before = {e.item_id: e.reason for e in store.ledger("generate", "dropped").iter_entries()}
        # as a kill leaves it: the stage running, and 500 finished dialogues whose shards were never published
        store.set_stage_state("generate", StageState(**{**vars(store.stage_state("generate")), "status": "running"}))
        for path in store.shard_paths("generate")[2:4]:
            os.remove(path)
        rerun = subprocess.run(cmd, capture_output=True, text=True)
        assert rerun.returncode == 0, rerun.stdout[-2000:] + rerun.stderr[-2000:]
    stats = json.loads(Path(store.join("generate", "stats.json")).read_text())
    out = [r["prompt_id"] for r in store.read_records("generate", columns=["prompt_id"])]
    dropped = [(e.item_id, e.reason) for e in store.ledger("generate", "dropped").iter_entries()]
    assert dict(dropped) == dropped_before and len(dropped) == len(dropped_before)  # one line each, as before
    assert sum(r.startswith("disclaimer") for r in dropped_before.values()) > 50
    assert len(out) == len(set(out)) == 2000 - (len(dropped) - 1) and stats["counts"]["pending"] == 0
    # only the 500 lost were simulated again, answered by the cache: no finished or dropped item was redone
    assert stats["teacher"]["cached"] == 500 and stats["teacher"]["requests"] == 0


def test_a_killed_stages_scratch_files_are_swept_by_the_next_one(tmp_path: Path, monkeypatch):
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    orphan = tmp_path / f"{scratch.PREFIX}prompts-{int(dead.stdout)}-x1y2z3"
    alive = tmp_path / f"{scratch.PREFIX}prompts-{os.getppid()}-a1b2c3"
    other = tmp_path / "distill-launch-sft-q9w8e7"  # someone else's temporary directory
    for path in (orphan, alive, other):
        path.mkdir()
    with scratch.Scratch("prompts") as mine:
        assert mine.db.execute("SELECT 1").fetchone() == (1,)
        assert not orphan.exists() and alive.exists() and other.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([alive.name, other.name])


def test_status_loads_no_stage_nor_the_registry(tmp_path: Path):
    store = RunStore(tmp_path, "r")
    store.init_manifest({"name": "r"}, {}, stages=["generate", "sft"])
    store.set_stage_state("generate", StageState(status="completed", counts={"output": 3}))
    probe = ("import sys\nfrom pipeline.cli import main\ntry:\n    main(['status', sys.argv[1]])\n"
             "except SystemExit:\n    pass\n"
             "print('LOADED', sorted(m for m in sys.modules if m.startswith(('pipeline.stages', 'pipeline.run.registry',"
             " 'prefect', 'torch', 'openai'))))")
    proc = subprocess.run([sys.executable, "-c", probe, store.url], capture_output=True, text=True, timeout=120)
    assert "completed" in proc.stdout, proc.stdout + proc.stderr
    assert proc.stdout.strip().splitlines()[-1] == "LOADED []"  # what makes status take seconds to start
