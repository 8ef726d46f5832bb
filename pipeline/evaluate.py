"""Evaluation (MT-Bench / AlpacaEval style): every model answers the evaluation prompts greedily, the judge
grades each answer 1-10 and compares each model with a baseline in both orders; the toy task adds ground truth."""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import re
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

from pipeline.backends import Completion, GenerationRequest, SamplingParams, make_backend
from pipeline.data import prompt_id
from pipeline.judge import VerdictError, combine_orders, parse_pairwise, parse_single
from pipeline.progress import progress
from pipeline.prompts import render
from pipeline.recipe import EvaluateConfig, PoolModel, Recipe
from pipeline.stages import StageReport
from pipeline.store import FailureLedger, RunStore, ShardWriter
from pipeline.teacher import (
    BudgetExceeded,
    ChatRequest,
    TeacherClient,
    TeacherError,
    TeacherFatal,
    teacher_for_stage,
)
from pipeline.work import stream_map

log = logging.getLogger(__name__)
STAGE = "evaluate"
ANSWERS, SINGLE, PAIRWISE = "answers", "single", "pairwise"
SHIPPED_SET = "eval_set.jsonl"
TOY_SET = "toy-heldout"
RUN_MODELS = ("base", "sft", "dpo")


class EvaluateError(ValueError):
    """An evaluation set or section that cannot be used; the message names the file, line or key."""


class JudgeFailed(Exception):
    """No parsable verdict after every attempt: the judgment goes to the failure ledger."""

    def __init__(self, reason: str, attempts: int):
        super().__init__(reason)
        self.reason, self.attempts = reason, attempts


@dataclass(frozen=True)
class EvalItem:
    """One evaluation prompt: one or more user turns, an optional reference answer for the judge."""

    item_id: str
    category: str
    turns: tuple[str, ...]
    reference: str | None = None
    toy: bool = False  # ground truth by the toy task's checker


@dataclass(frozen=True)
class EvalModel:
    label: str  # the name the report uses
    spec: str  # as in the recipe: base, sft, dpo, or a path / hub id


# -- what is evaluated -----------------------------------------------------------------------------
def load_items(recipe: Recipe) -> tuple[str, list[EvalItem]]:
    """(set name, items): `evaluate.prompts`, else the toy heldout set for a toy run, else the shipped set."""
    cfg = recipe.evaluate
    if cfg.prompts is None and recipe.prompts.is_toy:
        from pipeline.toy.task import make_prompts, prompt_pool

        count = min(cfg.heldout_count, len(prompt_pool("heldout")))  # the toy task has only so many
        prompts = make_prompts(count, recipe.prompts.toy_seed, split="heldout")
        return TOY_SET, [EvalItem(prompt_id(p), "toy", (p,), None, toy=True) for p in prompts]
    if cfg.prompts is not None:
        name, text = cfg.prompts, _read_text(cfg.prompts)
    else:
        name, text = SHIPPED_SET, (resources.files("prompts") / SHIPPED_SET).read_text(encoding="utf-8")
    return name, parse_items(text, name)


def _read_text(path: str) -> str:
    import fsspec

    with fsspec.open(path, "r", encoding="utf-8") as fh:
        return fh.read()


def parse_items(text: str, where: str) -> list[EvalItem]:
    """JSONL rows with `turns` (list of user turns) or `prompt`, optional `id`, `category`, `reference`."""
    items, seen = [], set()
    for lineno, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        at = f"{where} line {lineno}"
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            raise EvaluateError(f"{at}: not valid JSON ({exc.msg})") from None
        turns = row.get("turns", [row["prompt"]] if "prompt" in row else None) if isinstance(row, dict) else None
        if not turns or not all(isinstance(t, str) and t.strip() for t in turns):
            raise EvaluateError(f"{at}: expected 'turns' (a list of non-empty user turns) or 'prompt'")
        item_id = str(row.get("id") or prompt_id(json.dumps(turns)))
        if item_id in seen:
            raise EvaluateError(f"{at}: id '{item_id}' appears twice")
        seen.add(item_id)
        reference = row.get("reference")
        items.append(EvalItem(item_id, str(row.get("category", "general")), tuple(t.strip() for t in turns),
                              None if reference is None else str(reference)))
    if not items:
        raise EvaluateError(f"{where}: no evaluation prompts in it")
    return items


