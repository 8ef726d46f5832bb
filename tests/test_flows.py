"""Orchestration against a real Prefect server with process workers on the `cpu` and `gpu` pools."""

from __future__ import annotations

import json
import sys
import uuid
from pathlib import Path

import pytest
from prefect_env import PrefectEnv, database_url

from pipeline.core.recipe import load_recipe
from pipeline.core.sources import prompt_id
from pipeline.core.store import RunStore
from pipeline.run.registry import STAGE_NAMES
from pipeline.tasks.toy.teacher_server import ToyTeacher, ToyTeacherConfig

DISTILL = str(Path(sys.executable).parent / "distill")
QUICKSTART = Path(__file__).resolve().parents[1] / "configs" / "quickstart.yaml"


# Each test names the databases it runs on: both where what it checks lives in the database (deployments,
# pools, limits, blocks, the stored form schema, a failed run's states), one where the database only carries
# the run (the whole-quickstart dispatch on PostgreSQL, the retry and series runs on SQLite).
BOTH = pytest.mark.parametrize("prefect", ["sqlite", "postgres"], indirect=True)
SQLITE = pytest.mark.parametrize("prefect", ["sqlite"], indirect=True)
POSTGRES = pytest.mark.parametrize("prefect", ["postgres"], indirect=True)


@pytest.fixture(scope="module")
def prefect(request, tmp_path_factory):
    """A server on SQLite (`distill server`, hardened) or on PostgreSQL, with the deployments and both workers."""
    env = PrefectEnv(tmp_path_factory.mktemp(f"prefect-{request.param}"), database_url=database_url(request))
    env.start_server()
    try:
        res = env.run(DISTILL, "deploy", "--cron", "0 2 * * *")
        assert res.returncode == 0, res.stderr[-3000:]
        env.start_worker("cpu")
        env.start_worker("gpu")
        yield env
    finally:
        env.stop()


def _run(env: PrefectEnv, request: dict, deployment: str = "distill/distill", timeout: float = 600):
    from prefect.deployments import run_deployment

    with env.client_settings():
        return run_deployment(deployment, parameters={"request": request}, timeout=timeout, poll_interval=1)


def _client_call(env: PrefectEnv, fn):
    from prefect import get_client

    with env.client_settings(), get_client(sync_client=True) as client:
        return fn(client)


@BOTH
def test_deployments_pools_schedule_and_gpu_limit(prefect):
    def read(client):
        deps = {f"{client.read_flow(d.flow_id).name}/{d.name}": d for d in client.read_deployments()}
        limits = {lim.name: lim.limit for lim in client.read_global_concurrency_limits()}
        return deps, limits

    deps, limits = _client_call(prefect, read)
    assert deps["distill/distill"].work_pool_name == "cpu"
    for stage in ("sample", "sft", "dpo", "evaluate"):
        assert deps[f"{stage}/gpu"].work_pool_name == "gpu"
    for stage in ("generate", "feedback"):
        assert deps[f"{stage}/cpu"].work_pool_name == "cpu"
    nightly = deps["distill/nightly"]
    assert [s.schedule.cron for s in nightly.schedules] == ["0 2 * * *"]
    assert nightly.parameters["request"]["series"] == "nightly"
    assert limits["zephyr-distill-gpu"] == 1


@BOTH
def test_parameters_render_as_a_typed_form(prefect):
    schema = _client_call(prefect, lambda c: c.read_deployment_by_name("distill/distill").parameter_openapi_schema)
    request = schema["definitions"]["DistillRequest"]["properties"]
    assert {"recipe_path", "recipe_yaml", "run_name", "stages", "overrides", "series", "force"} <= set(request)
    assert request["stages"]["items"]["enum"] == ["generate", "sft", "sample", "feedback", "dpo", "evaluate"]
    assert request["force"]["type"] == "boolean"
    assert "description" in request["overrides"]


@BOTH
def test_bad_parameters_fail_with_a_clear_message(prefect):
    run = _run(prefect, {"recipe_path": "configs/quickstart.yaml", "overrides": ["dpo.beta"]}, timeout=180)
    assert run.state.is_failed()
    assert "KEY.PATH=VALUE" in (run.state.message or ""), run.state.message


