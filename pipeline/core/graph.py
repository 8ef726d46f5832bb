"""The stage graph: each stage's `run` function, what it reads, and which recipe data decides its output."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from pipeline import __version__
from pipeline.core.filehash import content_hash, contents_hash
from pipeline.core.gguf import gguf_files
from pipeline.core.recipe import PromptSource, Recipe, stage_endpoint_identities
from pipeline.core.stage import STAGE_NAMES, StageReport
from pipeline.core.store import RunStore
from pipeline.core.task import load_task
from pipeline.core.templates import templates_hash
from pipeline.stages.dpo.stage import run as dpo
from pipeline.stages.evaluate import estimate as evaluate_estimate
from pipeline.stages.evaluate.stage import run as evaluate
from pipeline.stages.feedback import estimate as feedback_estimate
from pipeline.stages.feedback.stage import run as feedback
from pipeline.stages.generate import estimate as generate_estimate
from pipeline.stages.generate.stage import run as generate
from pipeline.stages.sample import estimate as sample_estimate
from pipeline.stages.sample.stage import run as sample
from pipeline.stages.sft.stage import run as sft
from pipeline.teacher.demand import Planner


@dataclass(frozen=True)
class StageSpec:
    name: str
    run: Callable[[Recipe, RunStore], StageReport]
    section: Callable[[Recipe], Any]  # the recipe data that decides this stage's output
    inputs: Callable[[Recipe], list[str]]  # stages whose outputs it reads
    templates: tuple[str, ...] = ()  # prompt template globs it renders
    gpu: bool = False  # dispatched to the gpu work pool when there is one
    demand: Callable[[Recipe, Planner], None] | None = None  # the endpoint requests it expects (distill estimate)


def _pool_uses_sft(recipe: Recipe) -> bool:
    return any(m.model == "sft" for m in recipe.sample.pool)


def _task(recipe: Recipe) -> str | None:
    return recipe.task


def _endpoints(stage: str) -> Callable[[Recipe], Any]:
    """Only the endpoints of the roles the stage plays: a new judge re-runs evaluate alone."""
    return lambda recipe: stage_endpoint_identities(recipe, stage)


def _read_files(recipe: Recipe, prompts: PromptSource | None = None, decontaminated: bool = False,
                *more: str | None) -> dict[str, str]:
    """Content hashes of the files a stage reads: appending a prompt to a prompts file changes its fingerprint."""
    paths = [p for p in more if p]
    if prompts is not None and not prompts.from_task:
        paths.append(prompts.source)
    if decontaminated:
        paths += recipe.decontamination.eval_files
    if recipe.task is not None:
        paths += load_task(recipe.task).data_files()
    return contents_hash(paths)


def _generate_section(recipe: Recipe) -> Any:
    return {"prompts": recipe.prompts.model_dump(mode="json"), "generate": recipe.generate.model_dump(mode="json"),
            "decontamination": recipe.decontamination.model_dump(mode="json"),
            "endpoints": _endpoints("generate")(recipe), "task": _task(recipe),
            "files": _read_files(recipe, recipe.prompts, True)}


def _sample_section(recipe: Recipe) -> Any:
    prompts = recipe.sample.prompts or recipe.prompts
    # which endpoint a member is sent to is in `endpoints` (its identity), not its name
    pool = recipe.sample.model_dump(mode="json", exclude={"prompts": True, "pool": {"__all__": {"endpoint"}}})
    return {"sample": pool, "prompts": prompts.model_dump(mode="json"), "task": _task(recipe),
            "decontamination": recipe.decontamination.model_dump(mode="json"),
            "files": _read_files(recipe, prompts, True), "endpoints": _endpoints("sample")(recipe),
            **_model_files(recipe, [m.model for m in recipe.sample.pool])}


def _earlier(recipe: Recipe) -> dict[str, Any]:
    # a series run that trains on earlier runs' data too; absent otherwise, so other fingerprints do not move
    return {"previous_runs": recipe.series.previous_runs} if recipe.series.previous_runs else {}


def _model_files(recipe: Recipe, specs: list[str | None]) -> dict[str, Any]:
    """{"models": {spec: content hash}} for the GGUF files a stage loads (those `specs` name, and the student's
    where `base` is among them), keyed by the spec so a fingerprint follows the content, not where it lies; {}
    when there is none, so other fingerprints do not move."""
    found = gguf_files([*specs, recipe.sft.model if "base" in specs else None])
    return {"models": {spec: content_hash(path) for spec, path in found.items()}} if found else {}


def _sft_section(recipe: Recipe) -> Any:
    return {"sft": recipe.sft.model_dump(mode="json"), "task": _task(recipe), **_earlier(recipe),
            **_model_files(recipe, [recipe.sft.model])}


def evaluate_inputs(recipe: Recipe) -> list[str]:
    """The trained models evaluate reads: those `evaluate.models` and `baseline` name (sft before dpo)."""
    named = {*recipe.evaluate.models, recipe.evaluate.baseline}
    return [stage for stage in ("sft", "dpo") if stage in named]


STAGES: dict[str, StageSpec] = {spec.name: spec for spec in [
    StageSpec("generate", generate, _generate_section, lambda r: [], ("generate_*",),
              demand=generate_estimate.demand),
    StageSpec("sft", sft, _sft_section, lambda r: ["generate"], gpu=True),
    StageSpec("sample", sample, _sample_section,
              lambda r: ["sft"] if _pool_uses_sft(r) else [], ("principle_*",), gpu=True,
              demand=sample_estimate.demand),
    StageSpec("feedback", feedback,
              lambda r: {"feedback": r.feedback.model_dump(mode="json"), "endpoints": _endpoints("feedback")(r)},
              lambda r: ["sample", "sft"] if "on_policy" in r.feedback.sources else ["sample"],
              ("feedback_*",), demand=feedback_estimate.demand),
    StageSpec("dpo", dpo, lambda r: {**r.dpo.model_dump(mode="json"), **_earlier(r)}, lambda r: ["sft", "feedback"],
              gpu=True),
    StageSpec("evaluate", evaluate,
              lambda r: {"evaluate": r.evaluate.model_dump(mode="json"), "endpoints": _endpoints("evaluate")(r),
                         "task": _task(r), "files": _read_files(r, None, False, r.evaluate.prompts),
                         **_model_files(r, list(r.evaluate.models))},
              evaluate_inputs, ("judge_*",), gpu=True, demand=evaluate_estimate.demand),
]}
assert tuple(STAGES) == STAGE_NAMES, "the graph and STAGE_NAMES list the stages in the same order"


def fingerprint(stage: str, recipe: Recipe, _memo: dict[str, str] | None = None) -> str:
    """Hash of the stage's own section (with the content of the files it reads), its inputs' fingerprints, its
    templates and the package version."""
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
        return list(STAGE_NAMES)
    names = [n.strip() for n in text.split(",") if n.strip()]
    unknown = [n for n in names if n not in STAGES]
    if unknown:
        raise ValueError(f"unknown stage(s) {unknown}; the stages are {', '.join(STAGE_NAMES)}")
    return [n for n in STAGE_NAMES if n in names]
