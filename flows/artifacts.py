"""Prefect artifacts: progress of long stages, sample tables, costs and a summary per run."""

from __future__ import annotations

import base64
import contextlib
import itertools
import re
import time
from collections.abc import Iterator
from typing import Any

from prefect.artifacts import (
    create_link_artifact,
    create_markdown_artifact,
    create_progress_artifact,
    create_table_artifact,
    update_progress_artifact,
)
from prefect.context import FlowRunContext, TaskRunContext

from pipeline.core.progress import set_progress_factory
from pipeline.core.stage import StageReport
from pipeline.core.store import RunStore
from pipeline.run.rounds import read_summary, rounds_markdown, rounds_plot, rounds_table
from pipeline.run.status import stage_warnings, status_rows


def artifact_key(*parts: str) -> str:
    """Prefect keys allow lowercase letters, digits and dashes only."""
    return re.sub(r"-+", "-", re.sub(r"[^a-z0-9-]", "-", "-".join(parts).lower())).strip("-")[:120]


def _in_run() -> bool:
    return FlowRunContext.get() is not None or TaskRunContext.get() is not None


class ProgressArtifact:
    """A progress sink for `pipeline.core.progress` that updates a Prefect progress artifact (at most every 2 s)."""

    def __init__(self, run_name: str, stage: str, total: int | None, unit: str):
        self.total, self.done, self.unit, self.stage = total, 0, unit, stage
        self._last = 0.0
        self._id = create_progress_artifact(0.0, key=artifact_key(run_name, stage, "progress"),
                                            description=f"{stage}: {total or '?'} {unit}s")

    def update(self, n: int = 1) -> None:
        self.done += n
        now = time.monotonic()
        if self.total and (now - self._last > 2.0 or self.done >= self.total):
            self._last = now
            update_progress_artifact(self._id, min(100.0, 100.0 * self.done / self.total))

    def close(self) -> None:
        if self.total:
            update_progress_artifact(self._id, 100.0 * min(self.done, self.total) / self.total)

    def set_description(self, text: str) -> None:
        """A batch's status (validating, in_progress, ...) shown with its progress."""
        done = 100.0 * min(self.done, self.total) / self.total if self.total else 0.0
        update_progress_artifact(self._id, done, description=f"{text}: {self.done} of {self.total or '?'} {self.unit}s")

    @classmethod
    @contextlib.contextmanager
    def installed(cls, run_name: str, stage: str) -> Iterator[None]:
        if not _in_run():
            yield
            return
        set_progress_factory(lambda st, total, unit: cls(run_name, st, total, unit))
        try:
            yield
        finally:
            set_progress_factory(None)


def _short(text: Any, limit: int = 160) -> str:
    text = str(text).replace("\n", " ").replace("|", "/")
    return text if len(text) <= limit else text[:limit] + "…"


def _sample_rows(store: RunStore, stage: str) -> tuple[str, list[dict[str, Any]]] | None:
    if stage == "generate":
        rows = itertools.islice(store.read_records("generate"), 5)
        return "sample dialogues", [{"prompt": _short(r["prompt"]), "turns": len(r["messages"]),
                                     "last answer": _short(r["messages"][-1]["content"])} for r in rows]
    if stage == "feedback" and store.shard_paths("feedback", "pairs"):
        rows = itertools.islice(store.read_records("feedback", "pairs"), 5)
        return "sample preference pairs", [
            {"prompt": _short(r["prompt"]), "chosen": _short(r["chosen"][-1]["content"]),
             "score_chosen": r["score_chosen"], "rejected": _short(r["rejected"][-1]["content"]),
             "score_rejected": r["score_rejected"]} for r in rows]
    return None


def publish_stage(key: str, store: RunStore, report: StageReport, stage: str | None = None) -> None:
    """A markdown summary of the stage (`key`: `dpo`, or `dpo@2` with `store` its round's view) and, for data
    stages, a table of examples."""
    if not _in_run():
        return
    stage = stage or key
    create_markdown_artifact(stage_markdown(key, store, report, stage), key=artifact_key(store.run_name, key, "summary"),
                             description=f"{key} stage of {store.run_name}")
    sample = None if report.skipped else _sample_rows(store, stage)
    if sample and sample[1]:
        create_table_artifact(sample[1], key=artifact_key(store.run_name, key, "samples"),
                              description=f"{sample[0]} from {store.run_name}")


def stage_markdown(key: str, store: RunStore, report: StageReport, stage: str | None = None) -> str:
    """The stage's summary (`key`: `dpo`, or `dpo@2` with `store` its round's view): message, counts, cost,
    output directory and, for a training stage that reported to TensorBoard, where its curves are and the
    command that shows them."""
    counts = ", ".join(f"{k} {v}" for k, v in report.counts.items())
    text = (f"### {key} ({report.status})\n\n{report.message}\n\n- counts: {counts}\n"
            f"- teacher cost: ${report.cost.get('usd', 0.0):.4f}\n- output: `{store.join(stage or key)}`\n")
    curves = report.outputs.get("tensorboard")
    if curves:
        link = curves if "://" in curves else f"file://{curves}"
        text += f"- training curves (TensorBoard): [{curves}]({link}); `tensorboard --logdir {curves}`\n"
    return text


