"""`distill preview`: n prompts through every stage against a real loopback toy teacher, n of each kind of item
shown (in the terminal, and as artifacts of the Prefect `preview` flow), the run's own stages untouched, and the
full run that follows answered from the preview's cached requests (cache hits in the spend ledger, not one of
them sent to the server again)."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from prefect_env import PrefectEnv

from pipeline.core.recipe import load_recipe
from pipeline.core.store import RunStore
from pipeline.run.preview import PreviewPlan, PreviewStore, preview_recipe
from pipeline.run.registry import STAGE_NAMES
from pipeline.tasks.toy.teacher_server import ToyTeacher, ToyTeacherConfig
from pipeline.teacher.cache import cache_path_for

DISTILL = [sys.executable, "-m", "pipeline.cli"]
FAST = {"api_key_env": None, "timeout_s": 10.0, "max_retries": 3, "backoff_base_s": 0.05, "backoff_max_s": 0.2,
        "max_concurrency": 8}
TITLES = {"dialogues": "dialogues", "answers": "pool answers with their ratings", "pairs": "preference pairs",
          "verdicts": "judge verdicts"}


def _recipe(base_url: str, name: str = "peek") -> dict:
    """A small whole run: 12 prompts, a student and the teacher in the pool, pool and correction pairs."""
    return {
        "name": name, "task": "toy",
        "teacher": {"base_url": base_url, "model": "toy-teacher", **FAST},
        "prompts": {"source": "task", "count": 12},
        "generate": {"max_rounds": 2},
        "sft": {"args": {"max_steps": 6, "per_device_train_batch_size": 8}},
        "sample": {"k": 2, "pool": [
            {"name": "student", "backend": "transformers", "model": "sft", "max_tokens": 12, "principles": False},
            {"name": "teacher", "backend": "openai", "temperature": 0.0, "max_tokens": 32}]},
        "feedback": {"aspects": ["helpfulness"], "sources": ["pool", "correction"]},
        "dpo": {"args": {"max_steps": 2, "per_device_train_batch_size": 4}},
        "evaluate": {"heldout_count": 6, "max_tokens": 12},
    }


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "PREFECT_API_URL"}
    return {**env, "HF_HUB_OFFLINE": "1", "TQDM_DISABLE": "1", **extra}


def _sections(out: str) -> dict[str, tuple[int, int, int]]:
    """Each section of the terminal's preview: (items listed, shown, made) from `== title (shown of made) ==`."""
    found = {}
    for block in out.split("\n== ")[1:]:
        head, _, body = block.partition("\n")
        match = re.fullmatch(r"(.*) \((\d+) of (\d+)\) ==", head)
        if match:
            kind = next((k for k, t in TITLES.items() if match.group(1).startswith(t)), match.group(1))
            found[kind] = (len(re.findall(r"^\[\d+\] ", body, re.M)), int(match.group(2)), int(match.group(3)))
    return found


@pytest.mark.slow
def test_preview_shows_n_of_each_kind_and_the_full_run_reuses_its_requests(write_recipe, tmp_path):
    with ToyTeacher(ToyTeacherConfig()) as toy:
        recipe = write_recipe(_recipe(toy.base_url))
        run_dir = tmp_path / "runs" / "peek"
        out = subprocess.run([*DISTILL, "preview", str(recipe), "-n", "3", "--no-prefect"], capture_output=True,
                             text=True, env=_env(), timeout=900)
        assert out.returncode == 0, out.stderr[-3000:]
        shown = _sections(out.stdout)
        assert {kind: listed for kind, (listed, _, _) in shown.items()} == dict.fromkeys(TITLES, 3)
        assert shown["dialogues"][2] == 3 and shown["answers"][2] == 6  # 3 prompts, k=2 answers each
        assert "sft and dpo train 4 steps only" in out.stdout and "judge verdicts on models trained 4 steps" \
            in out.stdout
        assert re.search(r"^total\s+\d+", out.stdout, re.M)  # the estimate beside what was paid
        assert not (run_dir / "manifest.json").exists()  # the run's own stages are not marked done
        after_preview = toy.stats()["ok_keys"]

        full = subprocess.run([*DISTILL, "run", str(recipe), "--no-prefect"], capture_output=True, text=True,
                              env=_env(), timeout=900)
        assert full.returncode == 0, full.stderr[-3000:]
        status = json.loads(subprocess.run([*DISTILL, "status", str(run_dir), "--json"], capture_output=True,
                                           text=True, env=_env(), check=True).stdout)
        after_run = toy.stats()["ok_keys"]
    assert {key: after_run[key] for key in after_preview} == after_preview  # none sent to the server again
    stages, preview = status["stages"], status["preview"]  # the run's ledger: the preview's rows are there too
    assert preview["generate"]["requests"] > 0 and preview["sample"]["requests"] == 3  # the teacher's 3 answers
    # every request the preview paid for that the full run makes again is a cache hit there: the first 3
    # prompts' dialogues and the teacher's pool answers to them
    assert stages["generate"]["cached"] >= preview["generate"]["requests"]
    assert stages["sample"]["cached"] >= preview["sample"]["requests"]
    assert stages["generate"]["requests"] > 0  # the other 9 prompts' dialogues were paid for in the run
    manifest = json.loads((run_dir / "manifest.json").read_text())
    assert all(manifest["stages"][s]["status"] == "completed" for s in STAGE_NAMES)


