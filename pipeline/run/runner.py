"""Runs stages against a run store: skip what is done, resume what is partial, record state."""

from __future__ import annotations

import importlib.metadata
import logging
import platform
import time
from collections.abc import Iterator
from contextlib import contextmanager

from pipeline.core.recipe import Recipe, all_endpoints
from pipeline.core.stage import StageReport
from pipeline.core.store import RunStore, StageState
from pipeline.run.checks import check_settings
from pipeline.run.errors import StageFailed
from pipeline.run.registry import STAGE_NAMES, STAGES, fingerprint
from pipeline.teacher.serving import serving_endpoints
from pipeline.teacher.spend import spend_summary

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
    store.init_manifest(recipe.snapshot(), package_versions(), list(STAGE_NAMES))
    return store


@contextmanager
def teacher_endpoint(recipe: Recipe) -> Iterator[Recipe]:
    """Every endpoint that needs a server of its own (the task's built-in teacher, served models) reachable
    until exit, for code that calls stages' functions directly; `run_stage` starts only what its stage uses."""
    with serving_endpoints(recipe, all_endpoints(recipe)):
        yield recipe


def check_inputs(name: str, recipe: Recipe, store: RunStore) -> None:
    for dep in STAGES[name].inputs(recipe):
        state = store.stage_state(dep)
        want = fingerprint(dep, recipe)
        if state.status != "completed" or state.fingerprint != want:
            raise StageFailed(
                f"stage '{name}' reads the output of '{dep}', which is {state.status}"
                + (" with other settings" if state.status == "completed" else "")
                + f" in run {store.url}{why_missing(dep, recipe, store)}; run `distill stage {dep}` "
                "(or `distill run`) with this recipe first" + evaluate_way_out(name, dep, recipe)
            )


def why_missing(dep: str, recipe: Recipe, store: RunStore, seen: frozenset[str] = frozenset()) -> str:
    """Why a stage has no output: its own failure, or the failure of a stage before it (from the manifest)."""
    state = store.stage_state(dep)
    if state.status == "failed":
        return f" ({dep} failed: {state.message.splitlines()[0] if state.message else 'no message'})"
    for up in STAGES[dep].inputs(recipe):
        if up not in seen and (reason := why_missing(up, recipe, store, seen | {dep})):
            return reason
    return ""


def evaluate_way_out(name: str, dep: str, recipe: Recipe) -> str:
    """evaluate asked for a model that does not exist: the models setting that evaluates what does."""
    if name != "evaluate":
        return ""
    rest = [m for m in recipe.evaluate.models if m != dep]
    return (f", or evaluate the models that exist: --set 'evaluate.models=[{', '.join(rest)}]'"
            + (f" --set evaluate.baseline={rest[0]}" if recipe.evaluate.baseline == dep and rest else ""))


def run_stage(name: str, recipe: Recipe, store: RunStore, force: bool = False) -> StageReport:
    """Run one stage unless a completed run with the same fingerprint exists."""
    if name not in STAGES:
        raise StageFailed(f"unknown stage '{name}'; the stages are {', '.join(STAGE_NAMES)}")
    fp = fingerprint(name, recipe)
    state = store.stage_state(name)
    if state.status == "completed" and state.fingerprint == fp and not force:
        log.info("%s: completed earlier with the same fingerprint %s, skipped", name, fp)
        return StageReport(name, "completed", state.counts, state.cost, state.outputs,
                           "skipped: already completed", skipped=True)
    check_inputs(name, recipe, store)
    if force or (state.fingerprint and state.fingerprint != fp):
        log.info("%s: settings or inputs changed (%s -> %s); starting the stage afresh", name, state.fingerprint, fp)
        store.reset_stage(name)
        state = StageState()
    state = StageState(fingerprint=fp, status="running", started_at=time.time(),
                       counts=state.counts, cost=state.cost)
    store.set_stage_state(name, state)
    t0 = time.perf_counter()
    try:
        # the servers of the endpoints it uses run for the stage alone, stopped however it ends
        with serving_endpoints(recipe, STAGES[name].endpoints(recipe)):
            report = STAGES[name].run(recipe, store)
    except BaseException as exc:
        exc.stage = name  # the CLI and the flows name the stage in the message
        state.status, state.message = "failed", f"{type(exc).__name__}: {exc}"
        state.seconds = time.perf_counter() - t0
        state.finished_at = time.time()
        store.set_stage_state(name, state)
        raise
    state.status = report.status
    # A resumed stage's cost is what earlier attempts paid plus what this one paid.
    prior = state.cost
    state.cost = {k: prior.get(k, 0.0) + v for k, v in report.cost.items()}
    state.counts, state.outputs = report.counts, report.outputs
    state.message, state.seconds, state.finished_at = report.message, time.perf_counter() - t0, time.time()
    store.set_stage_state(name, state)
    if report.status != "completed":
        raise StageFailed(f"stage '{name}' {report.status}: {report.message}")
    return report


def run_pipeline(recipe: Recipe, run_name: str | None = None, stages: list[str] | None = None,
                 force: bool = False) -> tuple[RunStore, list[StageReport]]:
    """Run the chosen stages in order (all by default) in one run directory."""
    check_settings(recipe, stages or list(STAGE_NAMES))
    store = open_run(recipe, run_name)
    reports = []
    for name in stages or STAGE_NAMES:
        reports.append(run_stage(name, recipe, store, force=force))
    return store, reports


def status_rows(store: RunStore, spend: dict | None = None) -> list[dict[str, object]]:
    """One row per stage for `distill status`; dollars from the spend ledger (killed and reset attempts too)."""
    stages = store.read_manifest().get("stages", {})
    paid = (spend or spend_summary(store))["stages"]
    rows = []
    for name in STAGE_NAMES:
        st = StageState(**stages[name]) if name in stages else StageState()
        rows.append({
            "stage": name,
            "status": st.status,
            "items": st.counts.get("output", 0),
            "failures": st.counts.get("failed", 0),
            "cost_usd": paid.get(name, {}).get("usd", st.cost.get("usd", 0.0)),
            "seconds": st.seconds,
            "fingerprint": st.fingerprint or "",
            "message": st.message,
        })
    return rows


def stage_warnings(store: RunStore) -> list[str]:
    """The loud-drop warnings each stage wrote to its stats.json, as `stage: WARNING ...` lines."""
    lines = []
    for name in STAGE_NAMES:
        stats = store.read_json(store.join(name, "stats.json"), {}) or {}
        lines += [f"{name}: {w}" for w in stats.get("warnings", [])]
    return lines
