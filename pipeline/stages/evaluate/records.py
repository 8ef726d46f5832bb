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
OUTPUTS = "outputs"  # a model spec: the answers the evaluation set ships (AlpacaEval's `output`)
RUN_MODELS = ("base", "sft", "dpo", "policy", OUTPUTS)


class EvaluateError(ValueError):
    """An evaluation set or section that cannot be used; the message names the file, line or key."""


@dataclass(frozen=True)
class EvalItem:
    """One evaluation prompt: one or more user turns, a reference answer per turn for the judge (or None), and
    the answers the set ships for it (`outputs`, usable as the baseline)."""

    item_id: str
    category: str
    turns: tuple[str, ...]
    references: tuple[str | None, ...] = ()
    fields: dict[str, Any] = field(default_factory=dict, compare=False)  # the row's other fields (a checker's)
    outputs: tuple[str, ...] | None = None

    @property
    def reference(self) -> str | None:
        """The first turn's reference answer."""
        return self.references[0] if self.references else None

    def reference_for(self, turn: int) -> str | None:
        return self.references[turn] if turn < len(self.references) else None

    def as_dict(self) -> dict[str, Any]:
        """The item as a checker sees it."""
        return {**self.fields, "id": self.item_id, "category": self.category, "turns": list(self.turns),
                "reference": self.reference, "references": list(self.references)}


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
    with resources.as_file(resources.files("pipeline.prompts") / SHIPPED_SET) as path:
        return EvalSet(SHIPPED_SET, parse_items(str(path)), checker)


def check_outputs(cfg: EvaluateConfig, eval_set: EvalSet) -> None:
    """`outputs` as a model needs a set that ships answers (AlpacaEval's `output`, or `messages` with answers)."""
    if OUTPUTS in (*cfg.models, cfg.baseline) and not any(it.outputs for it in eval_set.items):
        raise EvaluateError(f"evaluate: '{OUTPUTS}' stands for the answers the evaluation set ships, but "
                            f"{eval_set.name} has none (give rows an AlpacaEval `output`, or `messages` with the "
                            "assistant's answers)")


def outputs_generator(eval_set: EvalSet) -> str | None:
    """Who wrote the set's outputs (AlpacaEval's `generator`), when the rows agree on one."""
    names = {str(it.fields.get("generator")) for it in eval_set.items if it.outputs and it.fields.get("generator")}
    return names.pop() if len(names) == 1 else None


def shows_reference(cfg: EvaluateConfig, item: EvalItem) -> bool:
    """Whether the judge sees the item's reference answers: MT-Bench shows them for math, reasoning and coding."""
    return cfg.reference_categories is None or item.category in cfg.reference_categories


def _as_items(rows: list[EvalRow]) -> list[EvalItem]:
    # the rest of a row's fields go to the checker
    return [EvalItem(r.item_id, r.category, r.turns, r.references, r.fields, r.outputs) for r in rows]


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
                       "references": list(it.references), "reference_shown": shows_reference(cfg, it)}
                      for it in items],
            "models": [{"label": m.label, "spec": m.spec} for m in models], "baseline": baseline.label,
            "baseline_spec": baseline.spec, "candidate": candidate_model(cfg),
            "outputs_generator": outputs_generator(eval_set) if OUTPUTS in {m.spec for m in models} else None,
            "promote_min_win_rate": cfg.promote_min_win_rate, "promote_stderr_k": cfg.promote_stderr_k,
            "judge": role_endpoint(recipe, "judge")[1].model}
