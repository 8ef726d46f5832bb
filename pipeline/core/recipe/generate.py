"""The `prompts` and `generate` sections: where seed prompts come from and how dialogues are made and filtered."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator, model_validator

from pipeline.core.recipe.base import TASK_PROMPTS, Section, existing_path


class PromptSource(Section):
    """Where prompts come from: a JSONL/parquet file, a local HF dataset directory, or the recipe's task."""

    source: str = TASK_PROMPTS
    column: Literal["prompt", "messages"] | None = None
    limit: int | None = Field(None, ge=1)
    count: int = Field(64, ge=1)  # prompts drawn from the task (source: task)
    seed: int = 0  # which prompts the task draws

    @field_validator("source")
    @classmethod
    def _source_exists(cls, value: str) -> str:
        return value if value == TASK_PROMPTS else existing_path(value, "a prompts file or dataset directory")

    @property
    def from_task(self) -> bool:
        return self.source == TASK_PROMPTS


class SelfInstructConfig(Section):
    enabled: bool = False
    target_count: int = Field(0, ge=0)
    examples_per_request: int = Field(8, ge=1)
    seed_examples_per_request: int = Field(6, ge=0)
    tasks_per_request: int = Field(8, ge=1)
    rouge_threshold: float = Field(0.7, gt=0, le=1)
    min_words: int = Field(3, ge=0)
    max_words: int = Field(150, ge=1)
    unsuitable_patterns: list[str] = Field(
        default_factory=lambda: [r"\bimage\b", r"\bpicture\b", r"\bgraph\b", r"\bplot\b", r"\bfile\b",
                                 r"\bdraw\b", r"\bvideo\b", r"\bdiagram\b"])
    temperature: float = Field(1.0, ge=0)
    max_rounds: int = Field(50, ge=1)


class FilterConfig(Section):
    disclaimer_patterns: list[str] = Field(
        default_factory=lambda: [r"\bas an ai\b", r"\bas a language model\b",
                                 r"\bi (?:do not|don't) have (?:personal|emotions|feelings|opinions)",
                                 r"\bi (?:am|'m) (?:just )?an ai\b", r"\bi cannot browse\b"])
    drop_truncated: bool = True
    drop_role_drift: bool = True
    drop_empty: bool = True
    dedup: bool = True
    near_dup_threshold: float = Field(0.9, gt=0, le=1)
    truecase: bool = False


class DecontamConfig(Section):
    eval_files: list[str] = Field(default_factory=list)
    ngram: int = Field(8, ge=1)

    @field_validator("eval_files")
    @classmethod
    def _files_exist(cls, files: list[str]) -> list[str]:
        return [existing_path(f, "an evaluation set file") for f in files]


class GenerateConfig(Section):
    """dSFT data: teacher-simulated multi-turn dialogues (UltraChat style)."""

    min_rounds: int = Field(1, ge=1)
    max_rounds: int = Field(3, ge=1)
    temperature: float = Field(0.7, ge=0)
    user_temperature: float = Field(0.9, ge=0)
    max_tokens: int = Field(512, ge=1)
    seed: int = 0
    shard_size: int = Field(1000, ge=1)
    max_failure_rate: float = Field(0.5, ge=0, le=1)
    self_instruct: SelfInstructConfig = Field(default_factory=SelfInstructConfig)
    filters: FilterConfig = Field(default_factory=FilterConfig)
    decontamination: DecontamConfig = Field(default_factory=DecontamConfig)

    @model_validator(mode="after")
    def _rounds(self) -> GenerateConfig:
        if self.max_rounds < self.min_rounds:
            raise ValueError(f"max_rounds ({self.max_rounds}) must be >= min_rounds ({self.min_rounds})")
        return self
