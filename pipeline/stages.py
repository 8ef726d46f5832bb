"""The stage graph: what each stage reads, which recipe keys and prompts decide its output."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from pipeline import __version__
from pipeline.prompts import templates_hash
from pipeline.recipe import BUILTIN_TEACHER, Recipe


@dataclass
class StageReport:
    """What a stage hands back: counts, cost and where its outputs are."""

    stage: str
    status: str = "completed"
    counts: dict[str, int] = field(default_factory=dict)
    cost: dict[str, float] = field(default_factory=dict)
    outputs: dict[str, str] = field(default_factory=dict)
    message: str = ""
    skipped: bool = False


@dataclass(frozen=True)
class StageSpec:
    name: str
    module: str  # `<module>.run(recipe, store) -> StageReport`
    section: Callable[[Recipe], Any]  # the recipe data that decides this stage's output
    inputs: Callable[[Recipe], list[str]]  # stages whose outputs it reads
    templates: tuple[str, ...] = ()  # prompt template globs it renders
    gpu: bool = False  # dispatched to the gpu work pool when there is one
    teacher: bool = False  # calls the teacher / judge


def _pool_uses_sft(recipe: Recipe) -> bool:
    return any(m.model == "sft" for m in recipe.sample.pool)


def _sample_section(recipe: Recipe) -> Any:
    section = {"sample": recipe.sample.model_dump(mode="json", exclude={"prompts"}), "prompts": _sample_prompts(recipe)}
    if any(m.backend == "openai" and m.base_url in (None, BUILTIN_TEACHER) for m in recipe.sample.pool):
        section["teacher"] = recipe.teacher.identity()  # that pool member is the teacher's endpoint
    return section


def _sample_prompts(recipe: Recipe) -> Any:
    return (recipe.sample.prompts or recipe.prompts).model_dump(mode="json")


STAGES: dict[str, StageSpec] = {
    spec.name: spec
    for spec in [
        StageSpec("generate", "pipeline.generate",
                  lambda r: {"prompts": r.prompts.model_dump(mode="json"),
                             "generate": r.generate.model_dump(mode="json"),
                             "teacher": r.teacher.identity()},
                  lambda r: [], ("generate_*",), teacher=True),
        StageSpec("sft", "pipeline.train.sft",
                  lambda r: r.sft.model_dump(mode="json"),
                  lambda r: ["generate"], gpu=True),
        StageSpec("sample", "pipeline.sample",
                  _sample_section,
                  lambda r: ["sft"] if _pool_uses_sft(r) else [], ("principle_*",), gpu=True),
        StageSpec("feedback", "pipeline.feedback",
                  lambda r: {"feedback": r.feedback.model_dump(mode="json"), "teacher": r.teacher.identity()},
                  lambda r: ["sample", "sft"] if "on_policy" in r.feedback.sources else ["sample"],
                  ("feedback_*",), teacher=True),
        StageSpec("dpo", "pipeline.train.dpo",
                  lambda r: r.dpo.model_dump(mode="json"),
                  lambda r: ["sft", "feedback"], gpu=True),
        StageSpec("evaluate", "pipeline.evaluate",
                  lambda r: {"evaluate": r.evaluate.model_dump(mode="json"), "teacher": r.teacher.identity()},
                  lambda r: ["sft", "dpo"], ("judge_*",), gpu=True, teacher=True),
    ]
}
STAGE_ORDER = list(STAGES)


def fingerprint(stage: str, recipe: Recipe, _memo: dict[str, str] | None = None) -> str:
    """Hash of the stage's own section, its inputs' fingerprints, its templates and the package version."""
    memo = {} if _memo is None else _memo
    if stage in memo:
        return memo[stage]
    spec = STAGES[stage]
    payload = {
        "stage": stage,
        "section": spec.section(recipe),
        "inputs": {name: fingerprint(name, recipe, memo) for name in spec.inputs(recipe)},
        "templates": templates_hash(spec.templates) if spec.templates else None,
        "version": __version__,
    }
    digest = hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()[:16]
    memo[stage] = digest
    return digest


def parse_stages(text: str | None) -> list[str]:
    """`generate,sft` -> ordered, validated stage names; None or 'all' -> every stage."""
    if not text or text == "all":
        return list(STAGE_ORDER)
    names = [n.strip() for n in text.split(",") if n.strip()]
    unknown = [n for n in names if n not in STAGES]
    if unknown:
        raise ValueError(f"unknown stage(s) {unknown}; the stages are {', '.join(STAGE_ORDER)}")
    return [n for n in STAGE_ORDER if n in names]
