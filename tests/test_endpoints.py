"""Named endpoints and roles against toy teachers on separate ports: each server gets only its roles' requests,
a new judge re-runs evaluate alone, caps stop cleanly, the spend ledger matches what the servers answered."""

from __future__ import annotations

import json
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from pipeline.core.recipe import load_recipe
from pipeline.core.sources import prompt_id
from pipeline.core.store import RunStore
from pipeline.run.errors import StageFailed
from pipeline.run.estimate import estimate
from pipeline.run.registry import STAGE_NAMES
from pipeline.run.runner import open_run, run_pipeline, run_stage
from pipeline.tasks.toy.task import make_prompts
from pipeline.tasks.toy.teacher_server import ToyTeacher, ToyTeacherConfig
from pipeline.teacher.ledger import SpendLedger

DISTILL = [sys.executable, "-m", "pipeline.cli"]
FAST = {"api_key_env": None, "timeout_s": 5.0, "max_retries": 3, "backoff_base_s": 0.05, "backoff_max_s": 0.2,
        "max_concurrency": 8}
GEN_ROLES = {"assistant", "user_simulator"}
CRITIC_ROLES = {"rater", "correction", "single_judge", "pairwise_judge"}


def _pipeline(gen_url: str, critic_url: str) -> dict:
    """A whole small run: dialogues on one server, ratings and verdicts on another."""
    return {
        "name": "roles", "task": "toy",
        "teacher": {"base_url": gen_url, "model": "toy-gen", **FAST},
        "endpoints": {"critic": {"base_url": critic_url, "model": "toy-critic", **FAST}},
        "roles": {"rater": "critic", "judge": "critic"},
        "prompts": {"source": "task", "count": 24},
        "generate": {"max_rounds": 2, "shard_size": 50},
        "sft": {"args": {"max_steps": 4, "per_device_train_batch_size": 8}},
        "sample": {"k": 2, "pool": [
            {"name": "student", "backend": "transformers", "model": "sft", "max_tokens": 12, "principles": False},
            {"name": "gen", "backend": "openai", "temperature": 0.0, "max_tokens": 32}]},
        "feedback": {"aspects": ["helpfulness"]},
        "dpo": {"args": {"max_steps": 2, "per_device_train_batch_size": 4}},
        "evaluate": {"heldout_count": 8, "max_tokens": 12},
    }


def _ledger(store: RunStore) -> SpendLedger:
    return SpendLedger.open(Path(store.join("cache", "teacher.sqlite")))


def _answered(toy: ToyTeacher) -> int:
    return toy.stats()["outcomes"].get("ok", 0)


@pytest.mark.slow
def test_each_server_gets_only_its_roles_and_a_new_judge_reruns_evaluate_alone(write_recipe, tmp_path):
    with ToyTeacher(ToyTeacherConfig()) as gen, ToyTeacher(ToyTeacherConfig()) as critic, \
            ToyTeacher(ToyTeacherConfig()) as judge:
        data = _pipeline(gen.base_url, critic.base_url)
        store, _ = run_pipeline(load_recipe(write_recipe(data)), "roles")
        gen_roles, critic_roles = set(gen.stats()["roles_ok"]), set(critic.stats()["roles_ok"])
        assert gen_roles == GEN_ROLES  # the openai pool member's answers are assistant requests too
        assert {"rater", "single_judge"} <= critic_roles <= CRITIC_ROLES  # pairwise: when two answers differ
        ledger = _ledger(store)
        by_stage = {(c.stage, c.endpoint) for c in ledger.rows()}
        ledger.close()
        assert by_stage == {("generate", "teacher"), ("sample", "teacher"), ("feedback", "critic"),
                            ("evaluate", "critic")}
        before = {"gen": _answered(gen), "critic": _answered(critic)}

        data["endpoints"]["judge3"] = {"base_url": judge.base_url, "model": "toy-judge-3", **FAST}
        data["roles"]["judge"] = "judge3"
        _, reports = run_pipeline(load_recipe(write_recipe(data)), "roles")
        assert [r.stage for r in reports if r.skipped] == ["generate", "sft", "sample", "feedback", "dpo"]
        assert not reports[-1].skipped and reports[-1].status == "completed"
        assert {"gen": _answered(gen), "critic": _answered(critic)} == before  # the first two: not one request
        assert "single_judge" in set(judge.stats()["roles_ok"]) <= {"single_judge", "pairwise_judge"}
        judged = _answered(judge)

        data["roles"]["judge"] = "critic"  # switching back: evaluate runs again, every verdict from the cache
        _, reports = run_pipeline(load_recipe(write_recipe(data)), "roles")
        assert not reports[-1].skipped and reports[-1].status == "completed"
        assert (_answered(gen), _answered(critic), _answered(judge)) == (before["gen"], before["critic"], judged)
    assert all(store.stage_state(s).status == "completed" for s in STAGE_NAMES)


