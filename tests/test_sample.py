"""The sample stage: k of M pool models per prompt, principles, local and OpenAI-compatible backends, kills."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pytest

from pipeline.backends.answers import completion_id
from pipeline.core.recipe import SampleConfig, load_recipe
from pipeline.core.sources import SeedPrompt, prompt_id, unique_prompts
from pipeline.core.templates import render
from pipeline.run.runner import open_run, run_stage
from pipeline.stages.sample.stage import SampleError, assign_models, check_principles
from pipeline.tasks.toy.task import corpus, make_prompts
from pipeline.tasks.toy.teacher_server import ToyTeacher, ToyTeacherConfig, request_key
from pipeline.teacher.cache import ResponseCache
from pipeline.train.student import build_student

TEACHER = {"model": "toy-teacher", "api_key_env": None, "timeout_s": 5.0, "max_retries": 3, "backoff_base_s": 0.05,
           "backoff_max_s": 0.2, "max_concurrency": 4}
COLUMNS = {"completion_id", "prompt_id", "prompt", "prompt_source", "model", "backend", "model_path", "principle",
           "system_prompt", "system_prompt_in", "completion", "finish_reason", "sample_index", "seed", "temperature",
           "top_p", "max_tokens", "prompt_tokens", "completion_tokens"}


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory) -> str:
    return str(build_student(tmp_path_factory.mktemp("tiny"), corpus(300, seed=3), seed=3))


def _recipe(write_recipe, base_url: str, count: int, pool: list[dict], k: int, **sample) -> Path:
    return write_recipe({"name": "sample", "teacher": {"base_url": base_url, **TEACHER},
                         "task": "toy", "prompts": {"source": "task", "count": count},
                         "sample": {"k": k, "shard_size": 50, "pool": pool, **sample}})


def test_each_prompt_gets_k_distinct_pool_models_and_one_principle_of_its_source():
    pool = [{"name": n, "backend": "openai", "model": "m"} for n in "abcd"]
    cfg = SampleConfig(pool=pool, k=2, principles={"default": ["helpfulness", "honesty"], "toy": ["truthfulness"]})
    prompts = [SeedPrompt(p, prompt_id(p), "toy" if i % 2 else "file.jsonl")
               for i, p in enumerate(make_prompts(400, seed=0))]
    plan = assign_models(prompts, cfg)
    by_prompt: dict[str, list] = {}
    for a in plan:
        by_prompt.setdefault(a.prompt.prompt_id, []).append(a)
    assert len(plan) == 800 and all(len({a.model for a in v}) == 2 for v in by_prompt.values())
    for p in prompts:
        principles = {a.principle for a in by_prompt[p.prompt_id]}
        assert len(principles) == 1
        assert principles <= ({"truthfulness"} if p.source == "toy" else {"helpfulness", "honesty"})
    assert max(Counter(a.model for a in plan).values()) < 230  # ~200 each: the draw is uniform
    again = {a.completion_id: a.model for a in assign_models(list(reversed(prompts[:50])), cfg)}
    assert all(again[a.completion_id] == a.model for a in plan if a.prompt in prompts[:50])  # per-prompt seeding
    assert len({a.completion_id for a in plan}) == 800 and len({a.sample_seed for a in plan}) == 800


def test_a_principle_without_a_template_is_an_error_naming_the_key():
    cfg = SampleConfig(principles={"default": ["helpfulness", "flattery"]})
    with pytest.raises(SampleError, match=r"sample.principles.default: no template prompts/principle_flattery"):
        check_principles(cfg)


def test_local_and_openai_pool_models_answer_with_principles_and_record_their_sampling(write_recipe, tiny_model):
    pool = [{"name": "tiny", "backend": "transformers", "model": tiny_model, "max_tokens": 12, "batch_size": 8,
             "temperature": 0.7},
            {"name": "teacher", "backend": "openai", "model": "toy-teacher", "temperature": 0.0, "max_tokens": 64}]
    with ToyTeacher(ToyTeacherConfig()) as toy:
        recipe = load_recipe(_recipe(write_recipe, toy.base_url, 20, pool, 2,
                                     principles={"default": ["honesty", "verbalized_calibration"]}))
        store = open_run(recipe, "mixed")
        report = run_stage("sample", recipe, store)
        again = run_stage("sample", recipe, store)
        assert toy.stats()["roles_ok"] == {"assistant": 20}  # the second run was skipped, nothing re-sent
    assert report.counts == {"input": 40, "prompts": 20, "output": 40, "failed": 0, "pending": 0, "dropped_prompts": 0}
    assert again.skipped
    rows = list(store.read_records("sample", "completions"))
    assert set(rows[0]) == COLUMNS and len(rows) == 40
    for r in rows:
        assert r["completion_id"] == completion_id(r["prompt_id"], r["model"], 0)
        assert r["system_prompt"] == render(f"principle_{r['principle']}.jinja")
        assert r["temperature"] == (0.7 if r["model"] == "tiny" else 0.0)
        assert r["finish_reason"] in ("stop", "length")
    assert all(r["finish_reason"] == "stop" and "answer is" in r["completion"] for r in rows if r["model"] == "teacher")
    stats = json.loads(Path(store.join("sample", "stats.json")).read_text())
    assert stats["answers_per_prompt"] == {"2": 20} and stats["per_model"]["tiny"]["answers"] == 20


def test_sigkill_half_way_then_rerun_loads_only_unfinished_models_and_repeats_no_request(write_recipe, tmp_path,
                                                                                         tiny_model):
    pool = [{"name": "tiny", "backend": "transformers", "model": tiny_model, "max_tokens": 8, "batch_size": 64},
            {"name": "teacher-a", "backend": "openai", "model": "toy-teacher", "temperature": 0.0},
            {"name": "teacher-b", "backend": "openai", "model": "toy-teacher", "temperature": 1.0}]
    with ToyTeacher(ToyTeacherConfig(latency_ms=20)) as toy:
        path = _recipe(write_recipe, toy.base_url, 300, pool, 2)
        cmd = [sys.executable, "-m", "pipeline.cli", "stage", "sample", str(path), "--run-name", "killed"]
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 120
        while toy.stats()["outcomes"].get("ok", 0) < 250 and time.monotonic() < deadline:
            time.sleep(0.02)
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
        run_dir = tmp_path / "runs" / "killed"
        cache = ResponseCache(run_dir / "cache" / "teacher.sqlite")
        answered_before = {request_key(r) for r in cache.requests()}
        cache.close()
        recipe = load_recipe(path)
        store = open_run(recipe, "killed")
        saved = Counter(r["model"] for r in store.read_records("sample", "completions"))
        planned = assign_models(unique_prompts(recipe.prompts, recipe.task), recipe.sample)
        rerun = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
        assert rerun.returncode == 0, rerun.stderr[-2000:]
        ok_keys = toy.stats()["ok_keys"]
    assert saved["tiny"] == sum(a.model == "tiny" for a in planned) and 0 < sum(saved.values()) < 600
    assert "sample: tiny answers" not in rerun.stderr  # its answers were all saved: the model is not loaded again
    assert "sample: teacher-b answers" in rerun.stderr and answered_before
    assert not {k for k, n in ok_keys.items() if n > 1} & answered_before
    ids = [r["completion_id"] for r in store.read_records("sample", "completions")]
    assert len(ids) == len(set(ids)) and set(ids) | set(store.ledger("sample").latest()) == {
        a.completion_id for a in planned}
    assert store.stage_state("sample").status == "completed"
