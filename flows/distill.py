"""Prefect flows: one per stage plus the parent `distill` flow. Orchestration only; the work is in `pipeline`."""

from __future__ import annotations

import itertools
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
from pipeline.core.rounds import ROUND_STAGES, round_store, split_key, stage_key
from pipeline.core.stage import StageReport
from pipeline.core.store import RunStore
from pipeline.flows.artifacts import (
    ProgressArtifact,
    publish_promotion,
    publish_rounds,
    publish_run_summary,
    publish_stage,
)
from pipeline.flows.gpus import GPU_CONCURRENCY_LIMIT, check_fits, ensure_gpu_limit, stage_gpus
from pipeline.flows.params import DistillRequest, StageRequest
from pipeline.flows.review import review_before_dpo
from pipeline.run.checks import check_settings
from pipeline.run.errors import StageFailed, explained, quiet_known_tracebacks
from pipeline.run.registry import STAGE_NAMES, STAGES, fingerprint
from pipeline.run.rounds import read_summary, record_round, still_running
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


def _execute(key: str, recipe: Recipe, run_name: str, force: bool) -> dict[str, Any]:
    """Run one stage (`dpo`, a later round's `dpo@2`) in this process, with the progress bar going to a
    Prefect progress artifact."""
    store = RunStore(recipe.storage.root, run_name)
    with ProgressArtifact.installed(run_name, key):
        report = run_stage(key, recipe, store, force=force)  # starts the servers the stage uses
    stage, round_ = split_key(key)
    publish_stage(key, round_store(store, round_), report, stage)
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
    kind, round_ = split_key(stage)
    request = StageRequest(recipe=recipe, run_name=run_name, force=force, round=round_)
    child: FlowRun = run_deployment(f"{kind}/{pool}", parameters={"request": request.model_dump()},
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
    run = RunStore(Recipe.model_validate(recipe).storage.root, run_name)
    state = round_store(run, round_).stage_state(kind)
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
    key = stage_key(stage, request.round)
    needed = stage_gpus(key, recipe)
    if not needed:
        return _execute(key, recipe, request.run_name, request.force)
    from prefect.concurrency.sync import concurrency

    # a stage occupies as many slots of the limit as it uses GPUs, so two runs never share one
    check_fits(needed, ensure_gpu_limit())
    with concurrency(GPU_CONCURRENCY_LIMIT, occupy=needed, strict=True):
        return _execute(key, recipe, request.run_name, request.force)


def stage_flow(stage: str) -> Flow:
    """The flow of one stage of the registry (its deployment's entrypoint is `flows/distill.py:<stage>_flow`)."""

    def run_one(request: StageRequest) -> dict[str, Any]:
        return _stage_flow(stage, request)

    run_one.__name__ = run_one.__qualname__ = f"{stage}_flow"
    run_one.__doc__ = STAGES[stage].about
    return flow(run_one, name=stage, persist_result=True)


STAGE_FLOWS: dict[str, Flow] = {name: stage_flow(name) for name in STAGE_NAMES}
globals().update({fl.fn.__name__: fl for fl in STAGE_FLOWS.values()})  # importable by the entrypoints' names


def _group(key: str, recipe: Recipe) -> int:
    """The round a stage is drawn in as a group of the parent's graph; 0 for the parent's own chain."""
    stage, round_ = split_key(key)
    return round_ if recipe.dpo.rounds > 1 and stage in ROUND_STAGES else 0


def run_keys(keys: list[str], recipe: Recipe, store: RunStore, force: bool, reports: dict[str, Any],
             previous: Any = None) -> Any:
    """Run stages as a chain of tasks (GPU ones through the gpu pool's deployments); the last task's state."""
    pool, snapshot, memo = recipe.compute.gpu_pool, recipe.snapshot(), {}
    for key in keys:
        if STAGES[split_key(key)[0]].reads_review:
            review_before_dpo(key, recipe, store)  # pauses for a person (feedback.review): dpo's fingerprint holds it
        fp = fingerprint(key, recipe, memo, store)
        # the task graph draws the chain: each stage waits for the one before it, and the recipe is quoted so
        # Prefect does not take values inside it for results of earlier stages
        wait = [previous] if previous else None
        if pool and stage_gpus(key, recipe):  # a served vllm teacher puts its stages there too
            state = dispatch_stage(key, quote(snapshot), store.run_name, fp, force, pool, wait_for=wait,
                                   return_state=True)
        else:
            state = run_stage_task(key, quote(snapshot), store.run_name, fp, force, wait_for=wait,
                                   return_state=True)
        reports[key] = state.result()  # raises the stage's error
        previous = state
        if split_key(key)[0] == "evaluate":
            record_round(store, recipe, split_key(key)[1])
    return previous


@flow(name="round", flow_run_name="round {round_}", persist_result=True)
def round_flow(recipe: dict[str, Any], run_name: str, round_: int, keys: list[str], force: bool) -> dict[str, Any]:
    """One on-policy round: its sample, feedback, dpo and evaluate; whether the round is kept, and its stages'
    reports."""
    rec = Recipe.model_validate(recipe)
    store, reports = RunStore(rec.storage.root, run_name), {}
    run_keys(keys, rec, store, force, reports)
    decision = next((e for e in read_summary(store).get("rounds", []) if e["round"] == round_), None)
    if decision is not None and any(split_key(k)[0] == "evaluate" for k in keys):
        get_run_logger().info("round %d %s: %s", round_, "kept" if decision["kept"] else "not kept",
                              decision["reason"])
    return {"kept": decision is None or decision["kept"], "stages": reports}


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
    keys = request.stage_keys(recipe)
    check_settings(recipe, sorted({split_key(k)[0] for k in keys}))  # a bad TRL argument fails now, not later
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
    reports: dict[str, Any] = {}
    force, status = request.force or request.from_round is not None, "failed"
    try:
        previous = None
        for round_, group in itertools.groupby(keys, key=lambda k: _group(k, recipe)):
            group = [k for k in group if still_running(store, k)]
            if not round_:  # generate and sft, or a run of one round: the parent's own chain
                previous = run_keys(group, recipe, store, force, reports, previous)
                continue
            if not group:
                break
            outcome = round_flow(quote(recipe.snapshot()), store.run_name, round_, group, force)
            reports.update(outcome["stages"])
            if not outcome["kept"]:
                break  # the round did not beat its policy: the loop ends
        status = "completed"
    finally:
        publish_run_summary(store)
        publish_rounds(store)
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