@pytest.mark.slow
def test_preview_as_a_prefect_flow_publishes_each_kind_of_item_as_an_artifact(write_recipe, tmp_path):
    from prefect import get_client

    env = PrefectEnv(tmp_path / "prefect")
    env.start_server()
    try:
        with ToyTeacher(ToyTeacherConfig()) as toy:
            recipe = write_recipe(_recipe(toy.base_url, "flowpeek"))
            # no --prefect: a set PREFECT_API_URL makes the preview a flow run
            out = env.run(*DISTILL, "preview", str(recipe), "-n", "2", timeout=900)
        assert out.returncode == 0, out.stderr[-3000:] + env.logs()
        with env.client_settings(), get_client(sync_client=True) as client:
            artifacts = {a.key: a for a in client.read_artifacts() if a.key}
            done = {client.read_flow(r.flow_id).name for r in client.read_flow_runs()
                    if r.state and r.state.is_completed()}
    finally:
        env.stop()
    assert "preview" in done
    for kind in TITLES:
        rows = artifacts[f"flowpeek-preview-{kind}"].data
        assert len(json.loads(rows) if isinstance(rows, str) else rows) == 2, kind
    summary = artifacts["flowpeek-preview-summary"].data
    assert "train 4 steps only" in summary and "The full run's estimate beside what the preview paid" in summary
    assert _sections(out.stdout)["pairs"][0] == 2  # the terminal shows them too


def test_the_preview_writes_under_preview_and_shares_only_the_cache(tmp_path, repo_root):
    recipe = load_recipe(repo_root / "configs" / "quickstart.yaml", [f"storage.root={tmp_path}",
                                                                    "teacher.batch=true"])
    store = PreviewStore(RunStore(tmp_path, "q"))
    trimmed = preview_recipe(recipe, PreviewPlan(n=3, steps=2), store)
    assert store.join("generate") == str(tmp_path.resolve() / "q" / "preview" / "generate")
    assert store.manifest_path == str(tmp_path.resolve() / "q" / "preview" / "manifest.json")
    assert cache_path_for(store, None) == tmp_path.resolve() / "q" / "cache" / "teacher.sqlite"
    assert store.state_key("sft") == "preview:sft"  # the label of its rows in the run's spend ledger
    assert (trimmed.prompts.limit, trimmed.prompts.count, trimmed.evaluate.heldout_count) == (3, 400, 3)
    assert trimmed.sft.args["max_steps"] == trimmed.dpo.args["max_steps"] == 2 and trimmed.dpo.rounds == 1
    assert trimmed.teacher.batch is False


def test_a_preview_of_an_evaluation_file_evaluates_its_first_n_items(tmp_path, repo_root):
    items = tmp_path / "eval.jsonl"
    items.write_text("".join(json.dumps({"question_id": i, "turns": [f"What is {i} + 1?"]}) + "\n"
                             for i in range(10)))
    recipe = load_recipe(repo_root / "configs" / "quickstart.yaml", [f"storage.root={tmp_path}",
                                                                    f"evaluate.prompts={items}"])
    trimmed = preview_recipe(recipe, PreviewPlan(n=4), PreviewStore(RunStore(tmp_path, "q")))
    rows = [json.loads(line) for line in Path(trimmed.evaluate.prompts).read_text().splitlines()]
    assert [r["question_id"] for r in rows] == [0, 1, 2, 3]
    assert Path(trimmed.evaluate.prompts).parent == tmp_path.resolve() / "q" / "preview" / "inputs"
