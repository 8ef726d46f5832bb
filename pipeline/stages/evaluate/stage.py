"""Evaluation (MT-Bench / AlpacaEval style): every model answers the evaluation prompts greedily, the judge
grades each answer 1-10 and compares each model with a baseline in both orders; a checker adds ground truth."""

from __future__ import annotations

import asyncio
import logging
import tempfile
from pathlib import Path
from typing import Any, NamedTuple

from pipeline.backends.base import Completion, GenerationRequest, SamplingParams
from pipeline.backends.pool import make_backend
from pipeline.core.progress import progress
from pipeline.core.recipe import PoolModel, Recipe
from pipeline.core.stage import ItemStream, StageReport, conclude, say_loud_drops
from pipeline.core.store import FailureLedger, RunStore, ShardWriter
from pipeline.stages.evaluate.judging import JudgeFailed, Judgment, plan_judgments
from pipeline.stages.evaluate.records import (
    ANSWERS,
    OUTPUTS,
    PAIRWISE,
    SINGLE,
    STAGE,
    EvalItem,
    EvalModel,
    EvalSet,
    answer_id,
    check_outputs,
    eval_models,
    load_eval_set,
    plan_record,
)
from pipeline.stages.evaluate.report import write_report
from pipeline.stages.evaluate.schema import SCHEMAS
from pipeline.teacher.client import TeacherError
from pipeline.teacher.session import concurrency_note, teacher_session
from pipeline.teacher.structured import merge_tallies

log = logging.getLogger(__name__)


def run(recipe: Recipe, store: RunStore) -> StageReport:
    """Answer, grade, compare and report; resumable: answers and verdicts are shards, judge calls are cached."""
    eval_set = load_eval_set(recipe)
    check_outputs(recipe.evaluate, eval_set)
    models = eval_models(recipe.evaluate)
    store.write_json(store.join(STAGE, "plan.json"), plan_record(recipe, eval_set, models))
    failures = store.ledger(STAGE)
    with store.shard_writer(STAGE, ANSWERS, id_key="answer_id", schema=SCHEMAS[ANSWERS]) as writer:
        done = writer.done_set()
        todo = {m.label: [it for it in eval_set.items if answer_id(it.item_id, m.spec) not in done] for m in models}
        bar = progress(STAGE, sum(map(len, todo.values())), "answer")
        for model in models:
            if todo[model.label] and model.spec == OUTPUTS:
                shipped_answers(model, todo[model.label], eval_set, writer, failures, bar)
            elif todo[model.label]:
                generate_answers(model, todo[model.label], eval_set, recipe, store, writer, failures, bar)
        bar.close()
    answers = {r["answer_id"]: r for r in store.read_records(STAGE, ANSWERS)}
    judged = asyncio.run(_judge(recipe, store, eval_set.items, models, answers))
    return _finish(recipe, store, eval_set.items, models, answers, judged)


def resolve_model(spec: str, recipe: Recipe, store: RunStore) -> str:
    """A loadable path (or hub id) for a model spec; remote paths are downloaded, GGUF files converted."""
    from pipeline.core import gguf
    from pipeline.train import models

    if spec == "base":
        return models.resolve_base_model(recipe, store)
    if spec in ("sft", "dpo"):
        return models.local_model(store, spec)
    if spec == "policy":
        return models.local_model(*store.policy())
    if gguf.is_gguf(spec):
        return models.model_path(spec, f"evaluate.models: {spec}")
    if "://" in spec:
        import fsspec

        fs, path = fsspec.core.url_to_fs(spec)
        local = tempfile.mkdtemp(prefix="distill-eval-model-")
        fs.get(path.rstrip("/") + "/", local + "/", recursive=True)
        return local
    path = Path(spec).expanduser()
    return str(path.resolve()) if path.exists() else spec


# -- answers ---------------------------------------------------------------------------------------
def converse(backend: Any, params: SamplingParams, items: list[EvalItem]) -> dict[str, list[Completion] | str]:
    """Answer every item turn by turn (turn 2 sees the model's own turn-1 answer); item id -> answers or error."""
    history: dict[str, list[dict[str, str]]] = {it.item_id: [] for it in items}
    result: dict[str, list[Completion] | str] = {it.item_id: [] for it in items}
    for turn in range(max(len(it.turns) for it in items)):
        active = [it for it in items if turn < len(it.turns) and isinstance(result[it.item_id], list)]
        for it in active:
            history[it.item_id].append({"role": "user", "content": it.turns[turn]})
        requests = [GenerationRequest(list(history[it.item_id]), seed=0) for it in active]
        for it, done in zip(active, backend.generate(requests, params), strict=True):
            if done.error is not None:
                result[it.item_id] = f"turn {turn + 1}: {done.error}"
                continue
            history[it.item_id].append({"role": "assistant", "content": done.text})
            result[it.item_id].append(done)
    return result


