"""`distill estimate`: the requests a recipe will make, counted before anything is paid, priced live and batch,
checked against caps; against a real run of the same recipe."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from pipeline.core.recipe import load_recipe
from pipeline.run.estimate import estimate
from pipeline.run.runner import open_run, run_stage, teacher_endpoint
from pipeline.teacher.ledger import SpendLedger

DISTILL = [sys.executable, "-m", "pipeline.cli"]
TOY_REPLIES = {"assistant": 10, "user_simulator": 8, "rating": 17, "judge": 8, "answer": 9}


def _recipe(base_url: str, **extra) -> dict:
    return {"name": "est", "task": "toy", "prompts": {"source": "task", "count": 80},
            "teacher": {"base_url": base_url, "model": "toy-gen", "api_key_env": None, "price_input_per_1k": 1.0,
                        "price_output_per_1k": 2.0},
            "endpoints": {"cheap": {"base_url": base_url, "model": "toy-cheap", "api_key_env": None,
                                   "price_input_per_1k": 0.5, "price_output_per_1k": 0.5, "batch": True}},
            "generate": {"min_rounds": 1, "max_rounds": 4},
            "sample": {"k": 1, "pool": [{"name": "a", "backend": "openai", "max_tokens": 32, "temperature": 0.0},
                                        {"name": "b", "backend": "openai", "endpoint": "cheap", "max_tokens": 32,
                                         "temperature": 0.0}]},
            "estimate": {"reply_tokens": TOY_REPLIES, "reask_rate": 0.0}, **extra}


def test_the_estimate_counts_the_requests_generate_and_sample_make(write_recipe):
    # the built-in teacher (its tokens are counted as it counts them) with dialogues that never end early
    data = _recipe("builtin")
    data["teacher"]["builtin"] = data["endpoints"]["cheap"]["builtin"] = {"disclaimer_rate": 0.0, "drift_rate": 0.0}
    rec = load_recipe(write_recipe(data))
    predicted = estimate(rec)["stages"]
    store = open_run(rec, "est")
    with teacher_endpoint(rec) as live:
        run_stage("generate", live, store)
        run_stage("sample", live, store)
    ledger = SpendLedger.open(store.join("cache", "teacher.sqlite"))
    summary = ledger.summary()["stages"]
    ledger.close()
    for stage in ("generate", "sample"):
        for endpoint, paid in summary[stage]["endpoints"].items():
            expected = predicted[stage]["endpoints"][endpoint]
            assert expected["requests"] == paid["requests"], (stage, endpoint)
            assert 0.7 <= expected["input_tokens"] / paid["prompt_tokens"] <= 1.3, (stage, endpoint)
            assert 0.7 <= expected["output_tokens"] / paid["completion_tokens"] <= 1.3, (stage, endpoint)
    assert set(predicted["sample"]["endpoints"]) == {"teacher", "cheap"}
    cheap = predicted["sample"]["endpoints"]["cheap"]
    assert cheap["batch"] and cheap["usd"] == pytest.approx(cheap["usd_batch"]) == pytest.approx(0.5 * cheap["usd_live"])


def test_over_a_cap_the_estimate_exits_nonzero_naming_the_cap(write_recipe, tmp_path):
    path = write_recipe(_recipe("http://127.0.0.1:9/v1", budget={"max_cost_usd": 0.01}))
    res = subprocess.run([*DISTILL, "estimate", str(path), "--json"], capture_output=True, text=True, cwd=tmp_path)
    assert res.returncode == 1, res.stderr
    assert "budget.max_cost_usd: the run is estimated at $" in res.stderr
    result = json.loads(res.stdout)
    assert set(result) >= {"stages", "total_usd", "endpoints", "over_caps"} and result["total_usd"] > 0.01
    assert set(result["stages"]) == {"generate", "sft", "sample", "feedback", "dpo", "evaluate"}
    assert result["stages"]["sft"]["usd"] == 0
    capped = subprocess.run([*DISTILL, "estimate", str(path), "--set", "budget.max_cost_usd=null", "--set",
                             "endpoints.cheap.max_cost_usd=0.001"], capture_output=True, text=True, cwd=tmp_path)
    assert capped.returncode == 1 and "endpoints.cheap.max_cost_usd: endpoint 'cheap'" in capped.stderr
    fine = subprocess.run([*DISTILL, "estimate", str(path), "--set", "budget.max_cost_usd=1000000"],
                          capture_output=True, text=True, cwd=tmp_path)
    assert fine.returncode == 0 and "total:" in fine.stdout and "evaluate" in fine.stdout
    assert sorted(p.name for p in tmp_path.iterdir()) == ["recipe.yaml"]  # estimating writes nothing


def test_an_unpriced_pool_member_is_pointed_out(write_recipe, tmp_path):
    data = _recipe("http://127.0.0.1:9/v1")
    data["sample"]["pool"][1] = {"name": "b", "backend": "openai", "model": "m", "base_url": "http://127.0.0.1:9/v1"}
    res = subprocess.run([*DISTILL, "estimate", str(write_recipe(data))], capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    assert "sample.pool[1] (b) has its own base_url and no endpoint: its requests are ledgered at $0" in res.stderr


def test_self_prompting_requests_are_estimated_on_the_instruction_writers_endpoint(write_recipe):
    from pipeline.tasks.toy.teacher_server import ToyTeacher, ToyTeacherConfig

    with ToyTeacher(ToyTeacherConfig()) as toy:
        data = _recipe(toy.base_url, roles={"instruction_writer": "cheap"})
        data["endpoints"]["cheap"]["batch"] = False
        data["prompts"]["count"] = 12
        data["generate"] = {"max_rounds": 1, "temperature": 0.0,
                            "self_prompting": {"enabled": True, "depth": 2, "branching": 2}}
        rec = load_recipe(write_recipe(data))
        store = open_run(rec, "sp")
        run_stage("generate", rec, store)
    with open(store.join("generate", "stats.json")) as f:
        stats = json.load(f)["self_prompting"]
    ledger = SpendLedger.open(store.join("cache", "teacher.sqlite"))
    paid = ledger.summary()["stages"]["generate"]["endpoints"]["cheap"]
    ledger.close()
    # what the filter kept is the one rate the estimate has to assume; given it, the tree's requests follow
    rec.estimate.self_instruct_keep_rate = stats["kept"] / stats["proposed"]
    expected = estimate(rec)["stages"]["generate"]["endpoints"]["cheap"]
    assert set(expected["roles"]) == {"instruction_writer"}
    print(f"instruction writer: estimated {expected['requests']:.0f} requests, paid {paid['requests']}")
    assert 0.7 <= expected["requests"] / paid["requests"] <= 1.3, (expected["requests"], paid["requests"])