def _growing_prompts(path: Path, n: int) -> list[str]:
    prompts = [f"What is {a} + {b}?" for a in range(10) for b in range(10)][:n]
    path.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in prompts))
    return prompts


@SQLITE
def test_series_second_run_ingests_only_new_prompts(prefect, tmp_path):
    prompts_file = tmp_path / "prompts.jsonl"
    recipe_overrides = [f"storage.root={tmp_path / 'runs'}", f"prompts.source={prompts_file}",
                        "generate.max_rounds=1"]
    request = {"recipe_path": "configs/quickstart.yaml", "stages": ["generate"], "series": "nightly-test",
               "overrides": recipe_overrides}
    first = _growing_prompts(prompts_file, 30)
    run1 = _run(prefect, request, deployment="distill/nightly")
    assert run1.state.is_completed(), prefect.logs()
    grown = _growing_prompts(prompts_file, 45)
    run2 = _run(prefect, request, deployment="distill/nightly")
    assert run2.state.is_completed(), prefect.logs()
    index = json.loads((tmp_path / "runs" / "series" / "nightly-test" / "series.json").read_text())
    runs = index["runs"]
    assert [r["new_prompts"] for r in runs] == [30, 15] and all(r["status"] == "completed" for r in runs)
    second = RunStore.open_existing(runs[1]["run_dir"])
    seen = {r["prompt_id"] for r in second.read_records("generate")}
    seen |= set(second.ledger("generate").latest()) | set(second.ledger("generate", "dropped").latest())
    assert seen == {prompt_id(p) for p in grown[30:]}
    assert not seen & {prompt_id(p) for p in first}
    run3 = _run(prefect, request, deployment="distill/nightly")  # nothing new: completes doing nothing
    assert run3.state.is_completed()
    assert len(json.loads((tmp_path / "runs" / "series" / "nightly-test" / "series.json").read_text())["runs"]) == 2


def _task_graph(env: PrefectEnv, flow_run_id) -> dict[str, dict[str, list[str]]]:
    """stage -> {input name: [upstream task run names]}: what the UI draws the flow run's task graph from."""
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    def read(client):
        return client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id])))

    runs = _client_call(env, read)
    names = {r.id: r.name for r in runs}
    return {r.name: {k: [names.get(i.id, str(i.id)) for i in v] for k, v in r.task_inputs.items() if v} for r in runs}


@SQLITE
def test_series_runs_accumulate_data_chain_their_stages_and_show_the_gate(prefect, tmp_path):
    prompts_file = tmp_path / "prompts.jsonl"
    request = {"recipe_path": "configs/quickstart.yaml", "stages": ["generate", "sft"], "series": "grow",
               "overrides": [f"storage.root={tmp_path / 'runs'}", f"prompts.source={prompts_file}",
                             "generate.max_rounds=1", "sft.args.num_train_epochs=2"]}
    _growing_prompts(prompts_file, 24)
    run1 = _run(prefect, request, deployment="distill/nightly")
    assert run1.state.is_completed(), prefect.logs()
    _growing_prompts(prompts_file, 40)
    run2 = _run(prefect, request, deployment="distill/nightly")
    assert run2.state.is_completed(), prefect.logs()

    index = json.loads((tmp_path / "runs" / "series" / "grow" / "series.json").read_text())
    first, second = (RunStore.open_existing(r["run_dir"]) for r in index["runs"])
    made = [s.stage_state("generate").counts["output"] for s in (first, second)]
    # the second run's SFT trained on both runs' dialogues
    assert second.stage_state("sft").counts == {"input": sum(made), "output": sum(made), "failed": 0,
                                                "new": made[1], "earlier": made[0], "earlier_runs": 1}
    assert index["runs"][1]["trained_on"] == [first.url] and index["runs"][1]["data"] == "accumulate"
    # the first model became current; the second was not evaluated against it, so it is not promoted
    assert index["current_model"] == first.join("sft", "model")
    assert index["runs"][1]["promotion"]["promote"] is False and "evaluate" in index["runs"][1]["promotion"]["reason"]

    assert _task_graph(prefect, run2.id) == {"generate": {}, "sft": {"wait_for": ["generate"]}}
    artifacts = _client_call(prefect, lambda c: c.read_artifacts())
    gates = [a for a in artifacts if a.key == "series-grow-promotion"]
    assert len(gates) == 2 and any("not promoted" in a.data and "lower bound" in a.data for a in gates)
    progress = {a.key: a.data for a in artifacts if a.key and a.key.endswith("-sft-progress")}
    assert len(progress) == 2 and all(v == 100.0 for v in progress.values()), progress