def eval_models(cfg: EvaluateConfig) -> list[EvalModel]:
    """The models to answer: `evaluate.models`, plus the baseline if it is not among them."""
    specs = list(dict.fromkeys([*cfg.models, cfg.baseline]))
    labels = [model_label(s) for s in specs]
    return [EvalModel(label if labels.count(label) == 1 else spec, spec) for spec, label in zip(specs, labels,
                                                                                               strict=True)]


def model_label(spec: str) -> str:
    """`base`/`sft`/`dpo` as is; a path `<run>/<stage>/model` becomes `<run>/<stage>`, another path its name."""
    if spec in RUN_MODELS:
        return spec
    parts = [p for p in spec.rstrip("/").split("/") if p]
    if len(parts) >= 3 and parts[-1] == "model":
        return "/".join(parts[-3:-1])
    return parts[-1] if parts else spec


def candidate_model(cfg: EvaluateConfig) -> str:
    """The model a promotion is about: the last of `evaluate.models` that is not the baseline."""
    others = [m for m in cfg.models if m != cfg.baseline]
    return model_label(others[-1]) if others else model_label(cfg.baseline)


def resolve_model(spec: str, recipe: Recipe, store: RunStore) -> str:
    """A loadable path (or hub id) for a model spec; remote paths are downloaded."""
    from pipeline.train import common

    if spec == "base":
        return common.resolve_base_model(recipe, store)
    if spec in ("sft", "dpo"):
        return common.local_model(store, spec)
    if "://" in spec:
        import fsspec

        fs, path = fsspec.core.url_to_fs(spec)
        local = tempfile.mkdtemp(prefix="distill-eval-model-")
        fs.get(path.rstrip("/") + "/", local + "/", recursive=True)
        return local
    path = Path(spec).expanduser()
    return str(path.resolve()) if path.exists() else spec


def answer_id(item_id: str, spec: str) -> str:
    return hashlib.sha256(f"{item_id}:{spec}".encode()).hexdigest()


def single_id(answer: str, turn: int) -> str:
    return hashlib.sha256(f"single:{answer}:{turn}".encode()).hexdigest()


def pairwise_id(item_id: str, model: str, baseline: str) -> str:
    return hashlib.sha256(f"pairwise:{item_id}:{model}:{baseline}".encode()).hexdigest()


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


def answer_row(item: EvalItem, model: EvalModel, path: str, answers: list[Completion]) -> dict[str, Any]:
    """The stored answer: every turn's text, and whether it is right where the task has a checker."""
    texts = [c.text for c in answers]
    correct = None
    if item.toy:
        from pipeline.toy.task import is_correct

        correct = is_correct(item.turns[-1], texts[-1])
    return {"answer_id": answer_id(item.item_id, model.spec), "item_id": item.item_id, "model": model.label,
            "spec": model.spec, "model_path": path, "category": item.category, "turns": list(item.turns),
            "answers": texts, "finish_reasons": [c.finish_reason for c in answers],
            "completion_tokens": sum(c.completion_tokens for c in answers), "correct": correct}


def generate_answers(model: EvalModel, items: list[EvalItem], recipe: Recipe, store: RunStore, writer: ShardWriter,
                     failures: FailureLedger, bar: Any) -> None:
    """Load one model, answer its items chunk by chunk (a finished chunk is published and never redone)."""
    cfg = recipe.evaluate
    path = resolve_model(model.spec, recipe, store)
    spec = PoolModel(name=model.label, backend=cfg.backend, model=path, temperature=0.0, max_tokens=cfg.max_tokens,
                     batch_size=cfg.batch_size, device=recipe.compute.device, principles=False)
    backend = make_backend(spec, recipe, store)
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
                    writer.add(answer_row(it, model, path, outcome))
            writer.flush()
            bar.update(len(part))
    finally:
        backend.close()


# -- judging ---------------------------------------------------------------------------------------
def _fence(text: str, tag: str = "answer") -> str:
    """Keep an answer from closing (or opening) the tags it is quoted in."""
    return re.sub(rf"<(/?\s*{tag}\b[^>]*)>", r"‹\1›", text, flags=re.I)


