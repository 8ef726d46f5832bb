"""The recipe: one YAML file, one pydantic model, one section per stage plus task, teacher, storage and compute."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, ValidationError, model_validator

from pipeline.core.recipe.aif import FeedbackConfig, SampleConfig
from pipeline.core.recipe.base import Section
from pipeline.core.recipe.decontamination import DecontamConfig
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
        if self.teacher.is_builtin:
            if task is None or task.teacher_options is None:
                what = "names no task" if task is None else f"task '{self.task}' has no built-in teacher"
                raise ValueError(f"teacher.base_url is 'builtin' but the recipe {what}; set teacher.base_url "
                                 "to an OpenAI-compatible endpoint")
            try:
                task.teacher_options.model_validate(self.teacher.builtin)
            except ValidationError as exc:
                problems = "; ".join(f"teacher.builtin.{'.'.join(map(str, e['loc']))}: {e['msg']}"
                                     for e in exc.errors())
                raise ValueError(problems) from None
        if self.evaluate.checker is not None:
            try:
                load_callable(self.evaluate.checker)
            except TaskError as exc:
                raise ValueError(f"evaluate.checker: {exc}") from None
        return self

    def snapshot(self) -> dict[str, Any]:
        """The recipe as JSON-able data (it holds no secrets: keys are named, never stored)."""
        return self.model_dump(mode="json")