@BOTH
def test_teacher_key_from_a_secret_block_never_reaches_parameters_logs_or_artifacts(prefect, tmp_path):
    from prefect.blocks.system import Secret

    sentinel = f"sk-SENTINEL-{uuid.uuid4().hex}"
    with prefect.client_settings():
        Secret(value=sentinel).save("teacher-key-test", overwrite=True)
    with ToyTeacher(ToyTeacherConfig(api_key=sentinel)) as toy:
        run = _run(prefect, {"recipe_path": "configs/quickstart.yaml", "stages": ["generate"],
                             "run_name": "secret-run",
                             "overrides": [f"storage.root={tmp_path / 'runs'}", f"teacher.base_url={toy.base_url}",
                                           "teacher.api_key_env=ZD_TEST_TEACHER_KEY",
                                           "teacher.api_key_secret_block=teacher-key-test",
                                           "prompts.count=40", "generate.max_rounds=1"]})
        assert run.state.is_completed(), prefect.logs()
        assert toy.stats()["outcomes"]["ok"] >= 30  # the key did reach the teacher

    def everything(client):
        from prefect.client.schemas.filters import LogFilter, LogFilterFlowRunId

        runs = client.read_flow_runs()
        logs = client.read_logs(LogFilter(flow_run_id=LogFilterFlowRunId(any_=[r.id for r in runs])))
        artifacts = client.read_artifacts()
        return ([r.parameters for r in runs], [log.message for log in logs],
                [(a.data, a.description) for a in artifacts])

    params, logs, artifacts = _client_call(prefect, everything)
    assert logs and artifacts
    blob = json.dumps([params, logs, artifacts], default=str)
    assert sentinel not in blob
    for path in (tmp_path / "runs").rglob("*"):
        if path.is_file():
            assert sentinel.encode() not in path.read_bytes(), path


def test_prefect_yaml_declares_what_distill_deploy_registers(repo_root):
    import yaml
    from prefect.flows import load_flow_from_entrypoint

    from pipeline.flows.deploy import deployment_specs

    declared = yaml.safe_load((repo_root / "prefect.yaml").read_text())["deployments"]
    got = {(d["entrypoint"], d["name"], d["work_pool"]["name"]) for d in declared}
    want = {(s["entrypoint"], s["name"], s["pool"]) for s in deployment_specs(cron="0 2 * * *")}
    assert got == want
    for d in declared:  # as a worker whose working directory is the source tree loads them
        loaded = load_flow_from_entrypoint(str(repo_root / d["entrypoint"]), use_placeholder_flow=False)
        assert loaded.fn.__name__ == d["entrypoint"].split(":")[1]


def _small_quickstart(root: Path, teacher_url: str, run_name: str) -> dict:
    return {"recipe_path": "configs/quickstart.yaml", "run_name": run_name,
            "overrides": [f"storage.root={root}", f"teacher.base_url={teacher_url}", "teacher.api_key_env=null",
                          "compute.gpu_pool=gpu", "prompts.count=80", "generate.max_rounds=2",
                          "sft.args.num_train_epochs=1", "dpo.args.num_train_epochs=1",
                          "evaluate.heldout_count=20"]}


def _flow_runs(env: PrefectEnv):
    def read(client):
        runs = client.read_flow_runs()
        deps = {d.id: f"{client.read_flow(d.flow_id).name}/{d.name}" for d in client.read_deployments()}
        return [(deps.get(r.deployment_id), r) for r in runs]

    return _client_call(env, read)