def judged_question(item: EvalItem, answers: list[str], turn: int) -> str:
    """The question a turn is graded on: earlier turns (with this model's answers) as context, then the turn."""
    parts = []
    if turn > 0:
        parts.append("Earlier in this conversation:")
        for t in range(turn):
            parts += [f"User: {item.turns[t]}", f"Assistant: {_fence(answers[t])}"]
        parts.append("The user's latest message, which the answer below replies to:")
    parts.append(item.turns[turn])
    if item.reference is not None and turn == 0:
        parts.append(f"(Reference answer, for the judge only: {item.reference})")
    return "\n\n".join(parts)


def conversation_text(turns: list[str], answers: bool) -> str:
    """A multi-turn item shown whole to the pairwise judge: `Turn 1: ...`; a single turn as it is."""
    shown = [_fence(t) for t in turns] if answers else list(turns)
    return shown[0] if len(shown) == 1 else "\n\n".join(f"Turn {i + 1}: {t}" for i, t in enumerate(shown))


async def ask_judge(client: TeacherClient, cfg: EvaluateConfig, text: str,
                    parse: Callable[[str], Any]) -> tuple[str, Any, int]:
    """(reply, parsed verdict, attempts); a reply the strict parser rejects is asked again, then fails."""
    problem, last = "", ""
    for attempt in range(1, cfg.judge_attempts + 1):
        reply = await client.chat(ChatRequest([{"role": "user", "content": text}], temperature=0.0,
                                              max_tokens=cfg.judge_max_tokens,
                                              tag="" if attempt == 1 else f"reask-{attempt}"))
        try:
            return reply.text, parse(reply.text), attempt
        except VerdictError as exc:
            problem = str(exc) + (" (the reply was cut off)" if reply.finish_reason == "length" else "")
            last = reply.text
    raise JudgeFailed(f"{problem}, after {cfg.judge_attempts} attempts; last reply {last[:200]!r}",
                      cfg.judge_attempts)


async def grade_answer(client: TeacherClient, cfg: EvaluateConfig, item: EvalItem, row: dict[str, Any],
                       turn: int) -> dict[str, Any]:
    """Single-answer grading of one turn: an explanation and a 1-10 rating."""
    text = render("judge_single.jinja", question=judged_question(item, row["answers"], turn),
                  answer=_fence(row["answers"][turn]))
    reply, rating, attempts = await ask_judge(client, cfg, text, parse_single)
    return {"judgment_id": single_id(row["answer_id"], turn), "item_id": item.item_id, "model": row["model"],
            "category": item.category, "turn": turn + 1, "rating": float(rating), "explanation": reply,
            "attempts": attempts}


async def compare_answers(client: TeacherClient, cfg: EvaluateConfig, item: EvalItem, candidate: dict[str, Any],
                          baseline: dict[str, Any]) -> dict[str, Any]:
    """The candidate against the baseline, shown as A and then as B; disagreement between the orders is a tie."""
    question = conversation_text(list(item.turns), answers=False)
    if item.reference is not None:
        question += f"\n\n(Reference answer to the first question, for the judge only: {item.reference})"
    mine, theirs = conversation_text(candidate["answers"], True), conversation_text(baseline["answers"], True)
    row = {"judgment_id": pairwise_id(item.item_id, candidate["spec"], baseline["spec"]), "item_id": item.item_id,
           "model": candidate["model"], "baseline": baseline["model"], "category": item.category}
    if mine == theirs:  # the same text cannot win or lose against itself
        return {**row, "verdict_first": "C", "verdict_second": "C", "score": 0.5, "identical": True,
                "explanation_first": "", "explanation_second": "", "attempts": 0}
    both = await asyncio.gather(
        ask_judge(client, cfg, render("judge_pairwise.jinja", question=question, answer_a=mine, answer_b=theirs),
                  parse_pairwise),
        ask_judge(client, cfg, render("judge_pairwise.jinja", question=question, answer_a=theirs, answer_b=mine),
                  parse_pairwise), return_exceptions=True)  # let both orders finish, then fail on either
    for failed in (r for r in both if isinstance(r, BaseException)):
        raise failed
    (text_1, first, n_1), (text_2, second, n_2) = both
    outcome = combine_orders(first, second)
    return {**row, "verdict_first": first, "verdict_second": second, "score": outcome.score, "identical": False,
            "explanation_first": text_1, "explanation_second": text_2, "attempts": n_1 + n_2}


