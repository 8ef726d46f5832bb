"""The stage registry: one record per stage (its `run`, what it reads, the recipe data and output version that
decide its output, the roles it plays, its GPU use, its demand), and the fingerprints derived from it."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from pipeline.core.filehash import content_hash, contents_hash
from pipeline.core.gguf import gguf_files
from pipeline.core.recipe import (
    EndpointUse,
    PromptSource,
    Recipe,
    TeacherConfig,
    panel_uses,
    pool_uses,
    role_uses,
)
from pipeline.core.rounds import split_key, stage_key
from pipeline.core.stage import StageReport
from pipeline.core.store import RunStore
from pipeline.core.task import load_task
from pipeline.core.templates import templates_hash
from pipeline.review.gate import review_inputs
from pipeline.run.rounds import round_inputs, round_recipe, round_section
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
    about: str  # one line, shown as its Prefect flow's description
    run: Callable[[Recipe, RunStore], StageReport]
    section: Callable[[Recipe], Any]  # the recipe data that decides this stage's output
    inputs: Callable[[Recipe], list[str]]  # stages whose outputs it reads
    # Bump when a change to the stage's code changes what it writes for the same inputs: the fingerprint holds
    # it, so completed runs redo this stage and those downstream of it (tests/test_output_versions.py).
    version: int = 1
    templates: tuple[str, ...] = ()  # prompt template globs it renders
    gpu: bool = False  # dispatched to the gpu work pool when there is one
    roles: tuple[str, ...] = ()  # the roles it plays through endpoints
    uses: Callable[[Recipe], list[EndpointUse]] | None = None  # the endpoints it sends to (default: its roles')
    demand: Callable[[Recipe, Planner], None] | None = None  # the endpoint requests it expects (distill estimate)
    reads_review: bool = False  # trains on the pairs as a person reviewed them (feedback.review)

    @property
    def sends_requests(self) -> bool:
        return bool(self.roles) or self.uses is not None

    def endpoint_uses(self, recipe: Recipe) -> list[EndpointUse]:
        return self.uses(recipe) if self.uses is not None else role_uses(recipe, self.roles)

    def endpoints(self, recipe: Recipe) -> dict[str, TeacherConfig]:
        """The endpoints the stage sends requests to, by name (the servers it starts for itself among them)."""
        return {use.endpoint: use.config for use in self.endpoint_uses(recipe)}

    def endpoint_identities(self, recipe: Recipe) -> dict[str, Any]:
        """Only the endpoints of the roles it plays, and what decides their answers: a new judge re-runs
        evaluate alone."""
        return {use.key: use.identity() for use in self.endpoint_uses(recipe)}


def _pool_uses_sft(recipe: Recipe) -> bool:
    return any(m.model in ("sft", "policy") for m in recipe.sample.pool)  # the policy of round 1 is sft


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


def _model_files(recipe: Recipe, specs: list[str | None]) -> dict[str, Any]:
    """{"models": {spec: content hash}} for the GGUF files a stage loads (those `specs` name, and the student's
    where `base` is among them), keyed by the spec so a fingerprint follows the content, not where it lies; {}
    when there is none, so other fingerprints do not move."""
    found = gguf_files([*specs, recipe.sft.model if "base" in specs else None])
    return {"models": {spec: content_hash(path) for spec, path in found.items()}} if found else {}


def _earlier(recipe: Recipe) -> dict[str, Any]:
    # a series run that trains on earlier runs' data too; absent otherwise, so other fingerprints do not move
    return {"previous_runs": recipe.series.previous_runs} if recipe.series.previous_runs else {}


def _generate_section(recipe: Recipe) -> Any:
    return {"prompts": recipe.prompts.identity(), "generate": recipe.generate.model_dump(mode="json"),
            "decontamination": recipe.decontamination.model_dump(mode="json"), "task": recipe.task,
            "files": _read_files(recipe, recipe.prompts, True)}


def _generate_uses(recipe: Recipe) -> list[EndpointUse]:
    # the instruction writer only when self-instruct or self-prompting runs
    grows = recipe.generate.self_instruct.enabled or recipe.generate.self_prompting.enabled
    return role_uses(recipe, ("assistant", "user_simulator", *(("instruction_writer",) if grows else ())))


def _sft_section(recipe: Recipe) -> Any:
    return {"sft": recipe.sft.model_dump(mode="json"), "task": recipe.task, **_earlier(recipe),
            **_model_files(recipe, [recipe.sft.model])}


def _sample_section(recipe: Recipe) -> Any:
    prompts = recipe.sample.prompts or recipe.prompts
    # which endpoint a member is sent to is in `endpoints` (its identity), not its name
    # which rounds a member answers in is the round's pool, not a setting of the member
    pool = recipe.sample.model_dump(mode="json", exclude={"prompts": True,
                                                          "pool": {"__all__": {"endpoint", "later_rounds"}}})
    return {"sample": pool, "prompts": prompts.identity(), "task": recipe.task,
            "decontamination": recipe.decontamination.model_dump(mode="json"),
            "files": _read_files(recipe, prompts, True), **_model_files(recipe, [m.model for m in recipe.sample.pool])}


def _feedback_section(recipe: Recipe) -> Any:
    # the review decides what dpo trains on, not what feedback writes: it is in dpo's fingerprint instead
    return {"feedback": recipe.feedback.model_dump(mode="json", exclude={"review"})}


def _dpo_section(recipe: Recipe) -> Any:
    # `dpo.beta: 0.1` and `dpo.args.beta: 0.1` train the same model: fingerprint the arguments TRL receives;
    # the round settings belong to the rounds that use them (pipeline.run.rounds.round_section)
    section = recipe.dpo.model_dump(mode="json", exclude={"beta", "loss_type", "rounds", "reference", "train_on",
                                                          "round_prompts"})
    return {**section, "args": recipe.dpo.trl_args(), **_earlier(recipe)}


def _evaluate_section(recipe: Recipe) -> Any:
    return {"evaluate": recipe.evaluate.model_dump(mode="json"), "task": recipe.task,
            "files": _read_files(recipe, None, False, recipe.evaluate.prompts),
            **_model_files(recipe, list(recipe.evaluate.models))}


def evaluate_inputs(recipe: Recipe) -> list[str]:
    """The trained models evaluate reads: those `evaluate.models` and `baseline` name (sft before dpo)."""
    named = {*recipe.evaluate.models, recipe.evaluate.baseline}
    return [stage for stage in ("sft", "dpo") if stage in named]


STAGES: dict[str, StageSpec] = {spec.name: spec for spec in [
    StageSpec("generate", "dSFT data: teacher-simulated dialogues.", generate, _generate_section,
              inputs=lambda r: [], templates=("generate_*",),
              roles=("assistant", "user_simulator", "instruction_writer"), uses=_generate_uses,
              demand=generate_estimate.demand),
    StageSpec("sft", "dSFT: TRL SFTTrainer on the dialogues.", sft, _sft_section,
              inputs=lambda r: ["generate"], gpu=True),
    StageSpec("sample", "AIF sampling: the model pool answers every prompt.", sample, _sample_section,
              inputs=lambda r: ["sft"] if _pool_uses_sft(r) else [], templates=("principle_*",), gpu=True,
              uses=pool_uses, demand=sample_estimate.demand),
    StageSpec("feedback", "AIF: the rater scores every answer; ratings become preference pairs.", feedback,
              _feedback_section, inputs=lambda r: ["sample", "sft"] if "on_policy" in r.feedback.sources else ["sample"],
              templates=("feedback_*",), roles=("rater",),
              uses=lambda r: [*role_uses(r, ("rater",)), *panel_uses(r)], demand=feedback_estimate.demand),
    # version 2: a later round with reference sft and precomputed log-probs took them from the policy, not sft
    StageSpec("dpo", "dDPO: TRL DPOTrainer with the SFT model as reference.", dpo, _dpo_section,
              inputs=lambda r: ["sft", "feedback"], version=2, gpu=True, reads_review=True),
    StageSpec("evaluate", "Judge scores, win rate against the baseline, ground truth.", evaluate, _evaluate_section,
              inputs=evaluate_inputs, templates=("judge_*",), gpu=True, roles=("judge",),
              demand=evaluate_estimate.demand),
]}
STAGE_NAMES: tuple[str, ...] = tuple(STAGES)


def stage_inputs(key: str, recipe: Recipe) -> list[str]:
    """The stages (keys: `dpo`, `dpo@2`) whose outputs stage `key` reads."""
    stage, round_ = split_key(key)
    return STAGES[stage].inputs(recipe) if round_ == 1 else round_inputs(stage, recipe, round_)


def fingerprint(key: str, recipe: Recipe, _memo: dict[str, str] | None = None, store: RunStore | None = None) -> str:
    """Hash of the stage's own section (with the content of the files it reads and the identities of the
    endpoints it uses), its inputs' fingerprints, its templates and its output version; for a later round's
    stage (`dpo@2`) its round too, and the round's recipe. With feedback.review on, dpo's holds the verdicts of
    the reviews recorded in `store` (a different review re-trains it); without a store they count as unknown."""
    memo = {} if _memo is None else _memo
    if key in memo:
        return memo[key]
    stage, round_ = split_key(key)
    spec, rrecipe = STAGES[stage], round_recipe(recipe, round_)
    section = spec.section(rrecipe)
    if spec.sends_requests:
        section = {**section, "endpoints": spec.endpoint_identities(rrecipe)}
    if round_ > 1:
        section = {**section, "round": round_section(stage, recipe, round_)}
    if spec.reads_review and (reviews := review_inputs(recipe, store, round_)) is not None:
        section = {**section, "review": reviews}
    payload = {
        "stage": stage,
        "section": section,
        "inputs": {name: fingerprint(name, recipe, memo, store) for name in stage_inputs(key, recipe)},
        "templates": templates_hash(spec.templates) if spec.templates else None,
        "version": spec.version,
    }
    digest = hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()[:16]
    memo[key] = digest
    return digest


def parse_stages(text: str | None) -> list[str]:
    """`generate,sft,dpo@2` -> ordered, validated stage keys (a later round's stage is `STAGE@ROUND`); None or
    'all' -> every stage of round 1 (later rounds follow while they improve)."""
    if not text or text == "all":
        return list(STAGE_NAMES)
    names = [n.strip() for n in text.split(",") if n.strip()]
    unknown = [n for n in names if n.partition("@")[0] not in STAGES]
    if unknown:
        raise ValueError(f"unknown stage(s) {unknown}; the stages are {', '.join(STAGE_NAMES)} (a later "
                         "round's: sample@2, feedback@2, dpo@2, evaluate@2, ...)")
    keys = [split_key(n) for n in names]
    return [stage_key(stage, r) for stage, r in sorted(set(keys), key=lambda k: (k[1], STAGE_NAMES.index(k[0])))]