@pytest.mark.slow
@POSTGRES
def test_quickstart_through_deployments_dispatches_gpu_stages_to_the_gpu_pool(prefect, tmp_path):
    with ToyTeacher(ToyTeacherConfig(error_rate=0.3)) as toy:
        run = _run(prefect, _small_quickstart(tmp_path / "runs", toy.base_url, "e2e"), timeout=900)
        assert run.state.is_completed(), prefect.logs()
        assert max(toy.stats()["ok_keys"].values()) == 1
    children = {dep: r for dep, r in _flow_runs(prefect) if r.parent_task_run_id and dep}
    for stage in ("sample", "sft", "dpo", "evaluate"):
        assert children[f"{stage}/gpu"].work_pool_name == "gpu" and children[f"{stage}/gpu"].state.is_completed()
    assert run.work_pool_name == "cpu"
    store = RunStore(tmp_path / "runs", "e2e")
    assert all(store.stage_state(s).status == "completed" for s in STAGE_NAMES)
    keys = {a.key for a in _client_call(prefect, lambda c: c.read_artifacts()) if a.key}
    assert {"e2e-summary", "e2e-costs", "e2e-run-dir", "e2e-generate-samples", "e2e-feedback-samples",
            "e2e-generate-progress", "e2e-sft-progress", "e2e-dpo-progress"} <= keys
    summary = next(a for a in _client_call(prefect, lambda c: c.read_artifacts()) if a.key == "e2e-summary")
    assert "data:image/png;base64," in summary.data and "| evaluate | running |" not in summary.data
    assert "](scores.png)" not in summary.data  # no link the UI cannot follow


@pytest.mark.slow
@SQLITE
def test_ui_retry_of_a_failed_run_reruns_only_dpo(prefect, tmp_path):
    from prefect.states import Scheduled

    root = tmp_path / "runs"
    (root / "retry").mkdir(parents=True)
    (root / "retry" / "dpo").write_text("a file where dpo wants its directory: the injected failure")
    with ToyTeacher(ToyTeacherConfig(error_rate=0.3)) as toy:
        run = _run(prefect, _small_quickstart(root, toy.base_url, "retry"), timeout=900)
        assert run.state.is_failed(), prefect.logs()
        store = RunStore(root, "retry")
        assert store.stage_state("dpo").status == "failed"
        assert store.stage_state("evaluate").status == "pending"
        before = toy.stats()
        (root / "retry" / "dpo").unlink()
        # a person presses Retry after the failed run's process has exited; retried while the worker still
        # tracks it, Prefect's process worker crashes ("this borrower is already holding ... tokens")
        _wait_for_process_exit(run.infrastructure_pid)
        # what the UI's Retry button does
        _client_call(prefect, lambda c: c.set_flow_run_state(run.id, Scheduled(name="AwaitingRetry"), force=True))
        from pipeline.flows.distill import wait_for_final_state

        with prefect.client_settings():
            run = wait_for_final_state(run.id, poll_s=1, timeout_s=900)
        assert run.state.is_completed(), prefect.logs()
        stats = toy.stats()
    assert max(stats["ok_keys"].values()) == 1  # no teacher request repeated

    def judge_calls(st: dict) -> int:
        return st["roles_ok"].get("single_judge", 0) + st["roles_ok"].get("pairwise_judge", 0)

    # after the retry only evaluate (the judge) talked to the teacher: generate and feedback were not re-run
    assert stats["outcomes"]["ok"] - before["outcomes"]["ok"] == judge_calls(stats) - judge_calls(before) > 0
    children = [(dep, r) for dep, r in _flow_runs(prefect) if dep and r.parent_task_run_id
                and r.parameters.get("request", {}).get("run_name") == "retry"]
    by_dep = {}
    for dep, r in children:
        by_dep.setdefault(dep, []).append(r)
    assert {d: len(rs) for d, rs in by_dep.items()} == {"sample/gpu": 1, "sft/gpu": 1, "dpo/gpu": 1,
                                                         "evaluate/gpu": 1}
    assert by_dep["dpo/gpu"][0].run_count == 2 and by_dep["sft/gpu"][0].run_count == 1
    assert all(store.stage_state(s).status == "completed" for s in STAGE_NAMES)


