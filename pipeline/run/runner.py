"""Runs stages against a run store: skip what is done, resume what is partial, record state."""

from __future__ import annotations

import importlib.metadata
import logging
import platform
import time
from collections.abc import Iterator
from contextlib import contextmanager

from pipeline.core.heap import steady_heap
from pipeline.core.recipe import Recipe, all_endpoints
from pipeline.core.rounds import ROUND_STAGES, round_store, split_key
from pipeline.core.stage import StageReport
from pipeline.core.store import RunStore, StageState
from pipeline.review.answers import ReviewPending
from pipeline.review.gate import require_review
from pipeline.run.checks import check_settings
from pipeline.run.errors import StageFailed
from pipeline.run.registry import STAGE_NAMES, STAGES, fingerprint, stage_inputs
from pipeline.run.rounds import record_round, round_keys, round_recipe, still_running
from pipeline.teacher.serving import serving_endpoints

log = logging.getLogger("pipeline")


def package_versions() -> dict[str, str]:
    versions = {"python": platform.python_version()}
    for dist in ("zephyr-distill", "torch", "transformers", "trl", "datasets", "openai", "prefect"):
        try:
            versions[dist] = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            versions[dist] = "not installed"
    return versions


def open_run(recipe: Recipe, run_name: str | None = None) -> RunStore:
    """Create or reopen the run directory and record the recipe snapshot and versions."""
    store = RunStore(recipe.storage.root, run_name or recipe.name)
    store.init_manifest(recipe.snapshot(), package_versions(), plan(recipe))
    return store


@contextmanager
def teacher_endpoint(recipe: Recipe) -> Iterator[Recipe]:
    """Every endpoint that needs a server of its own (the task's built-in teacher, served models) reachable
    until exit, for code that calls stages' functions directly; `run_stage` starts only what its stage uses."""
    with serving_endpoints(recipe, all_endpoints(recipe)):
        yield recipe


def check_inputs(key: str, recipe: Recipe, store: RunStore) -> None:
    for dep in stage_inputs(key, recipe):
        state = state_of(store, dep)
        want = fingerprint(dep, recipe, store=store)
        if state.status != "completed" or state.fingerprint != want:
            raise StageFailed(
                f"stage '{key}' reads the output of '{dep}', which is {state.status}"
                + (" with other settings" if state.status == "completed" else "")
                + f" in run {store.url}{why_missing(dep, recipe, store)}; run `distill stage {dep}` "
                "(or `distill run`) with this recipe first" + evaluate_way_out(key, dep, recipe)
            )


def state_of(store: RunStore, key: str) -> StageState:
    """The manifest's state of stage `key` (`dpo`, `dpo@2`)."""
    stage, round_ = split_key(key)
    return round_store(store, round_).stage_state(stage)


def why_missing(dep: str, recipe: Recipe, store: RunStore, seen: frozenset[str] = frozenset()) -> str:
    """Why a stage has no output: its own failure, or the failure of a stage before it (from the manifest)."""
    state = state_of(store, dep)
    if state.status == "failed":
        return f" ({dep} failed: {state.message.splitlines()[0] if state.message else 'no message'})"
    for up in stage_inputs(dep, recipe):
        if up not in seen and (reason := why_missing(up, recipe, store, seen | {dep})):
            return reason
    return ""


def evaluate_way_out(key: str, dep: str, recipe: Recipe) -> str:
    """evaluate asked for a model that does not exist: the models setting that evaluates what does."""
    if key != "evaluate":
        return ""
    rest = [m for m in recipe.evaluate.models if m != dep]
    return (f", or evaluate the models that exist: --set 'evaluate.models=[{', '.join(rest)}]'"
            + (f" --set evaluate.baseline={rest[0]}" if recipe.evaluate.baseline == dep and rest else ""))