@dataclass(frozen=True)
class Judgment:
    """One verdict to obtain: a turn of an answer graded, or an answer compared with the baseline's."""

    kind: str  # SINGLE or PAIRWISE
    judgment_id: str
    item: EvalItem
    answer: dict[str, Any]
    turn: int = 0
    baseline_answer: dict[str, Any] | None = None

    async def obtain(self, client: TeacherClient, cfg: EvaluateConfig) -> dict[str, Any]:
        if self.kind == SINGLE:
            return await grade_answer(client, cfg, self.item, self.answer, self.turn)
        return await compare_answers(client, cfg, self.item, self.answer, self.baseline_answer)


def plan_judgments(cfg: EvaluateConfig, items: list[EvalItem], models: list[EvalModel],
                   answers: dict[str, dict[str, Any]]) -> list[Judgment]:
    """Every turn of every answer graded; every item compared for each model against the baseline.

    A failed answer gets no judgments: it is in the ledger already, and so the item is accounted for."""
    baseline = next(m for m in models if m.spec == cfg.baseline)
    plan = []
    for item in items:
        base_row = answers.get(answer_id(item.item_id, baseline.spec))
        for model in models:
            row = answers.get(answer_id(item.item_id, model.spec))
            if row is None:
                continue
            plan += [Judgment(SINGLE, single_id(row["answer_id"], t), item, row, t)
                     for t in range(len(row["answers"]))]
            if model is not baseline and base_row is not None:
                plan.append(Judgment(PAIRWISE, pairwise_id(item.item_id, model.spec, baseline.spec), item, row,
                                     baseline_answer=base_row))
    return plan


# -- the stage -------------------------------------------------------------------------------------
def plan_record(recipe: Recipe, set_name: str, items: list[EvalItem], models: list[EvalModel]) -> dict[str, Any]:
    """evaluate/plan.json: what this evaluation covers; the report is rebuilt from it and the shards."""
    cfg = recipe.evaluate
    baseline = next(m for m in models if m.spec == cfg.baseline)
    return {"eval_set": set_name, "requested_items": cfg.heldout_count if set_name == TOY_SET else len(items),
            "items": [{"item_id": it.item_id, "category": it.category, "turns": list(it.turns),
                       "reference": it.reference, "toy": it.toy} for it in items],
            "models": [{"label": m.label, "spec": m.spec} for m in models], "baseline": baseline.label,
            "baseline_spec": baseline.spec, "candidate": candidate_model(cfg),
            "promote_min_win_rate": cfg.promote_min_win_rate, "judge": recipe.teacher.model}


def run(recipe: Recipe, store: RunStore) -> StageReport:
    """Answer, grade, compare and report; resumable: answers and verdicts are shards, judge calls are cached."""
    set_name, items = load_items(recipe)
    models = eval_models(recipe.evaluate)
    store.write_json(store.join(STAGE, "plan.json"), plan_record(recipe, set_name, items, models))
    failures = store.ledger(STAGE)
    with store.shard_writer(STAGE, ANSWERS, id_key="answer_id") as writer:
        done = writer.done_ids()
        todo = {m.label: [it for it in items if answer_id(it.item_id, m.spec) not in done] for m in models}
        bar = progress(STAGE, sum(map(len, todo.values())), "answer")
        for model in models:
            if todo[model.label]:
                generate_answers(model, todo[model.label], recipe, store, writer, failures, bar)
        bar.close()
    answers = {r["answer_id"]: r for r in store.read_records(STAGE, ANSWERS)}
    stop, cost = asyncio.run(_judge(recipe, store, items, models, answers))
    return _finish(recipe, store, items, models, answers, cost, stop)