_IMAGE = re.compile(r"!\[([^\]]*)\]\(([\w.-]+\.png)\)")


def inline_images(markdown: str, store: RunStore) -> str:
    """report.md's plots as data: URIs: the UI has no route to files next to the report, but draws these."""
    def embed(match: re.Match[str]) -> str:
        path = store.join("evaluate", match.group(2))
        if not store.fs.exists(path):
            return match.group(0)
        with store.fs.open(path, "rb") as fh:
            return f"![{match.group(1)}](data:image/png;base64,{base64.b64encode(fh.read()).decode()})"

    return _IMAGE.sub(embed, markdown)


def publish_promotion(series: str, store: RunStore, decision: dict[str, Any]) -> None:
    """The series' promotion decision and its numbers, as a markdown artifact of the run."""
    if not _in_run():
        return
    verdict = "promoted: it becomes the series' current model" if decision.get("promote") else "not promoted"
    rows = [("candidate", decision.get("candidate_path") or decision.get("candidate")),
            ("current model (baseline)", decision.get("current_model") or decision.get("baseline_spec")),
            ("win rate", _fmt(decision.get("win_rate"))), ("standard error", _fmt(decision.get("stderr"))),
            ("k", _fmt(decision.get("k"))), ("lower bound (win rate - k s.e.)", _fmt(decision.get("lower_bound"))),
            ("must be above", _fmt(decision.get("min_win_rate"))), ("comparisons", decision.get("n")),
            ("wins / ties / losses", f"{decision.get('wins')} / {decision.get('ties')} / {decision.get('losses')}")]
    lines = [f"## Series `{series}`: run `{store.run_name}` {verdict}", "", str(decision.get("reason", "")), "",
             "| | |", "|---|---|"] + [f"| {k} | {'–' if v is None else v} |" for k, v in rows]
    create_markdown_artifact("\n".join(lines), key=artifact_key("series", series, "promotion"),
                             description=f"promotion gate of series {series} for run {store.run_name}")


def _fmt(value: Any) -> str | None:
    return None if value is None else f"{value:.3f}" if isinstance(value, float) else str(value)


def publish_rounds(store: RunStore) -> None:
    """The on-policy rounds: a table per round and a summary with the plot of the measure by round."""
    summary = read_summary(store)
    if not _in_run() or not summary.get("rounds"):
        return
    create_table_artifact(rounds_table(summary), key=artifact_key(store.run_name, "rounds"),
                          description=f"on-policy rounds of {store.run_name}")
    plot = base64.b64encode(rounds_plot(summary)).decode()
    create_markdown_artifact(rounds_markdown(summary, f"data:image/png;base64,{plot}"),
                             key=artifact_key(store.run_name, "rounds-summary"),
                             description=f"on-policy rounds of {store.run_name}: measure by round")


def publish_run_summary(store: RunStore) -> None:
    """Cost and time per stage, the run's status table, and a link to the run directory."""
    if not _in_run():
        return
    rows = status_rows(store)
    create_table_artifact(
        [{"stage": r["stage"], "status": r["status"], "items": r["items"], "failures": r["failures"],
          "cost_usd": round(float(r["cost_usd"]), 4), "seconds": round(float(r["seconds"]), 1)} for r in rows],
        key=artifact_key(store.run_name, "costs"), description=f"cost and time per stage of {store.run_name}")
    create_markdown_artifact(run_summary_markdown(store, rows), key=artifact_key(store.run_name, "summary"),
                             description=f"summary of run {store.run_name}")
    link = store.url if "://" in store.url else f"file://{store.url}"
    create_link_artifact(link, link_text=store.url, key=artifact_key(store.run_name, "run-dir"),
                         description="the run directory")


def run_summary_markdown(store: RunStore, rows: list[dict[str, Any]]) -> str:
    """The run's summary artifact: the status table, the stages' loud-drop warnings, the report."""
    lines = [f"## Run `{store.run_name}`", "", f"Run directory: `{store.url}`", "",
             "| stage | status | items | failures | cost $ | time s |", "|---|---|---|---|---|---|"]
    lines += [f"| {r['stage']} | {r['status']} | {r['items']} | {r['failures']} | {float(r['cost_usd']):.4f} | "
              f"{float(r['seconds']):.1f} |" for r in rows]
    warnings = stage_warnings(store)
    if warnings:
        lines += ["", "### Warnings", ""] + [f"- {w}" for w in warnings]
    report = store.join("evaluate", "report.md")
    if store.fs.exists(report):
        with store.fs.open(report, "r") as fh:
            lines += ["", inline_images(fh.read(), store)]
    return "\n".join(lines)


def publish_review(view: RunStore, report: dict[str, Any]) -> None:
    """The review of a round's pairs (feedback.review): agreement, preferences and every pair, as markdown."""
    if not _in_run():
        return
    raw = view.read_bytes(view.join("feedback", "review", "report.md")) or b""
    agreement = report["agreement"]
    create_markdown_artifact(raw.decode(), key=artifact_key(view.run_name, f"review-round-{view.round}"),
                             description=f"review of round {view.round}'s pairs of {view.run_name}: agreement "
                                         f"{agreement['k']}/{agreement['n']}")