def run_stage(key: str, recipe: Recipe, store: RunStore, force: bool = False) -> StageReport:
    """Run one stage (`dpo`, or a later round's `dpo@2`) unless a completed run with the same fingerprint
    exists."""
    try:
        stage, round_ = split_key(key)
    except ValueError as exc:
        raise StageFailed(str(exc)) from None
    if stage not in STAGES:
        raise StageFailed(f"unknown stage '{key}'; the stages are {', '.join(STAGE_NAMES)}")
    rrecipe, rstore = round_recipe(recipe, round_), round_store(store, round_)
    fp, state = fingerprint(key, recipe, store=store), rstore.stage_state(stage)
    if state.status == "completed" and state.fingerprint == fp and not force:
        log.info("%s: completed earlier with the same fingerprint %s, skipped", key, fp)
        return StageReport(key, "completed", state.counts, state.cost, state.outputs,
                           "skipped: already completed", skipped=True)
    check_inputs(key, recipe, store)
    if STAGES[stage].reads_review:
        try:
            require_review(recipe, store, round_)  # stops here, the stage untouched, until a person reviewed
        except ReviewPending as exc:
            exc.stage = key
            raise
    if force or (state.fingerprint and state.fingerprint != fp):
        log.info("%s: settings or inputs changed (%s -> %s); starting the stage afresh", key, state.fingerprint, fp)
        rstore.reset_stage(stage)
        state = StageState()
    state = StageState(fingerprint=fp, status="running", started_at=time.time(), counts=state.counts,
                       cost=state.cost)
    rstore.set_stage_state(stage, state)
    t0 = time.perf_counter()
    try:
        # the servers of the endpoints it uses run for the stage alone, stopped however it ends
        with serving_endpoints(rrecipe, STAGES[stage].endpoints(rrecipe)), steady_heap():
            report = STAGES[stage].run(rrecipe, rstore)
    except BaseException as exc:
        exc.stage = key  # the CLI and the flows name the stage in the message
        state.status, state.message = "failed", f"{type(exc).__name__}: {exc}"
        state.seconds, state.finished_at = time.perf_counter() - t0, time.time()
        rstore.set_stage_state(stage, state)
        raise
    # a resumed stage's cost is what earlier attempts paid plus what this one paid
    state.cost = {k: state.cost.get(k, 0.0) + v for k, v in report.cost.items()}
    state.status, state.counts, state.outputs = report.status, report.counts, report.outputs
    state.message, state.seconds, state.finished_at = report.message, time.perf_counter() - t0, time.time()
    rstore.set_stage_state(stage, state)
    if report.status != "completed":
        raise StageFailed(f"stage '{key}' {report.status}: {report.message}")
    report.stage = key
    return report


def run_pipeline(recipe: Recipe, run_name: str | None = None, stages: list[str] | None = None,
                 force: bool = False) -> tuple[RunStore, list[StageReport]]:
    """Run the chosen stages in order (all by default: round 1's, then later rounds while each is kept) in
    one run directory."""
    keys = stages or plan(recipe)
    check_settings(recipe, sorted({split_key(k)[0] for k in keys}))
    store = open_run(recipe, run_name)
    reports = []
    for key in keys:
        if not still_running(store, key):
            continue
        reports.append(run_stage(key, recipe, store, force=force))
        if key.startswith("evaluate"):  # a round is complete: keep it or end the loop
            record_round(store, recipe, split_key(key)[1])
    return store, reports


def plan(recipe: Recipe) -> list[str]:
    """Every stage of a run in order: round 1's (the six stages), then those of rounds 2..dpo.rounds."""
    return [*STAGE_NAMES, *round_keys(recipe)]


def chosen_stages(recipe: Recipe, stages: list[str] | None, from_round: int | None = None) -> list[str]:
    """The stage keys a run executes: the whole plan, the `stages` named, or the rounds from `from_round` on
    (which a caller redoes with force)."""
    if from_round is not None:
        if from_round > recipe.dpo.rounds:
            raise StageFailed(f"--from-round {from_round}: the recipe has dpo.rounds={recipe.dpo.rounds}")
        return [k for k in plan(recipe) if split_key(k)[1] >= from_round and split_key(k)[0] in ROUND_STAGES]
    if not stages:
        return plan(recipe)
    order = {key: i for i, key in enumerate(plan(recipe))}
    beyond = [key for key in stages if key not in order]
    if beyond:
        raise StageFailed(f"{', '.join(beyond)}: not a stage of this recipe (dpo.rounds={recipe.dpo.rounds})")
    return sorted(dict.fromkeys(stages), key=order.__getitem__)

