"""What `distill status` shows of a run: a row per stage, the loud-drop warnings and what previews paid, read
from the manifest, the spend ledger and each stage's stats.json. It imports no stage (nor the registry, which
imports them all), so that status answers in a fraction of a second whatever the run's size."""

from __future__ import annotations

from typing import Any

from pipeline.core.rounds import round_store, split_key
from pipeline.core.store import RunStore, StageState
from pipeline.review.answers import review_path
from pipeline.review.report import status_line
from pipeline.run.rounds import read_summary
from pipeline.teacher.spend import spend_summary

PREVIEW_LABEL = "preview"  # a preview's spend is ledgered under `preview:<stage>` (pipeline.run.preview)


def run_stages(store: RunStore) -> list[str]:
    """The run's stages in order, from its manifest; the registry's list only for a manifest without any."""
    if names := store.stage_names():
        return names
    from pipeline.run.registry import STAGE_NAMES  # loads every stage: only for a run that recorded none

    return list(STAGE_NAMES)


def status_rows(store: RunStore, spend: dict | None = None) -> list[dict[str, object]]:
    """One row per stage for `distill status`; dollars from the spend ledger (killed and reset attempts too)."""
    stages = store.read_manifest().get("stages", {})
    paid = (spend or spend_summary(store))["stages"]
    stopped = read_summary(store).get("stopped_after")
    rows = []
    for name in run_stages(store):
        st = StageState(**stages[name]) if name in stages else StageState()
        if stopped and split_key(name)[1] > stopped and st.status == "pending":
            st.status, st.message = "not run", f"round {stopped} did not beat its policy: the loop ended there"
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
    for name in run_stages(store):
        stage, round_ = split_key(name)
        stats = store.read_json(round_store(store, round_).join(stage, "stats.json"), {}) or {}
        lines += [f"{name}: {w}" for w in stats.get("warnings", [])]
    return lines


def review_lines(store: RunStore) -> list[str]:
    """A line per round with a review (feedback.review): agreement, swaps, drops; or where it waits."""
    return [line for r in _rounds(store) if (line := status_line(round_store(store, r)))]


def review_reports(store: RunStore) -> dict[str, dict]:
    """{round: its review's report.json} for the rounds with a recorded review (`distill status --json`)."""
    reports = {str(r): store.read_json(review_path(round_store(store, r), "report.json")) for r in _rounds(store)}
    return {r: report for r, report in reports.items() if report}


def _rounds(store: RunStore) -> list[int]:
    return sorted({split_key(name)[1] for name in run_stages(store)})


def preview_spend(spend: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """What previews of a run paid, per stage, from its spend summary (pipeline.teacher.spend)."""
    prefix = f"{PREVIEW_LABEL}:"
    return {key.removeprefix(prefix): paid for key, paid in spend["stages"].items() if key.startswith(prefix)}