def _spend_recipe(gen_url: str, critic_url: str, cap: float | None = None) -> dict:
    """Sample and feedback only: two openai pool members (one on its own priced endpoint), a priced rater."""
    return {
        "name": "spend", "task": "toy", "prompts": {"source": "task", "count": 60},
        "teacher": {"base_url": gen_url, "model": "toy-gen", "price_input_per_1k": 1.0, "price_output_per_1k": 2.0,
                    **FAST},
        "endpoints": {"cheap": {"base_url": gen_url, "model": "toy-cheap", "price_input_per_1k": 0.5,
                                "price_output_per_1k": 0.5, **FAST},
                      "critic": {"base_url": critic_url, "model": "toy-critic", "price_input_per_1k": 3.0,
                                 "price_output_per_1k": 6.0, **FAST}},
        "roles": {"rater": "critic", "judge": "critic"},
        "budget": {"max_cost_usd": cap},
        "sample": {"k": 2, "pool": [{"name": "gen", "backend": "openai", "temperature": 0.7, "max_tokens": 32},
                                    {"name": "cheap", "backend": "openai", "endpoint": "cheap", "max_tokens": 32}]},
        "feedback": {"aspects": ["instruction_following", "helpfulness"], "shard_size": 10},
        "estimate": {"reply_tokens": {"rating": 17, "answer": 9}, "reask_rate": 0.0},  # the toy's short replies
    }


def test_a_run_cap_inside_feedback_stops_cleanly_and_the_pool_members_spend_counts(write_recipe):
    with ToyTeacher(ToyTeacherConfig(latency_ms=20)) as gen, ToyTeacher(ToyTeacherConfig(latency_ms=20)) as critic:
        rec = load_recipe(write_recipe(_spend_recipe(gen.base_url, critic.base_url)))
        store = open_run(rec, "spend")
        run_stage("sample", rec, store)
        ledger = _ledger(store)
        sample_usd = ledger.total()
        cheap = [c for c in ledger.rows() if c.endpoint == "cheap"]
        assert len(cheap) == 60 and all(c.role == "pool:cheap" and c.stage == "sample" for c in cheap)
        cheap_usd = sum(c.usd for c in cheap)
        assert cheap_usd > 0 and cheap_usd == pytest.approx(sum(c.prompt_tokens + c.completion_tokens
                                                                for c in cheap) * 0.5 / 1000)
        feedback_estimate = estimate(rec)["stages"]["feedback"]["usd"]
        cap = sample_usd + 0.4 * feedback_estimate  # falls inside feedback
        capped = load_recipe(write_recipe(_spend_recipe(gen.base_url, critic.base_url, cap)))
        with pytest.raises(StageFailed, match=r"run budget reached.*raise budget.max_cost_usd and rerun"):
            run_stage("feedback", capped, store)
        total = ledger.total()
        assert sample_usd < total <= cap  # every reservation covered its request's cost
        rated = [c for c in ledger.rows() if c.stage == "feedback"]
        assert len(rated) == _answered(critic) > 0  # stopped cleanly: every answer the rater gave is ledgered
        assert store.stage_state("feedback").status == "failed" and store.shard_paths("feedback", "pairs")
        assert not store.ledger("feedback").latest()  # items not rated yet are pending, not failed
        raised = load_recipe(write_recipe(_spend_recipe(gen.base_url, critic.base_url, 10 * cap)))
        run_stage("feedback", raised, open_run(raised, "spend"))  # as `distill stage` does: the new snapshot
        assert max(critic.stats()["ok_keys"].values()) == 1  # the rerun paid for nothing twice
        summary = json.loads(subprocess.run([*DISTILL, "status", store.url, "--json"], capture_output=True,
                                            text=True, check=True).stdout)
        ledger_total = ledger.total()
        ledger.close()
    assert store.stage_state("feedback").status == "completed"
    assert summary["total_usd"] == pytest.approx(ledger_total)
    assert summary["stages"]["sample"]["endpoints"]["cheap"]["requests"] == 60
    assert summary["endpoints"]["critic"]["usd"] == pytest.approx(summary["stages"]["feedback"]["usd"])
    assert summary["budget"]["max_cost_usd"] == pytest.approx(10 * cap)


