"""The generate stage end to end against the toy teacher over real HTTP: faults, kills, secrets, filters."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from collections import Counter
from pathlib import Path

import datasets
import pytest

from pipeline.core.recipe import load_recipe
from pipeline.core.sources import prompt_id
from pipeline.core.store import RunStore
from pipeline.run.errors import StageFailed
from pipeline.run.runner import open_run, run_stage, teacher_endpoint
from pipeline.tasks.toy.task import make_prompts
from pipeline.tasks.toy.teacher_server import ToyTeacher, ToyTeacherConfig, request_key
from pipeline.teacher.cache import ResponseCache
from pipeline.teacher.serving import endpoint_url

FAULTS = {"fault_429": 0.05, "fault_500": 0.05, "fault_hang": 0.01, "fault_bad_json": 0.02,
          "retry_after_s": 0.2, "hang_s": 60}


def _recipe(write_recipe, base_url: str, count: int, decontamination: dict | None = None, **generate) -> Path:
    return write_recipe({
        "name": "gen",
        "teacher": {"base_url": base_url, "model": "toy-teacher", "api_key_env": None, "timeout_s": 1.0,
                    "max_retries": 6, "backoff_base_s": 0.05, "backoff_max_s": 0.5, "max_concurrency": 16},
        "task": "toy", "prompts": {"source": "task", "count": count},
        "generate": {"min_rounds": 1, "max_rounds": 3, "shard_size": 25, **generate},
        **({"decontamination": decontamination} if decontamination else {}),
    })


def _account(store: RunStore) -> tuple[list[str], set[str], set[str]]:
    out = [r["prompt_id"] for r in store.read_records("generate")]
    failed = set(store.ledger("generate").latest())
    dropped = set(store.ledger("generate", "dropped").latest())
    return out, failed, dropped


def test_every_prompt_ends_in_output_or_a_ledger_under_faults(write_recipe):
    with ToyTeacher(ToyTeacherConfig(**FAULTS)) as toy:
        rec = load_recipe(_recipe(write_recipe, toy.base_url, 300))
        store = open_run(rec, "faults")
        report = run_stage("generate", rec, store)
        outcomes = toy.stats()["outcomes"]
        ok_keys = toy.stats()["ok_keys"]
    out, failed, dropped = _account(store)
    expected = {prompt_id(p) for p in make_prompts(300, seed=0)}
    assert len(out) == len(set(out))  # no duplicates
    assert set(out) | failed | dropped == expected  # nothing lost
    assert not (set(out) & failed) and not (set(out) & dropped)
    assert report.counts["output"] == len(out) > 250
    assert all(outcomes.get(k, 0) > 0 for k in ("429", "500", "hang", "bad_json")), outcomes
    assert max(ok_keys.values()) == 1  # no successful request was ever sent twice
    stats = json.loads(Path(store.join("generate", "stats.json")).read_text())
    assert stats["counts"]["pending"] == 0 and stats["teacher"]["retries"] > 0
    ds = datasets.load_dataset("parquet", data_files=store.join("generate", "data-*.parquet"), split="train")
    assert set(ds.column_names) >= {"prompt", "prompt_id", "messages"}
    assert all(m[0]["role"] == "user" and m[-1]["role"] == "assistant" for m in ds["messages"])


def test_sigkill_half_way_then_rerun_completes_without_repeating_answered_requests(write_recipe, tmp_path):
    with ToyTeacher(ToyTeacherConfig(latency_ms=20, **{k: v for k, v in FAULTS.items() if k != "fault_hang"})) as toy:
        recipe = _recipe(write_recipe, toy.base_url, 400)
        cmd = [sys.executable, "-m", "pipeline.cli", "stage", "generate", str(recipe), "--run-name", "killed"]
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 120
        while toy.stats()["outcomes"].get("ok", 0) < 400 and time.monotonic() < deadline:
            time.sleep(0.05)
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
        run_dir = tmp_path / "runs" / "killed"
        cache = ResponseCache(run_dir / "cache" / "teacher.sqlite")
        answered_before = {request_key(r) for r in cache.requests()}
        cache.close()
        assert answered_before and len(list((run_dir / "generate").glob("data-*.parquet"))) >= 1
        rerun = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
        assert rerun.returncode == 0, rerun.stderr[-2000:]
        ok_keys = toy.stats()["ok_keys"]
    repeated = {k for k, n in ok_keys.items() if n > 1}
    assert not (repeated & answered_before), "a request whose answer the client had was sent again"
    store = RunStore(tmp_path / "runs", "killed")
    out, failed, dropped = _account(store)
    assert len(out) == len(set(out))
    assert set(out) | failed | dropped == {prompt_id(p) for p in make_prompts(400, seed=0)}
    assert store.stage_state("generate").status == "completed"


def test_api_key_never_reaches_disk_or_logs(write_recipe, tmp_path, monkeypatch):
    sentinel = "sk-SENTINEL-7f3c9e-do-not-store"
    monkeypatch.setenv("TEACHER_KEY_FOR_TEST", sentinel)
    with ToyTeacher(ToyTeacherConfig(api_key=sentinel, fault_500=0.05)) as toy:
        path = _recipe(write_recipe, toy.base_url, 60)
        text = path.read_text().replace("api_key_env: null", "api_key_env: TEACHER_KEY_FOR_TEST")
        path.write_text(text)
        res = subprocess.run([sys.executable, "-m", "pipeline.cli", "-v", "run", str(path), "--stages", "generate",
                              "--run-name", "secret"], capture_output=True, text=True, timeout=300,
                             env={**os.environ, "TEACHER_KEY_FOR_TEST": sentinel})
        assert res.returncode == 0, res.stderr[-2000:]
        assert toy.stats()["outcomes"]["ok"] > 0
    assert sentinel not in res.stdout + res.stderr
    files = [p for p in (tmp_path / "runs" / "secret").rglob("*") if p.is_file()]
    assert len(files) >= 4
    for p in files:
        assert sentinel.encode() not in p.read_bytes(), p


def test_filters_and_decontamination_are_counted(write_recipe, tmp_path):
    prompts = make_prompts(200, seed=0)
    evalset = tmp_path / "eval.jsonl"
    evalset.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in prompts[:10]))
    with ToyTeacher(ToyTeacherConfig(disclaimer_rate=0.1, drift_rate=0.3, empty_rate=0.05)) as toy:
        rec = load_recipe(_recipe(write_recipe, toy.base_url, 200, min_rounds=2, max_rounds=3,
                                  decontamination={"eval_files": [str(evalset)], "ngram": 4}))
        store = open_run(rec, "filters")
        run_stage("generate", rec, store)
    stats = json.loads(Path(store.join("generate", "stats.json")).read_text())
    assert stats["dropped_by_reason"]["contaminated"] >= 10
    assert stats["dropped_by_reason"]["disclaimer"] > 0
    assert stats["dialogue_stop_reasons"]["role_drift"] > 0
    out = {r["prompt_id"] for r in store.read_records("generate")}
    assert not out & {prompt_id(p) for p in prompts[:10]}
    for rec_ in store.read_records("generate"):
        assert not any("as an ai" in m["content"].lower() for m in rec_["messages"] if m["role"] == "assistant")


def test_self_instruct_expands_seeds_to_the_target(write_recipe):
    with ToyTeacher(ToyTeacherConfig()) as toy:
        rec = load_recipe(_recipe(write_recipe, toy.base_url, 12, max_rounds=1,
                                  self_instruct={"enabled": True, "target_count": 40},
                                  instruction_filter={"rouge_threshold": 0.9, "min_words": 2}))
        store = open_run(rec, "si")
        report = run_stage("generate", rec, store)
    sources = Counter(r["source"] for r in store.read_records("generate"))
    stats = json.loads(Path(store.join("generate", "stats.json")).read_text())
    # toy tasks are short and alike, so the ROUGE-L filter has plenty to reject
    assert stats["self_instruct"]["kept"] == 28 and report.counts["unique"] == 40
    assert stats["self_instruct"]["rejected_too_similar"] > 0
    assert sources["self_instruct"] > 20


def test_budget_cap_stops_cleanly_and_a_raised_cap_resumes(write_recipe, tmp_path):
    with ToyTeacher(ToyTeacherConfig()) as toy:
        path = _recipe(write_recipe, toy.base_url, 200)
        rec = load_recipe(path, ["teacher.price_input_per_1k=1.0", "teacher.price_output_per_1k=1.0",
                                 "teacher.max_cost_usd=2.0", "generate.max_rounds=1",
                                 "generate.max_tokens=64"])
        store = open_run(rec, "budget")
        with pytest.raises(StageFailed, match="teacher budget reached"):
            run_stage("generate", rec, store)
        saved = store.count_records("generate")
        assert 0 < saved < 200 and store.stage_state("generate").status == "failed"
        rec2 = load_recipe(path, ["teacher.price_input_per_1k=1.0", "teacher.price_output_per_1k=1.0",
                                  "teacher.max_cost_usd=100", "generate.max_rounds=1",
                                  "generate.max_tokens=64"])
        run_stage("generate", rec2, store)
        assert max(toy.stats()["ok_keys"].values()) == 1
    assert store.stage_state("generate").status == "completed"
    assert store.stage_state("generate").cost["usd"] < 100


def test_builtin_teacher_is_started_and_stopped_by_the_runner(repo_root):
    rec = load_recipe(repo_root / "configs/quickstart.yaml")
    with teacher_endpoint(rec) as live:
        url = endpoint_url(live.teacher)
        assert url.startswith("http://127.0.0.1:")
        with urllib.request.urlopen(url.removesuffix("/v1") + "/health", timeout=5) as resp:
            assert resp.status == 200
    assert rec.teacher.base_url == "builtin"
    with pytest.raises(OSError):  # stopped with the context
        urllib.request.urlopen(url.removesuffix("/v1") + "/health", timeout=5)
    with pytest.raises(RuntimeError, match="not running"):  # and no longer where requests go
        endpoint_url(rec.teacher)


def test_instruction_filter_rules():
    from pipeline.core.recipe import InstructionFilterConfig
    from pipeline.stages.generate.instruction_filter import Candidate, InstructionFilter
    from pipeline.stages.generate.self_instruct import parse_tasks

    filt = InstructionFilter(InstructionFilterConfig(), ["Write a poem about the sea and the sky at night"])
    assert filt.reason_to_drop(Candidate("Write a poem about the sea and the sky at dawn")) == "too_similar"
    assert filt.reason_to_drop(Candidate("Plot the sales figures for each month of last year")) == "unsuitable"
    assert filt.reason_to_drop(Candidate("Hi there")) == "length"
    assert filt.reason_to_drop(Candidate("Explain how tides follow the moon", cut_off=True)) == "cut_off"
    assert filt.offer(Candidate("Explain how tides follow the moon's position"))
    tasks = parse_tasks("Here you go:\nTask: one two three four\n2. Task: five six seven eight\nTask: cut", "length")
    assert [t.text for t in tasks] == ["one two three four", "five six seven eight", "cut"] and tasks[-1].cut_off