def answer_row(item: EvalItem, model: EvalModel, path: str, answers: list[Completion],
               eval_set: EvalSet) -> dict[str, Any]:
    """The stored answer: every turn's text, and its ground-truth score (0..1) where the set has a checker."""
    texts = [c.text for c in answers]
    correct, check_error = None, None
    if eval_set.checker is not None:
        try:
            correct = float(eval_set.checker(item.as_dict(), texts[-1]))
        except Exception as exc:  # noqa: BLE001 - a user's checker: its failure is recorded with the answer
            check_error = f"{type(exc).__name__}: {exc}"
    return {"answer_id": answer_id(item.item_id, model.spec), "item_id": item.item_id, "model": model.label,
            "spec": model.spec, "model_path": path, "category": item.category, "turns": list(item.turns),
            "answers": texts, "finish_reasons": [c.finish_reason for c in answers],
            "completion_tokens": sum(c.completion_tokens for c in answers), "correct": correct,
            "check_error": check_error}


def generate_answers(model: EvalModel, items: list[EvalItem], eval_set: EvalSet, recipe: Recipe, store: RunStore,
                     writer: ShardWriter, failures: FailureLedger, bar: Any) -> None:
    """Load one model, answer its items chunk by chunk (a finished chunk is published and never redone)."""
    cfg = recipe.evaluate
    path = resolve_model(model.spec, recipe, store)
    # `base` by name: the pool gives the untrained student the chat format sft trains it in
    spec = PoolModel(name=model.label, backend=cfg.backend, model="base" if model.spec == "base" else path,
                     temperature=0.0, max_tokens=cfg.max_tokens,
                     batch_size=cfg.batch_size, device=recipe.compute.device, principles=False)
    backend = make_backend(spec, recipe, store, STAGE)
    params = SamplingParams(temperature=0.0, top_p=1.0, max_tokens=cfg.max_tokens)  # greedy
    log.info("evaluate: %s (%s) answers %d prompts", model.label, path, len(items))
    try:
        chunk = 4 * cfg.batch_size
        for start in range(0, len(items), chunk):
            part = items[start:start + chunk]
            for it, outcome in zip(part, converse(backend, params, part).values(), strict=True):
                if isinstance(outcome, str):
                    failures.record(answer_id(it.item_id, model.spec), f"answer by {model.label}: {outcome}")
                else:
                    writer.add(answer_row(it, model, path, outcome, eval_set))
            writer.flush()
            bar.update(len(part))
    finally:
        backend.close()


def shipped_answers(model: EvalModel, items: list[EvalItem], eval_set: EvalSet, writer: ShardWriter,
                    failures: FailureLedger, bar: Any) -> None:
    """The set's own answers as a model's (AlpacaEval's reference outputs): an item without them is ledgered."""
    for it in items:
        if it.outputs is None or len(it.outputs) < len(it.turns):
            failures.record(answer_id(it.item_id, model.spec), f"answer by {model.label}: the evaluation set "
                            f"ships no answer for every turn of item {it.item_id}")
        else:
            done = [Completion(text, "stop", 0, 0) for text in it.outputs[:len(it.turns)]]
            writer.add(answer_row(it, model, eval_set.name, done, eval_set))
        bar.update(1)
    writer.flush()


# -- judging ---------------------------------------------------------------------------------------
async def _judge(recipe: Recipe, store: RunStore, items: list[EvalItem], models: list[EvalModel],
                 answers: dict[str, dict[str, Any]]) -> Judged:
    """Every planned judgment not yet in the store; how the judging ended (see `Judged`)."""
    resend = False

    async def obtain(j: Judgment) -> dict[str, Any]:
        nonlocal resend
        try:
            return await j.obtain(judge, recipe.evaluate)
        except (JudgeFailed, TeacherError):  # the unusable replies are marked, a failed request is not cached
            resend = True
            raise

    async with teacher_session(recipe, store, STAGE) as session:
        judge = session.for_role("judge")
        writers = {kind: store.shard_writer(STAGE, kind, id_key="judgment_id", schema=SCHEMAS[kind])
                   for kind in (SINGLE, PAIRWISE)}
        done = writers[SINGLE].done_set() | writers[PAIRWISE].done_set()
        todo = [j for j in plan_judgments(recipe.evaluate, items, models, answers) if j.judgment_id not in done]
        bar = progress(STAGE, len(todo), "judgment")
        stream = ItemStream(store.ledger(STAGE), lambda j: j.judgment_id, progress=bar,
                            reason_prefix=lambda j: f"{j.kind} judgment: ")
        with writers[SINGLE], writers[PAIRWISE]:
            async for task, verdict in stream.results(todo, obtain, session.concurrency("judge")):
                writers[task.kind].add(verdict)
        bar.close()
    return Judged(stream.stopped, session.usage(), session.parse_tallies(), resend, session.concurrency_settled())


