"""The recipe: one YAML file, one pydantic model, one section per stage plus task, teacher, storage and compute."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, ValidationError, model_validator

from pipeline.core.recipe.aif import FeedbackConfig, SampleConfig
from pipeline.core.recipe.base import Section
from pipeline.core.recipe.decontamination import DecontamConfig
from pipeline.core.recipe.endpoints import (
    BudgetConfig,
    EstimateConfig,
    RolesConfig,
    endpoint_name_problems,
    secret_variables,
    unknown_endpoint,
)
from pipeline.core.recipe.evaluate import EvaluateConfig
from pipeline.core.recipe.generate import GenerateConfig, PromptSource
from pipeline.core.recipe.series import SeriesConfig
from pipeline.core.recipe.teacher import TeacherConfig
from pipeline.core.recipe.training import DPOStageConfig, SFTStageConfig
from pipeline.core.task import TaskError, load_callable, load_task


class StorageConfig(Section):
    root: str = "runs"
    cache_dir: str | None = None  # local dir for the response cache when root is remote


class ComputeConfig(Section):
    cpu_pool: str = "cpu"
    gpu_pool: str | None = None
    num_gpus: int = Field(0, ge=0)
    accelerate_config: str | None = None
    device: Literal["auto", "cpu", "cuda"] = "auto"


class Recipe(Section):
    """A whole distillation run, one section per stage plus task, teacher, storage and compute."""

    name: str = "distill"
    task: str | None = None  # a task plugin: a registered name (`toy`) or `package.module:Class`
    teacher: TeacherConfig = Field(default_factory=TeacherConfig)
    endpoints: dict[str, TeacherConfig] = Field(default_factory=dict)  # more endpoints, by name
    roles: RolesConfig = Field(default_factory=RolesConfig)
    budget: BudgetConfig = Field(default_factory=BudgetConfig)
    estimate: EstimateConfig = Field(default_factory=EstimateConfig)
    prompts: PromptSource = Field(default_factory=PromptSource)
    generate: GenerateConfig = Field(default_factory=GenerateConfig)
    decontamination: DecontamConfig = Field(default_factory=DecontamConfig)  # generate's and sample's prompts
    sft: SFTStageConfig = Field(default_factory=SFTStageConfig)
    sample: SampleConfig = Field(default_factory=SampleConfig)
    feedback: FeedbackConfig = Field(default_factory=FeedbackConfig)
    dpo: DPOStageConfig = Field(default_factory=DPOStageConfig)
    evaluate: EvaluateConfig = Field(default_factory=EvaluateConfig)
    storage: StorageConfig = Field(default_factory=StorageConfig)
    compute: ComputeConfig = Field(default_factory=ComputeConfig)
    series: SeriesConfig = Field(default_factory=SeriesConfig)

    _secret_variables = model_validator(mode="before")(classmethod(lambda cls, data: secret_variables(data)))

    @model_validator(mode="after")
    def _endpoints_are_known(self) -> Recipe:
        names = list(self.endpoints)
        problems = endpoint_name_problems(names)
        problems += [unknown_endpoint(f"roles.{role}", name, names) for role, name in self.roles.model_dump().items()
                     if name != "teacher" and name not in self.endpoints]
        problems += [unknown_endpoint(f"feedback.panel[{i}]", name, names)
                     for i, name in enumerate(self.feedback.panel) if name != "teacher" and name not in self.endpoints]
        for i, member in enumerate([*self.sample.pool, self.feedback.on_policy_sampler]):
            key = f"sample.pool[{i}]" if i < len(self.sample.pool) else "feedback.on_policy_sampler"
            if member.endpoint not in (None, "teacher") and member.endpoint not in self.endpoints:
                problems.append(unknown_endpoint(f"{key}.endpoint ({member.name})", member.endpoint, names))
            elif member.model is None:  # an openai member asks its endpoint's model
                member.model = (self.endpoints.get(member.endpoint or "") or self.teacher).model
        if problems:
            raise ValueError("; ".join(problems))
        return self

    @model_validator(mode="after")
    def _task_supplies_what_is_asked(self) -> Recipe:
        task = None
        if self.task is not None:
            try:
                task = load_task(self.task)
            except TaskError as exc:
                raise ValueError(f"task: {exc}") from None
        for key, src in (("prompts", self.prompts), ("sample.prompts", self.sample.prompts)):
            if src is not None and src.from_task and task is None:
                raise ValueError(f"{key}.source is 'task' but the recipe names no task; set `task:` "
                                 "(e.g. task: toy) or give a prompts file")
        builtin = {"teacher": self.teacher, **{f"endpoints.{n}": e for n, e in self.endpoints.items()}}
        for key, endpoint in builtin.items():
            if endpoint.is_builtin:
                _check_builtin(key, endpoint, task, self.task)
        if self.evaluate.checker is not None:
            try:
                load_callable(self.evaluate.checker)
            except TaskError as exc:
                raise ValueError(f"evaluate.checker: {exc}") from None
        return self

    @model_validator(mode="after")
    def _rounds_have_a_policy(self) -> Recipe:
        if self.dpo.rounds > 1 and not any(m.model == "policy" for m in self.sample.pool):
            raise ValueError("dpo.rounds > 1 needs a model that answers as the policy in every round: a "
                             "sample.pool member with model: policy (the SFT model in round 1, the previous "
                             "round's DPO model after)")
        src = self.sample.prompts or self.prompts
        if self.dpo.rounds > 1 and self.dpo.round_prompts == "fresh" and not src.from_task and src.limit is None:
            where = "sample.prompts" if self.sample.prompts else "prompts"
            raise ValueError(f"dpo.round_prompts: fresh gives each round the next {where}.limit rows of "
                             f"{src.source}; set {where}.limit (round 1 answers the first limit rows)")
        return self

    def snapshot(self) -> dict[str, Any]:
        """The recipe as JSON-able data (it holds no secrets: keys are named, never stored)."""
        return self.model_dump(mode="json")


def _check_builtin(key: str, endpoint: TeacherConfig, task: Any, name: str | None) -> None:
    """A `base_url: builtin` endpoint needs a task with a built-in teacher that takes its `builtin` options."""
    if task is None or task.teacher_options is None:
        what = "names no task" if task is None else f"task '{name}' has no built-in teacher"
        raise ValueError(f"{key}.base_url is 'builtin' but the recipe {what}; set {key}.base_url "
                         "to an OpenAI-compatible endpoint")
    try:
        task.teacher_options.model_validate(endpoint.builtin)
    except ValidationError as exc:
        problems = "; ".join(f"{key}.builtin.{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors())
        raise ValueError(problems) from None