def _wait_for_process_exit(infrastructure_pid: str | None, timeout_s: float = 120) -> None:
    """Wait until a process worker's flow-run process (`host:pid`) is gone, and the worker has reaped it."""
    import os
    import time

    pid = int(str(infrastructure_pid).rsplit(":", 1)[-1]) if infrastructure_pid else None
    deadline = time.monotonic() + timeout_s
    while pid and time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            break
        time.sleep(0.5)
    time.sleep(3)  # the worker releases the run's slot once it has waited for the process


@BOTH
def test_gpu_limit_is_created_by_the_flow_when_missing_and_counts_gpus(prefect, tmp_path):
    """`prefect deploy --all` creates no limit: the first GPU stage does, sized $ZEPHYR_DISTILL_GPUS; a stage
    takes compute.num_gpus slots, and one needing more GPUs than the limit has fails at once, saying so."""
    from prefect.exceptions import ObjectNotFound

    def limit(client):
        try:
            return client.read_global_concurrency_limit_by_name("zephyr-distill-gpu").limit
        except ObjectNotFound:
            return None

    _client_call(prefect, lambda c: c.delete_global_concurrency_limit_by_name("zephyr-distill-gpu"))
    assert _client_call(prefect, limit) is None
    base = {"storage": {"root": str(tmp_path / "runs")}}
    recipe = {**load_recipe(QUICKSTART).snapshot(), **base}
    # sft of a run without generate data: the stage fails after taking its GPU slot, which is all we need
    run = _run(prefect, {"recipe": recipe, "run_name": "no-data"}, deployment="sft/gpu", timeout=300)
    assert run.state.is_failed() and "generate" in (run.state.message or ""), run.state.message
    assert _client_call(prefect, limit) == 2  # the workers' ZEPHYR_DISTILL_GPUS
    big = {**recipe, "compute": {**recipe["compute"], "num_gpus": 3}}
    run = _run(prefect, {"recipe": big, "run_name": "too-big"}, deployment="sft/gpu", timeout=300)
    assert run.state.is_failed() and "needs 3 GPUs" in (run.state.message or ""), run.state.message
    res = prefect.run(DISTILL, "deploy", "--gpus", "4")
    assert res.returncode == 0, res.stderr[-2000:]
    assert _client_call(prefect, limit) == 4
    res = prefect.run(DISTILL, "deploy", "--cron", "0 2 * * *")  # back to the module's setup: one GPU
    assert res.returncode == 0 and _client_call(prefect, limit) == 1


@pytest.mark.slow
@SQLITE
def test_an_inline_recipe_from_the_form_with_learning_rate_2e_5_trains(prefect, tmp_path):
    # YAML 1.1 (yaml.safe_load) reads 2e-5 as a string; the form's recipe goes through the recipe loader
    recipe_yaml = f"""
name: inline-lr
task: toy
teacher: {{base_url: builtin, model: toy-teacher, api_key_env: null}}
prompts: {{source: task, count: 40}}
generate: {{max_rounds: 1, temperature: 0.0, max_tokens: 64}}
sft:
  student: {{hidden_size: 32, num_layers: 1}}
  args:
    learning_rate: 2e-5
    max_steps: 4
    per_device_train_batch_size: 8
    logging_steps: 1
storage: {{root: {tmp_path / 'runs'}}}
"""
    run = _run(prefect, {"recipe_yaml": recipe_yaml, "stages": ["generate", "sft"], "run_name": "inline-lr"})
    assert run.state.is_completed(), prefect.logs()
    store = RunStore(tmp_path / "runs", "inline-lr")
    assert store.read_manifest()["recipe"]["sft"]["args"]["learning_rate"] == 2e-5
    metrics = json.loads((tmp_path / "runs" / "inline-lr" / "sft" / "metrics.json").read_text())
    rates = [h["learning_rate"] for h in metrics["history"] if "learning_rate" in h]
    assert metrics["global_step"] == 4 and rates and 0 < max(rates) <= 2e-5
