"""What an evaluation covers: its items (from the task or a file), the models, and the stable ids of answers
and judgments that make the stage resumable and the report rebuildable."""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from dataclasses import dataclass, field
from importlib import resources
from typing import Any

from pipeline.core.evalsets import EvalRow, EvalSetError, parse_row, read_eval_rows
from pipeline.core.recipe import EvaluateConfig, Recipe, role_endpoint
from pipeline.core.task import load_callable, load_task

STAGE = "evaluate"
ANSWERS, SINGLE, PAIRWISE = "answers", "single", "pairwise"
SHIPPED_SET = "eval_set.jsonl"
RUN_MODELS = ("base", "sft", "dpo")


class EvaluateError(ValueError):
    """An evaluation set or section that cannot be used; the message names the file, line or key."""


@dataclass(frozen=True)
class EvalItem:
    """One evaluation prompt: one or more user turns, an optional reference answer for the judge."""

    item_id: str
    category: str
    turns: tuple[str, ...]
    reference: str | None = None
    fields: dict[str, Any] = field(default_factory=dict, compare=False)  # the row's other fields (a checker's)

    def as_dict(self) -> dict[str, Any]:
        """The item as a checker sees it."""
        return {**self.fields, "id": self.item_id, "category": self.category, "turns": list(self.turns),
                "reference": self.reference}


@dataclass(frozen=True)
class EvalModel:
    label: str  # the name the report uses
    spec: str  # as in the recipe: base, sft, dpo, or a path / hub id


@dataclass(frozen=True)
class EvalSet:
    """The items to evaluate and, where there is ground truth, the checker that grades an answer."""

    name: str
    items: list[EvalItem]
    checker: Callable[[dict[str, Any], str], bool | float] | None = None


def load_eval_set(recipe: Recipe) -> EvalSet:
    """`evaluate.prompts`, else the task's held-out set, else the shipped set; `evaluate.checker`, else the
    task's checker on its own held-out set."""
    cfg = recipe.evaluate
    task = load_task(recipe.task) if recipe.task else None
    checker = load_callable(cfg.checker) if cfg.checker else None
    if cfg.prompts is None and task is not None:
        rows = task.heldout(cfg.heldout_count, recipe.prompts.seed)
        if rows is not None:
            name = f"{task.name}-heldout"
            return EvalSet(name, parse_rows(rows, name), checker or (task.check if task.has_checker else None))
    if cfg.prompts is not None:
        return EvalSet(cfg.prompts, parse_items(cfg.prompts), checker)
    with resources.as_file(resources.files("prompts") / SHIPPED_SET) as path:
        return EvalSet(SHIPPED_SET, parse_items(str(path)), checker)


def _as_items(rows: list[EvalRow]) -> list[EvalItem]:
    # the judge sees the first turn's reference (MT-Bench's references per turn arrive with the evaluation
    # formats work); the rest of a row's fields go to the checker
    return [EvalItem(r.item_id, r.category, r.turns, r.references[0], r.fields) for r in rows]


def parse_items(path: str) -> list[EvalItem]:
    """An evaluation file in any accepted shape (see pipeline.core.evalsets)."""
    try:
        return _as_items(read_eval_rows(path))
    except EvalSetError as exc:
        raise EvaluateError(str(exc)) from None


def parse_rows(rows: list[dict[str, Any]], where: str) -> list[EvalItem]:
    """Items from rows a task supplies (the same fields as a file's)."""
    try:
        parsed = [parse_row(row, f"{where} item {i}") for i, row in enumerate(rows)]
    except EvalSetError as exc:
        raise EvaluateError(str(exc)) from None
    if len({r.item_id for r in parsed}) != len(parsed):
        raise EvaluateError(f"{where}: two items share an id")
    return _as_items(parsed)


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


def answer_id(item_id: str, spec: str) -> str:
    return hashlib.sha256(f"{item_id}:{spec}".encode()).hexdigest()


def single_id(answer: str, turn: int) -> str:
    return hashlib.sha256(f"single:{answer}:{turn}".encode()).hexdigest()


def pairwise_id(item_id: str, model: str, baseline: str) -> str:
    return hashlib.sha256(f"pairwise:{item_id}:{model}:{baseline}".encode()).hexdigest()


def plan_record(recipe: Recipe, eval_set: EvalSet, models: list[EvalModel]) -> dict[str, Any]:
    """evaluate/plan.json: what this evaluation covers; the report is rebuilt from it and the shards."""
    cfg, items = recipe.evaluate, eval_set.items
    baseline = next(m for m in models if m.spec == cfg.baseline)
    return {"eval_set": eval_set.name, "checked": eval_set.checker is not None,
            "requested_items": cfg.heldout_count if cfg.prompts is None and recipe.task else len(items),
            "items": [{"item_id": it.item_id, "category": it.category, "turns": list(it.turns),
                       "reference": it.reference} for it in items],
            "models": [{"label": m.label, "spec": m.spec} for m in models], "baseline": baseline.label,
            "baseline_spec": baseline.spec, "candidate": candidate_model(cfg),
            "promote_min_win_rate": cfg.promote_min_win_rate, "judge": role_endpoint(recipe, "judge")[1].model}