async def _judge(recipe: Recipe, store: RunStore, items: list[EvalItem], models: list[EvalModel],
                 answers: dict[str, dict[str, Any]]) -> tuple[str, dict[str, float]]:
    client = teacher_for_stage(recipe, store)
    failures, stopped = store.ledger(STAGE), []  # the reason the stage stops early, once there is one
    try:
        writers = {kind: store.shard_writer(STAGE, kind, id_key="judgment_id") for kind in (SINGLE, PAIRWISE)}
        done = writers[SINGLE].done_ids() | writers[PAIRWISE].done_ids()
        todo = [j for j in plan_judgments(recipe.evaluate, items, models, answers) if j.judgment_id not in done]
        bar = progress(STAGE, len(todo), "judgment")
        with writers[SINGLE], writers[PAIRWISE]:
            async for task, result in stream_map(todo, lambda j: j.obtain(client, recipe.evaluate),
                                                 recipe.teacher.max_concurrency, stop=lambda: bool(stopped)):
                bar.update(1)
                if isinstance(result, (BudgetExceeded, TeacherFatal)):
                    stopped.append(str(result))  # finish what is in flight, start nothing new
                elif isinstance(result, (JudgeFailed, TeacherError)):
                    failures.record(task.judgment_id, f"{task.kind} judgment: {result.reason}", result.attempts)
                elif isinstance(result, BaseException):
                    failures.record(task.judgment_id, f"{task.kind} judgment: {type(result).__name__}: {result}")
                else:
                    writers[task.kind].add(result)
        bar.close()
    finally:
        await client.aclose()
        if client.cache is not None:
            client.cache.close()
    return (stopped[0] if stopped else ""), client.usage.as_cost()


def _finish(recipe: Recipe, store: RunStore, items: list[EvalItem], models: list[EvalModel],
            answers: dict[str, dict[str, Any]], cost: dict[str, float], stop: str) -> StageReport:
    """Account for every planned answer and judgment from what the store holds; write stats and the report."""
    from pipeline.report import write_report

    cfg = recipe.evaluate
    planned_answers = {answer_id(it.item_id, m.spec) for it in items for m in models}
    planned_judgments = {j.judgment_id for j in plan_judgments(cfg, items, models, answers)}
    judged = {r["judgment_id"] for kind in (SINGLE, PAIRWISE) for r in _ids(store, kind)}
    failed = store.ledger(STAGE).compact(set(answers) | judged)
    pending = len((planned_answers | planned_judgments) - set(answers) - judged - set(failed))
    counts = {"input": len(planned_answers), "items": len(items), "models": len(models), "output": len(answers),
              "judgments": len(judged), "failed": len(failed), "pending": pending}
    store.write_json(store.join(STAGE, "stats.json"), {"counts": counts, "teacher": cost})
    report = write_report(store)
    failure_rate = len(failed) / max(1, len(planned_answers) + len(planned_judgments))
    ledger = store.join(STAGE, "failures.jsonl")
    if stop:
        status, message = "failed", f"stopped early: {stop} ({len(judged)} judgments saved); rerun to continue"
    elif pending:
        status, message = "failed", f"{pending} answers or judgments neither done nor ledgered; rerun to resume"
    elif failure_rate > cfg.max_failure_rate:
        status, message = "failed", (f"{len(failed)} answers/judgments failed (> evaluate.max_failure_rate="
                                     f"{cfg.max_failure_rate}); see {ledger}")
    else:
        status = "completed"
        message = f"{summary_line(report)}; {len(failed)} failed; report {store.join(STAGE, 'report.md')}"
    log.info("evaluate: %s", message)
    outputs = {"report": store.join(STAGE, "report.json"), "report_md": store.join(STAGE, "report.md")}
    return StageReport(STAGE, status, counts, cost, outputs, message)


def summary_line(report: dict[str, Any]) -> str:
    """`dpo: judge 6.1, accuracy 0.62, win rate vs sft 0.71 ± 0.03; ...`"""
    parts = []
    for label, m in report["evaluation"]["models"].items():
        bits = [f"judge {m['judge']['mean']:.2f}" if m["judge"]["n"] else "judge n/a"]
        if m["accuracy"]:
            bits.append(f"accuracy {m['accuracy']['mean']:.2f}")
        if m["vs_baseline"] and m["vs_baseline"]["n"]:
            vs = m["vs_baseline"]
            bits.append(f"win rate vs {vs['baseline']} {vs['win_rate']:.2f} ± {vs['stderr']:.2f}")
        parts.append(f"{label}: " + ", ".join(bits))
    return "; ".join(parts)


def _ids(store: RunStore, name: str) -> list[dict[str, Any]]:
    import pyarrow.parquet as pq

    rows: list[dict[str, Any]] = []
    for path in store.shard_paths(STAGE, name):
        with store.fs.open(path, "rb") as fh:
            rows += pq.read_table(fh, columns=["judgment_id"]).to_pylist()
    return rows
