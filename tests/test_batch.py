"""The Batch API against the toy teacher's /v1/files + /v1/batches: the quickstart with no live chat request,
one batch per round, kills while a batch is pending, failing and expired lines, provider limits, and the
estimate against what the batch run paid."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pytest

from pipeline.core.recipe import load_recipe
from pipeline.core.sources import prompt_id
from pipeline.core.store import RunStore
from pipeline.run.errors import StageFailed
from pipeline.run.registry import STAGE_NAMES
from pipeline.run.runner import open_run, run_stage
from pipeline.tasks.toy.task import make_prompts
from pipeline.tasks.toy.teacher_server import ToyTeacher, ToyTeacherConfig
from pipeline.teacher.ledger import SpendLedger

DISTILL = [sys.executable, "-m", "pipeline.cli"]
QUICKSTART = Path(__file__).resolve().parents[1] / "configs" / "quickstart.yaml"
QUICKSTART_TEACHER = {"error_rate": 0.3, "disclaimer_rate": 0.05, "drift_rate": 0.05}  # configs/quickstart.yaml
PRICES = ["teacher.price_input_per_1k=1.0", "teacher.price_output_per_1k=2.0"]
# half the quickstart's prompts; the student trained as the quickstart trains it (what the estimate assumes
# about its answers depends on how well it learned)
SMALL = ["prompts.count=200", "evaluate.heldout_count=60"]


def _journal(run_dir: Path) -> list[dict]:
    entries = [json.loads(p.read_text()) for p in (run_dir / "batches").glob("*/*.json")
               if not p.name.startswith(".tmp-")]  # a write a kill interrupted
    return sorted(entries, key=lambda e: e["created_at"])


def _ledger_rows(run_dir: Path) -> list:
    ledger = SpendLedger.open(run_dir / "cache" / "teacher.sqlite")
    try:
        return ledger.rows()
    finally:
        ledger.close()


@pytest.fixture(scope="module")
def batch_quickstart(tmp_path_factory):
    """The quickstart (smaller) in batch mode with prices, its teacher on a port the test can ask for counts."""
    root = tmp_path_factory.mktemp("batchqs")
    overrides = [f"storage.root={root / 'runs'}", "teacher.batch=true", *PRICES, *SMALL]
    with ToyTeacher(ToyTeacherConfig(**QUICKSTART_TEACHER)) as toy:
        cmd = [*DISTILL, "run", str(QUICKSTART), "--no-prefect",
               *(f"--set={o}" for o in [f"teacher.base_url={toy.base_url}", *overrides])]
        res = subprocess.run(cmd, capture_output=True, text=True, timeout=1500, cwd=root)
        stats = toy.stats()
    return {"result": res, "stats": stats, "run_dir": root / "runs" / "quickstart", "overrides": overrides,
            "root": root}


@pytest.mark.slow
def test_the_quickstart_in_batch_mode_completes_with_no_live_chat_request(batch_quickstart):
    res, stats, run_dir = batch_quickstart["result"], batch_quickstart["stats"], batch_quickstart["run_dir"]
    assert res.returncode == 0, res.stderr[-3000:]
    assert stats["requests"] == 0  # not one live chat request
    batch = stats["batch"]
    assert batch["created"] == len(_journal(run_dir)) > 0 and batch["statuses"] == {"completed": batch["created"]}
    assert max(batch["ok_keys"].values()) == 1 and max(batch["submitted"].values()) == 1
    store = RunStore.open_existing(str(run_dir))
    assert all(store.stage_state(s).status == "completed" for s in STAGE_NAMES)
    rows = _ledger_rows(run_dir)
    assert len(rows) == batch["lines"]["ok"] and {r.mode for r in rows} == {"batch"}
    assert {r.stage for r in rows} == {"generate", "sample", "feedback", "evaluate"}
    tokens = batch["tokens"]
    assert sum(r.usd for r in rows) == pytest.approx(0.5 * (tokens["prompt"] * 1.0 + tokens["completion"] * 2.0) / 1000)
    journal = _journal(run_dir)
    assert all(e["consumed"] and e["batch_id"] for e in journal)
    # multi-round work is one batch per round: generate's dialogues (3 rounds at most) in at most 5 rounds
    assert Counter(e["stage"] for e in journal)["generate"] <= 5


@pytest.mark.slow
def test_the_estimate_is_within_30_percent_of_what_the_run_paid_per_stage(batch_quickstart):
    assert batch_quickstart["result"].returncode == 0
    run_dir, root = batch_quickstart["run_dir"], batch_quickstart["root"]
    est = subprocess.run([*DISTILL, "estimate", str(QUICKSTART), "--json",
                          *(f"--set={o}" for o in batch_quickstart["overrides"])],
                         capture_output=True, text=True, timeout=300, cwd=root)
    assert est.returncode == 0, est.stderr[-2000:]
    estimate = json.loads(est.stdout)
    paid = json.loads(subprocess.run([*DISTILL, "status", str(run_dir), "--json"], capture_output=True, text=True,
                                     check=True).stdout)
    assert set(estimate) >= {"stages", "total_usd"}
    for stage in STAGE_NAMES:  # shown with `pytest -rP`
        print(f"{stage:<9} estimated ${estimate['stages'][stage]['usd']:.4f}  paid ${paid['stages'][stage]['usd']:.4f}")
    for stage in STAGE_NAMES:
        expected, actual = estimate["stages"][stage]["usd"], paid["stages"][stage]["usd"]
        if actual == 0:
            assert expected == 0, stage
            continue
        assert 0.7 <= expected / actual <= 1.3, (stage, expected, actual)
        assert estimate["stages"][stage]["usd_batch"] == pytest.approx(expected)  # the endpoint batches
    assert estimate["total_usd_live"] == pytest.approx(2 * estimate["total_usd_batch"])


def _generate_recipe(write_recipe, base_url: str, count: int, **teacher) -> Path:
    return write_recipe({
        "name": "gen", "task": "toy", "prompts": {"source": "task", "count": count},
        "teacher": {"base_url": base_url, "model": "toy-teacher", "api_key_env": None, "batch": True,
                    "backoff_base_s": 0.01, "backoff_max_s": 0.05, **teacher},
        "generate": {"min_rounds": 1, "max_rounds": 3, "shard_size": 25},
    })


def _accounted(store: RunStore, count: int) -> None:
    out = [r["prompt_id"] for r in store.read_records("generate")]
    failed, dropped = set(store.ledger("generate").latest()), set(store.ledger("generate", "dropped").latest())
    assert len(out) == len(set(out)) and not set(out) & failed
    assert set(out) | failed | dropped == {prompt_id(p) for p in make_prompts(count, seed=0)}


def test_sigkill_while_a_batch_is_pending_then_rerun_sends_no_batch_twice(write_recipe, tmp_path):
    with ToyTeacher(ToyTeacherConfig(batch_in_progress_s=1.5)) as toy:
        recipe = _generate_recipe(write_recipe, toy.base_url, 80)
        run_dir = tmp_path / "runs" / "gen"
        cmd = [*DISTILL, "stage", "generate", str(recipe), "--run-name", "gen"]
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and not any(
                e["batch_id"] and not e["consumed"] and e["stage"] == "generate" and e["requests"] < 80
                for e in (_journal(run_dir) if run_dir.exists() else [])):
            time.sleep(0.05)  # a later round's batch is recorded and pending
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
        pending = [e for e in _journal(run_dir) if not e["consumed"]]
        assert any(e["batch_id"] for e in pending)  # recorded before it was polled
        created_before = toy.stats()["batch"]["created"]
        rerun = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
        assert rerun.returncode == 0, rerun.stderr[-2000:]
        stats = toy.stats()
    batch = stats["batch"]
    assert max(batch["submitted"].values()) == 1  # no request went into two batches
    assert max(batch["ok_keys"].values()) == 1 and stats["requests"] == 0  # no line answered twice
    created = [e for e in _journal(run_dir) if e["status"] != "never created"]
    assert batch["created"] == len(created) > created_before
    assert all(e["consumed"] for e in _journal(run_dir))
    assert "resuming batch" in rerun.stderr
    store = RunStore(tmp_path / "runs", "gen")
    _accounted(store, 80)
    assert len(_ledger_rows(run_dir)) == batch["lines"]["ok"]


def test_failing_lines_are_retried_in_the_next_round_and_every_item_is_accounted_for(write_recipe):
    with ToyTeacher(ToyTeacherConfig(batch_fail_rate=0.05)) as toy:
        rec = load_recipe(_generate_recipe(write_recipe, toy.base_url, 150, max_retries=1))
        store = open_run(rec, "fail")
        report = run_stage("generate", rec, store)
        stats = toy.stats()
    assert stats["batch"]["lines"]["failed"] > 0 and stats["requests"] == 0
    assert max(stats["batch"]["submitted"].values()) == 2  # a failed line went again, in the next round
    _accounted(store, 150)
    failed = store.ledger("generate").latest()
    assert report.counts["failed"] == len(failed)
    assert all("batch line failed 2 times" in f.reason for f in failed.values())


def test_expired_lines_go_live_with_batch_fallback_live(write_recipe):
    with ToyTeacher(ToyTeacherConfig(batch_expired_share=0.1)) as toy:
        rec = load_recipe(_generate_recipe(write_recipe, toy.base_url, 60, batch_fallback="live"))
        store = open_run(rec, "expired")
        run_stage("generate", rec, store)
        stats = toy.stats()
    assert stats["batch"]["lines"]["expired"] > 0
    assert stats["outcomes"]["ok"] == stats["batch"]["lines"]["expired"]  # each expired line once, live
    assert set(stats["ok_keys"]).isdisjoint(stats["batch"]["ok_keys"])
    _accounted(store, 60)
    rows = _ledger_rows(Path(store.path))
    assert Counter(r.mode for r in rows) == {"batch": stats["batch"]["lines"]["ok"], "live": stats["outcomes"]["ok"]}


def test_a_round_larger_than_the_provider_limits_is_split(write_recipe):
    with ToyTeacher(ToyTeacherConfig()) as toy:
        rec = load_recipe(_generate_recipe(write_recipe, toy.base_url, 100, batch_max_requests=30))
        store = open_run(rec, "split")
        run_stage("generate", rec, store)
    sizes = [e["requests"] for e in _journal(Path(store.path))]
    assert max(sizes) <= 30 and sorted(sizes[:4]) == [10, 30, 30, 30]  # the first round: 100 requests, 4 files


def test_batch_against_a_server_without_the_batch_api_is_a_clear_error(write_recipe):
    with ToyTeacher(ToyTeacherConfig(batch_api=False)) as toy:
        rec = load_recipe(_generate_recipe(write_recipe, toy.base_url, 20))
        store = open_run(rec, "nobatch")
        with pytest.raises(StageFailed, match=r"endpoint 'teacher' \(http://127\.0\.0\.1:\d+/v1\) does not offer the "
                                              r"Batch API.*set teacher.batch=false"):
            run_stage("generate", rec, store)
        assert toy.stats()["requests"] == 0
    assert store.count_records("generate") == 0 and not store.ledger("generate").latest()


class _Bar:
    """A progress sink as the flows install one (it records what it is shown)."""

    def __init__(self, name: str, total: int | None, unit: str):
        self.name, self.total, self.unit, self.done, self.shown = name, total, unit, 0, []

    def update(self, n: int = 1) -> None:
        self.done += n

    def set_description(self, text: str) -> None:
        self.shown.append(text)

    def close(self) -> None:
        pass


def test_progress_shows_each_batch_with_its_status_and_counts(write_recipe):
    from pipeline.core.progress import set_progress_factory

    bars: list[_Bar] = []
    set_progress_factory(lambda name, total, unit: bars.append(_Bar(name, total, unit)) or bars[-1])
    try:
        with ToyTeacher(ToyTeacherConfig(batch_in_progress_s=0.6)) as toy:
            rec = load_recipe(_generate_recipe(write_recipe, toy.base_url, 30))
            run_stage("generate", rec, open_run(rec, "bars"))
    finally:
        set_progress_factory(None)
    batches = [b for b in bars if b.name.startswith("generate batch")]
    assert batches and all(b.unit == "request" and b.done == b.total for b in batches)
    assert any(b.total == 30 for b in batches)  # the first round: every dialogue's first turn
    assert all(any(s.endswith("in_progress") for s in b.shown) and b.shown[-1].endswith("completed")
               for b in batches)
