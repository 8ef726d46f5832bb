"""Prefect flows: one per stage plus the parent `distill` flow. Orchestration only; the work is in `pipeline`."""

from __future__ import annotations

import logging
import os
import time
from dataclasses import asdict
from typing import Any
from uuid import UUID

from prefect import Flow, flow, get_client, get_run_logger, task
from prefect.client.schemas.objects import FlowRun
from prefect.context import TaskRunContext
from prefect.deployments import run_deployment
from prefect.states import Scheduled
from prefect.utilities.annotations import quote

from pipeline.core.recipe import Recipe, all_endpoints
from pipeline.core.stage import StageReport
from pipeline.core.store import RunStore
from pipeline.flows.artifacts import ProgressArtifact, publish_promotion, publish_run_summary, publish_stage
from pipeline.flows.gpus import GPU_CONCURRENCY_LIMIT, check_fits, ensure_gpu_limit, stage_gpus
from pipeline.flows.params import DistillRequest, StageRequest
from pipeline.run.checks import check_settings
from pipeline.run.errors import StageFailed, explained, quiet_known_tracebacks
from pipeline.run.registry import STAGE_NAMES, STAGES, fingerprint
from pipeline.run.runner import open_run, run_stage
from pipeline.series.promotion import promotion_for_run, with_current_baseline
from pipeline.series.series import NothingNew, Series


def export_teacher_key(recipe: Recipe) -> None:
    """Read each endpoint's key from the Prefect Secret block the recipe names into its environment variable."""
    for t in all_endpoints(recipe).values():
        if t.api_key_secret_block and t.api_key_env and not os.environ.get(t.api_key_env):
            from prefect.blocks.system import Secret

            os.environ[t.api_key_env] = Secret.load(t.api_key_secret_block).get()


def _stage_cache_key(context: TaskRunContext, params: dict[str, Any]) -> str:
    # Reused only by a retry of the same flow run (the UI's Retry): across runs the store's fingerprints decide.
    return f"{context.task_run.flow_run_id}-{params['stage']}-{params['fp']}"


def _execute(stage: str, recipe: Recipe, run_name: str, force: bool) -> dict[str, Any]:
    """Run one stage in this process, with the progress bar going to a Prefect progress artifact."""
    store = RunStore(recipe.storage.root, run_name)
    with ProgressArtifact.installed(run_name, stage):
        report = run_stage(stage, recipe, store, force=force)  # starts the servers the stage uses
    publish_stage(stage, store, report)
    return asdict(report)


@task(name="run-stage", task_run_name="{stage}", persist_result=True, cache_key_fn=_stage_cache_key)
def run_stage_task(stage: str, recipe: dict[str, Any], run_name: str, fp: str, force: bool) -> dict[str, Any]:
    """A whole stage as one task (never one task per item)."""
    return _execute(stage, Recipe.model_validate(recipe), run_name, force)


@task(name="dispatch-stage", task_run_name="{stage} on {pool}", persist_result=True,
      cache_key_fn=_stage_cache_key)
def dispatch_stage(stage: str, recipe: dict[str, Any], run_name: str, fp: str, force: bool,
                   pool: str) -> dict[str, Any]:
    """Run a GPU stage through its deployment on the gpu pool, exactly once per run and fingerprint."""
    log = get_run_logger()
    request = StageRequest(recipe=recipe, run_name=run_name, force=force)
    child: FlowRun = run_deployment(f"{stage}/{pool}", parameters={"request": request.model_dump()},
                                    idempotency_key=f"{run_name}:{stage}:{fp}", timeout=0, as_subflow=True,
                                    _sync=True)
    if child.state and child.state.is_final() and not child.state.is_completed():
        # The same child failed in an earlier attempt of this run: retry it as the UI would, not a second run.
        with get_client(sync_client=True) as client:
            client.set_flow_run_state(child.id, Scheduled(name="AwaitingRetry"), force=True)
        log.info("retrying %s flow run %s", stage, child.id)
    child = wait_for_final_state(child.id)
    if not child.state.is_completed():
        raise StageFailed(f"stage '{stage}' on work pool '{pool}' ended {child.state.name}: "
                          f"{child.state.message or 'see flow run ' + str(child.id)}")
    state = RunStore(Recipe.model_validate(recipe).storage.root, run_name).stage_state(stage)
    return asdict(StageReport(stage, state.status, state.counts, state.cost, state.outputs, state.message))


def wait_for_final_state(flow_run_id: UUID, poll_s: float = 2.0, timeout_s: float | None = None) -> FlowRun:
    """Poll a flow run until it is final (Prefect's own waiter is async-only)."""
    deadline = None if timeout_s is None else time.monotonic() + timeout_s
    with get_client(sync_client=True) as client:
        while True:
            run = client.read_flow_run(flow_run_id)
            if run.state is not None and run.state.is_final():
                return run
            if deadline is not None and time.monotonic() > deadline:
                raise TimeoutError(f"flow run {flow_run_id} is still {run.state.name if run.state else 'pending'}")
            time.sleep(poll_s)