def _ledger_rows(path: Path) -> int:
    if not path.exists():
        return 0
    db = sqlite3.connect(path, timeout=30)
    try:
        return db.execute("SELECT COUNT(*) FROM spend").fetchone()[0]
    except sqlite3.OperationalError:
        return 0
    finally:
        db.close()


def test_sigkill_inside_a_stage_then_rerun_the_ledger_equals_server_tokens_times_prices(write_recipe, tmp_path):
    with ToyTeacher(ToyTeacherConfig(latency_ms=10)) as toy:
        data = {"name": "kill", "task": "toy", "prompts": {"source": "task", "count": 120},
                "teacher": {"base_url": toy.base_url, "model": "toy-gen", "price_input_per_1k": 1.0,
                            "price_output_per_1k": 2.0, **FAST},
                "generate": {"max_rounds": 3, "shard_size": 20}}
        recipe = write_recipe(data)
        cache = tmp_path / "runs" / "kill" / "cache" / "teacher.sqlite"
        toy.hold(after=150)  # a quiet moment: 150 answered, the rest held unanswered until released
        cmd = [*DISTILL, "stage", "generate", str(recipe), "--run-name", "kill"]
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 120
        while _ledger_rows(cache) < 150 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert _ledger_rows(cache) == 150 == _answered(toy)
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
        toy.release()  # the held requests of the dead process are dropped unanswered
        rerun = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
        assert rerun.returncode == 0, rerun.stderr[-2000:]
        forced = subprocess.run([*cmd, "--force"], capture_output=True, text=True, timeout=300)
        assert forced.returncode == 0, forced.stderr[-2000:]  # a reset stage: everything from the cache
        stats = toy.stats()
    assert max(stats["ok_keys"].values()) == 1
    store = RunStore(tmp_path / "runs", "kill")
    ledger = _ledger(store)
    rows = ledger.rows()
    paid = ledger.total()
    ledger.close()
    assert len(rows) == stats["outcomes"]["ok"]
    assert sum(r.prompt_tokens for r in rows) == stats["tokens"]["prompt"]
    assert sum(r.completion_tokens for r in rows) == stats["tokens"]["completion"]
    assert paid == pytest.approx((stats["tokens"]["prompt"] * 1.0 + stats["tokens"]["completion"] * 2.0) / 1000)
    summary = json.loads(subprocess.run([*DISTILL, "status", store.url, "--json"], capture_output=True, text=True,
                                        check=True).stdout)
    assert summary["stages"]["generate"]["usd"] == pytest.approx(paid)  # the reset forgot no money
    assert summary["stages"]["generate"]["cached"] > 0
    out = {r["prompt_id"] for r in store.read_records("generate")}
    accounted = out | set(store.ledger("generate").latest()) | set(store.ledger("generate", "dropped").latest())
    assert accounted == {prompt_id(p) for p in make_prompts(120, seed=0)}


@pytest.mark.parametrize(("edit", "expected"), [
    ({"roles": {"rater": "nope"}}, "roles.rater: unknown endpoint 'nope'; the endpoints are: teacher, critic"),
    ({"sample": {"k": 1, "pool": [{"name": "m", "backend": "openai", "endpoint": "gpt4"}]}},
     "sample.pool[0].endpoint (m): unknown endpoint 'gpt4'; the endpoints are: teacher, critic"),
    ({"sample": {"k": 1, "pool": [{"name": "m", "backend": "openai", "model": "x", "base_url": "not a url"}]}},
     "sample.pool.0.base_url: 'not a url' is not an http(s) URL"),
    ({"endpoints": {"critic": {"base_url": "not a url"}}}, "endpoints.critic.base_url: 'not a url' is not an http"),
    ({"teacher": {"base_url": "not a url"}}, "teacher.base_url: 'not a url' is not an http(s) URL"),
    ({"endpoints": {"teacher": {"base_url": "http://x/v1"}}}, "'teacher' is the default endpoint"),
])
def test_bad_endpoints_are_errors_naming_the_key(tmp_path, edit, expected):
    data = {"name": "bad", "task": "toy", "teacher": {"base_url": "http://127.0.0.1:9/v1", "api_key_env": None},
            "endpoints": {"critic": {"base_url": "http://127.0.0.1:9/v1", "api_key_env": None}}}
    for key, value in edit.items():
        data[key] = {**data.get(key, {}), **value} if key in ("endpoints", "teacher") else value
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(data))
    res = subprocess.run([*DISTILL, "validate", str(path)], capture_output=True, text=True, cwd=tmp_path)
    assert res.returncode == 2 and expected in res.stderr, res.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.yaml"]
