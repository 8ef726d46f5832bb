"""Fingerprints follow the content of the files a stage reads: appending prompts re-runs generate, and the
response cache answers everything but the new prompts' requests."""

from __future__ import annotations

import json
import os
from pathlib import Path

from pipeline.core.filehash import content_hash
from pipeline.core.recipe import load_recipe
from pipeline.core.sources import prompt_id
from pipeline.run.registry import STAGE_NAMES, fingerprint
from pipeline.run.runner import open_run, run_stage
from pipeline.tasks.toy.task import make_prompts
from pipeline.tasks.toy.teacher_server import ToyTeacher, ToyTeacherConfig, request_key
from pipeline.teacher.cache import ResponseCache

TEACHER = {"model": "toy-teacher", "api_key_env": None, "timeout_s": 5.0, "max_retries": 3, "backoff_base_s": 0.05,
           "backoff_max_s": 0.2, "max_concurrency": 8}


def _write_prompts(path: Path, prompts: list[str]) -> None:
    path.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in prompts))


def _dialogue_prompt(request: dict) -> str:
    """The seed prompt of the dialogue a request belongs to (assistant and user-simulator requests alike)."""
    return next(m["content"] for m in request["messages"] if m["role"] != "system")


def test_appending_prompts_reruns_generate_and_pays_only_for_the_new_prompts(write_recipe, tmp_path):
    prompts = make_prompts(40, seed=0)
    source = tmp_path / "prompts.jsonl"
    _write_prompts(source, prompts[:30])
    with ToyTeacher(ToyTeacherConfig()) as toy:
        path = write_recipe({"name": "grow", "teacher": {"base_url": toy.base_url, **TEACHER},
                             "prompts": {"source": str(source)}, "generate": {"min_rounds": 2, "max_rounds": 3}})
        rec = load_recipe(path)
        store = open_run(rec, "grow")
        first = run_stage("generate", rec, store)
        before = set(toy.stats()["ok_keys"])
        with source.open("a") as fh:  # ten more prompts, appended
            fh.write("".join(json.dumps({"prompt": p}) + "\n" for p in prompts[30:]))
        rec2 = load_recipe(path)
        assert fingerprint("generate", rec2) != store.stage_state("generate").fingerprint
        second = run_stage("generate", rec2, store)
        stats = toy.stats()
    assert not second.skipped and first.counts["input"] == 30 and second.counts["input"] == 40
    assert second.counts["output"] + second.counts["dropped"] == 40
    new_keys = set(stats["ok_keys"]) - before
    cache = ResponseCache(store.join("cache", "teacher.sqlite"))
    requests = {request_key(r): r for r in cache.requests()}
    cache.close()
    paid_for = {_dialogue_prompt(requests[k]) for k in new_keys}
    assert paid_for == set(prompts[30:]), "only the ten new prompts' dialogues cost requests"
    assert max(stats["ok_keys"].values()) == 1  # no request sent twice
    done = {r["prompt_id"] for r in store.read_records("generate")} | set(store.ledger("generate", "dropped").latest())
    assert {prompt_id(p) for p in prompts} <= done


def test_changing_an_evaluation_file_changes_the_stages_that_read_it(repo_root, tmp_path):
    evals = tmp_path / "evals.jsonl"
    evals.write_text(json.dumps({"prompt": "What is the tallest mountain on Earth and how tall is it?"}) + "\n")
    overrides = [f"decontamination.eval_files=[{evals}]"]
    base = {s: fingerprint(s, load_recipe(repo_root / "configs/quickstart.yaml", overrides)) for s in STAGE_NAMES}
    with evals.open("a") as fh:
        fh.write(json.dumps({"prompt": "Name the longest river in South America and its length."}) + "\n")
    new = {s: fingerprint(s, load_recipe(repo_root / "configs/quickstart.yaml", overrides)) for s in STAGE_NAMES}
    assert {s for s in STAGE_NAMES if base[s] != new[s]} == set(STAGE_NAMES)  # generate and sample, and downstream
    held_out = tmp_path / "held_out.jsonl"
    held_out.write_text(json.dumps({"turns": ["Write a haiku about rain."]}) + "\n")
    ev = [f"evaluate.prompts={held_out}"]
    one = {s: fingerprint(s, load_recipe(repo_root / "configs/quickstart.yaml", ev)) for s in STAGE_NAMES}
    held_out.write_text(json.dumps({"turns": ["Write a haiku about snow."]}) + "\n")
    two = {s: fingerprint(s, load_recipe(repo_root / "configs/quickstart.yaml", ev)) for s in STAGE_NAMES}
    assert {s for s in STAGE_NAMES if one[s] != two[s]} == {"evaluate"}


def test_content_hash_follows_bytes_not_timestamps_and_covers_directories(tmp_path):
    f = tmp_path / "data.jsonl"
    f.write_text('{"prompt": "a"}\n')
    first = content_hash(f)
    os.utime(f, ns=(1, 1))  # touched, same bytes
    assert content_hash(f) == first
    f.write_text('{"prompt": "b"}\n')
    assert content_hash(f) != first
    folder = tmp_path / "ds"
    (folder / "train").mkdir(parents=True)
    (folder / "train" / "part-0.parquet").write_bytes(b"one")
    before = content_hash(folder)
    (folder / "train" / "part-1.parquet").write_bytes(b"two")
    assert content_hash(folder) != before