def _stage_flow(stage: str, request: StageRequest) -> dict[str, Any]:
    with explained():
        return _stage_flow_body(stage, request)


def _stage_flow_body(stage: str, request: StageRequest) -> dict[str, Any]:
    recipe = request.load()
    export_teacher_key(recipe)
    needed = stage_gpus(stage, recipe)
    if not needed:
        return _execute(stage, recipe, request.run_name, request.force)
    from prefect.concurrency.sync import concurrency

    # a stage occupies as many slots of the limit as it uses GPUs, so two runs never share one
    check_fits(needed, ensure_gpu_limit())
    with concurrency(GPU_CONCURRENCY_LIMIT, occupy=needed, strict=True):
        return _execute(stage, recipe, request.run_name, request.force)


def stage_flow(stage: str) -> Flow:
    """The flow of one stage of the registry (its deployment's entrypoint is `flows/distill.py:<stage>_flow`)."""

    def run_one(request: StageRequest) -> dict[str, Any]:
        return _stage_flow(stage, request)

    run_one.__name__ = run_one.__qualname__ = f"{stage}_flow"
    run_one.__doc__ = STAGES[stage].about
    return flow(run_one, name=stage, persist_result=True)


STAGE_FLOWS: dict[str, Flow] = {name: stage_flow(name) for name in STAGE_NAMES}
globals().update({fl.fn.__name__: fl for fl in STAGE_FLOWS.values()})  # importable by the entrypoints' names


def _run_name(request: DistillRequest, recipe: Recipe) -> str:
    if request.run_name:
        return request.run_name
    if request.series:
        return f"{request.series}-{time.strftime('%Y%m%d-%H%M%S', time.gmtime())}"
    return recipe.name


@flow(name="distill", persist_result=True)
def distill(request: DistillRequest = DistillRequest()) -> dict[str, Any]:  # noqa: B008 - the UI's default form
    """Chain the stages of one distillation run; GPU stages go to the gpu pool when the recipe names one.
    A known error fails the run with its message (stage, what went wrong, what to do), not a class name."""
    with explained():
        return run_chain(request)


def run_chain(request: DistillRequest) -> dict[str, Any]:
    log = get_run_logger()
    recipe = request.load()
    check_settings(recipe, list(request.stages))  # a bad TRL argument fails now, not hours later
    export_teacher_key(recipe)
    store = open_run(recipe, _run_name(request, recipe))
    series = Series(recipe, request.series) if request.series else None
    current = series.current_model if series else None
    if series:
        try:
            recipe = series.prepare_run(recipe, store)
        except NothingNew as exc:
            log.info("%s", exc)
            return {"run_name": store.run_name, "status": "nothing new", "stages": {}}
        # the promotion gate: the new model is judged against the series' current one
        recipe = with_current_baseline(recipe, current)
        store.init_manifest(recipe.snapshot(), store.read_manifest().get("versions", {}))
    log.info("run %s in %s", store.run_name, store.url)
    snapshot, pool, reports = recipe.snapshot(), recipe.compute.gpu_pool, {}
    status = "failed"
    try:
        memo: dict[str, str] = {}
        previous = None
        for stage in request.stages:
            fp = fingerprint(stage, recipe, memo)
            # the task graph draws the chain: each stage waits for the one before it, and the recipe is quoted
            # so Prefect does not take values inside it for results of earlier stages
            if pool and stage_gpus(stage, recipe):  # a served vllm teacher puts its stages there too
                state = dispatch_stage(stage, quote(snapshot), store.run_name, fp, request.force, pool,
                                       wait_for=[previous] if previous else None, return_state=True)
            else:
                state = run_stage_task(stage, quote(snapshot), store.run_name, fp, request.force,
                                       wait_for=[previous] if previous else None, return_state=True)
            reports[stage] = state.result()  # raises the stage's error
            previous = state
        status = "completed"
    finally:
        publish_run_summary(store)
        if series:
            promotion = promotion_for_run(store, current) if status == "completed" else None
            entry = series.record(store, status, promotion=promotion)
            if promotion:
                log.info("series %s: %s", series.name, promotion.get("reason", promotion))
                publish_promotion(series.name, store, promotion)
            log.info("series %s: run %s recorded, model %s", series.name, store.run_name, entry.model)
    return {"run_name": store.run_name, "run_dir": store.url, "status": status, "stages": reports}


logging.getLogger("pipeline").setLevel(logging.INFO)
quiet_known_tracebacks()
