"""Iterative self-prompting and self-instruct against the toy teacher over real HTTP: lineage, filters, targets
or a stated exhaustion reason, and resume after SIGKILL without repeating a cached request."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

from pipeline.core.recipe import load_recipe
from pipeline.core.sources import prompt_id
from pipeline.run.runner import open_run, run_stage
from pipeline.stages.generate.textsim import rouge_l
from pipeline.tasks.toy.task import make_prompts, parse_problem
from pipeline.tasks.toy.teacher_server import ToyTeacher, ToyTeacherConfig, request_key
from pipeline.teacher.cache import ResponseCache

TEACHER = {"model": "toy-teacher", "api_key_env": None, "timeout_s": 5.0, "max_retries": 3, "backoff_base_s": 0.05,
           "backoff_max_s": 0.2, "max_concurrency": 8}


def _recipe(write_recipe, base_url: str, count: int, generate: dict, **top) -> Path:
    return write_recipe({"name": "sp", "teacher": {"base_url": base_url, **TEACHER}, "task": "toy",
                         "prompts": {"source": "task", "count": count},
                         "generate": {"max_rounds": 1, "temperature": 0.0, **generate}, **top})


def _read_jsonl(path: str) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


def test_self_prompting_at_depth_3_grows_filtered_trees_with_lineage(write_recipe, tmp_path):
    seeds = make_prompts(6, seed=0)
    banned = [p for p in make_prompts(630, seed=1) if p not in seeds][:120]  # follow-ons the filter must refuse
    evals = tmp_path / "eval.jsonl"
    evals.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in banned))
    sp = {"enabled": True, "depth": 3, "branching": 2}
    with ToyTeacher(ToyTeacherConfig()) as toy:
        rec = load_recipe(_recipe(write_recipe, toy.base_url, 6, {
            "self_prompting": sp, "instruction_filter": {"rouge_threshold": 0.85}},
            decontamination={"eval_files": [str(evals)], "min_words": 4}))
        store = open_run(rec, "tree")
        report = run_stage("generate", rec, store)
        roles = toy.stats()["roles_ok"]
    assert report.status == "completed" and roles["follow_on"] > 0
    stats = json.loads(Path(store.join("generate", "stats.json")).read_text())["self_prompting"]
    assert stats["stop_reason"].startswith("tree_complete") and stats["rejected_too_similar"] > 0
    assert stats["rejected_contaminated"] > 0 and set(stats["kept_by_depth"]) == {"1", "2", "3"}

    rows = {r["prompt_id"]: r for r in _read_jsonl(store.join("generate", "instructions.jsonl"))}
    seed_ids = {prompt_id(p) for p in seeds}
    depth_of = {**{pid: 0 for pid in seed_ids}, **{pid: r["depth"] for pid, r in rows.items()}}
    for r in rows.values():
        assert r["source"] == "self_prompting" and r["root_prompt_id"] in seed_ids
        assert depth_of[r["parent_prompt_id"]] == r["depth"] - 1 and 1 <= r["depth"] <= 3
        root = r["parent_prompt_id"]
        while root not in seed_ids:
            root = rows[root]["parent_prompt_id"]
        assert root == r["root_prompt_id"]
        assert parse_problem(r["prompt"]) is not None and r["prompt"] not in banned
    children = {}
    for r in rows.values():
        children.setdefault(r["parent_prompt_id"], []).append(r)
    assert max(len(c) for c in children.values()) <= 2  # branching
    everything = list(seeds) + [r["prompt"] for r in rows.values()]
    for i, new in enumerate(everything[len(seeds):], len(seeds)):
        assert all(rouge_l(new, other) <= 0.85 for other in everything[:i])  # against all kept before it

    records = {r["prompt_id"]: r for r in store.read_records("generate")}
    assert set(rows) <= set(records) | set(store.ledger("generate", "dropped").latest())
    for pid, r in rows.items():
        if pid in records:
            out = records[pid]
            assert (out["root_prompt_id"], out["parent_prompt_id"], out["depth"]) == \
                (r["root_prompt_id"], r["parent_prompt_id"], r["depth"])
    assert all(records[pid]["depth"] == 0 and records[pid]["root_prompt_id"] == pid for pid in seed_ids)


def test_sigkill_during_self_prompting_then_rerun_repeats_no_cached_request(write_recipe, tmp_path):
    generate = {"self_prompting": {"enabled": True, "depth": 3, "branching": 2},
                "instruction_filter": {"rouge_threshold": 0.85}}
    with ToyTeacher(ToyTeacherConfig(latency_ms=60)) as toy:
        recipe = _recipe(write_recipe, toy.base_url, 10, generate)
        cmd = [sys.executable, "-m", "pipeline.cli", "stage", "generate", str(recipe), "--run-name", "killed"]
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 120
        while toy.stats()["roles_ok"].get("follow_on", 0) < 30 and time.monotonic() < deadline:
            time.sleep(0.02)
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
        cache = ResponseCache(tmp_path / "runs" / "killed" / "cache" / "teacher.sqlite")
        answered_before = {request_key(r) for r in cache.requests()}
        cache.close()
        assert answered_before and not (tmp_path / "runs" / "killed" / "generate" / "instructions.jsonl").exists()
        rerun = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
        assert rerun.returncode == 0, rerun.stderr[-2000:]
        ok_keys = toy.stats()["ok_keys"]
        fresh = subprocess.run([*cmd[:-1], "fresh"], capture_output=True, text=True, timeout=300)
        assert fresh.returncode == 0, fresh.stderr[-2000:]
    repeated = {k for k, n in ok_keys.items() if n > 1}
    assert not (repeated & answered_before), "a request whose answer the client had was sent again"
    resumed = _read_jsonl(str(tmp_path / "runs" / "killed" / "generate" / "instructions.jsonl"))
    uninterrupted = _read_jsonl(str(tmp_path / "runs" / "fresh" / "generate" / "instructions.jsonl"))
    assert resumed == uninterrupted and len(resumed) > 20  # the same tree as a run that was never killed


def test_self_prompting_stops_at_its_target(write_recipe):
    generate = {"self_prompting": {"enabled": True, "depth": 3, "branching": 2, "target_count": 15},
                "instruction_filter": {"rouge_threshold": 0.85}}
    with ToyTeacher(ToyTeacherConfig()) as toy:
        rec = load_recipe(_recipe(write_recipe, toy.base_url, 6, generate))
        store = open_run(rec, "target")
        report = run_stage("generate", rec, store)
    stats = json.loads(Path(store.join("generate", "stats.json")).read_text())["self_prompting"]
    assert stats["stop_reason"] == "target_reached" and stats["kept"] == 9 and report.counts["unique"] == 15


def test_self_instruct_that_cannot_reach_its_target_says_why_in_stats_and_message(write_recipe):
    # The toy task has ~630 training prompts and near-identical phrasings: 5 000 is out of reach.
    generate = {"self_instruct": {"enabled": True, "target_count": 5000, "requests_per_round": 8,
                                  "exhaustion": {"min_acceptance_rate": 0.2, "patience": 2}}}
    with ToyTeacher(ToyTeacherConfig()) as toy:
        rec = load_recipe(_recipe(write_recipe, toy.base_url, 12, generate))
        store = open_run(rec, "short")
        report = run_stage("generate", rec, store)
    stats = json.loads(Path(store.join("generate", "stats.json")).read_text())["self_instruct"]
    assert not stats["reached"] and stats["stop_reason"].startswith("exhausted: 2 rounds in a row kept under 20.0%")
    assert stats["acceptance_by_round"][-1] < 0.2 and stats["acceptance_by_round"][-2] < 0.2
    assert report.status == "completed" and "self-instruct reached" in report.message
    assert "of 5000 prompts (exhausted" in report.message