class Judged(NamedTuple):
    """How judging ended: why it stopped early (if it did), the judge's cost, its parse tally, whether a failed
    judgment would be asked again by a rerun, and the concurrency each endpoint ran at."""

    stop: str
    cost: dict[str, float]
    parsing: dict[str, Any]
    rerun_sends: bool
    concurrency: dict[str, dict[str, Any]]


def _finish(recipe: Recipe, store: RunStore, items: list[EvalItem], models: list[EvalModel],
            answers: dict[str, dict[str, Any]], judged_run: Judged) -> StageReport:
    """Account for every planned answer and judgment from what the store holds; write stats and the report."""
    cost, stop, parsing, rerun_sends = judged_run.cost, judged_run.stop, judged_run.parsing, judged_run.rerun_sends
    cfg = recipe.evaluate
    planned_answers = {answer_id(it.item_id, m.spec) for it in items for m in models}
    planned_judgments = {j.judgment_id for j in plan_judgments(cfg, items, models, answers)}
    judged = {r["judgment_id"] for kind in (SINGLE, PAIRWISE)
              for r in store.read_records(STAGE, kind, columns=["judgment_id"])}
    failed = store.ledger(STAGE).compact(set(answers) | judged)
    pending = len((planned_answers | planned_judgments) - set(answers) - judged - set(failed))
    counts = {"input": len(planned_answers), "items": len(items), "models": len(models), "output": len(answers),
              "judgments": len(judged), "failed": len(failed), "pending": pending}
    before = store.read_json(store.join(STAGE, "stats.json"), {}) or {}
    stats = {"counts": counts, "teacher": cost, "parsing": merge_tallies(before.get("parsing"), parsing),
             "concurrency": judged_run.concurrency}
    store.write_json(store.join(STAGE, "stats.json"), stats)
    status, message = conclude(
        STAGE, stop=stop, pending=pending, failed=len(failed), total=len(planned_answers) + len(planned_judgments),
        max_failure_rate=cfg.max_failure_rate, ledger=store.join(STAGE, "failures.jsonl"),
        saved=f"{len(judged)} judgments", done="",
        retry="rerun to retry them" if rerun_sends else "a rerun would answer their requests from the response "
        "cache or the same models again and fail them the same way: change what their reasons name")
    report = write_report(store, evaluate_status=status)  # its cost table shows how this stage ends
    if status == "completed":
        message = (f"{summary_line(report)}; {len(failed)} failed; report {store.join(STAGE, 'report.md')}"
                   + concurrency_note(judged_run.concurrency))
    message, stats["warnings"] = say_loud_drops(STAGE, message, [f.reason for f in failed.values()],
                                                len(planned_answers) + len(planned_judgments))
    store.write_json(store.join(STAGE, "stats.json"), stats)
    log.info("evaluate: %s", message)
    outputs = {"report": store.join(STAGE, "report.json"), "report_md": store.join(STAGE, "report.md")}
    return StageReport(STAGE, status, counts, cost, outputs, message)


def summary_line(report: dict[str, Any]) -> str:
    """`dpo: judge 6.10, accuracy 0.62 ± 0.05, win rate vs sft 0.71 ± 0.03 (length-controlled 0.69); ...`"""
    parts = []
    for label, m in report["evaluation"]["models"].items():
        bits = [f"judge {m['judge']['mean']:.2f}" if m["judge"]["n"] else "judge n/a"]
        if m["accuracy"]:
            bits.append(f"accuracy {m['accuracy']['mean']:.2f} ± {m['accuracy']['stderr']:.2f}")
        if m["vs_baseline"] and m["vs_baseline"]["n"]:
            vs = m["vs_baseline"]
            lc = (vs.get("length_controlled") or {}).get("win_rate")
            bits.append(f"win rate vs {vs['baseline']} {vs['win_rate']:.2f} ± {vs['stderr']:.2f}"
                        + (f" (length-controlled {lc:.2f})" if lc is not None else ""))
        parts.append(f"{label}: " + ", ".join(bits))
    return "; ".join(parts)
