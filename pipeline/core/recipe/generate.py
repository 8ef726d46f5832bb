"""The `prompts` and `generate` sections: where seed prompts come from and how dialogues are made and filtered."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, ValidationInfo, field_validator, model_validator

from pipeline.core.recipe.base import TASK_PROMPTS, Section, existing_path


class PromptSource(Section):
    """Where prompts come from: a JSONL/parquet file, a local HF dataset directory, or the recipe's task."""

    source: str = TASK_PROMPTS
    column: Literal["prompt", "messages"] | None = None
    limit: int | None = Field(None, ge=1)
    count: int = Field(64, ge=1)  # prompts drawn from the task (source: task)
    seed: int = 0  # which prompts the task draws
    skip: int = Field(0, ge=0)  # leave out the source's first `skip` prompts (before `limit` counts)

    @field_validator("source")
    @classmethod
    def _source_exists(cls, value: str, info: ValidationInfo) -> str:
        return value if value == TASK_PROMPTS else existing_path(value, "a prompts file or dataset directory", info)

    @property
    def from_task(self) -> bool:
        return self.source == TASK_PROMPTS

    def identity(self) -> dict[str, Any]:
        """What a fingerprint holds of the source (`skip` only where it is set, so older runs keep theirs)."""
        return self.model_dump(mode="json", exclude={"skip"} if self.skip == 0 else None)


class InstructionFilterConfig(Section):
    """What a new instruction (self-instruct or self-prompting) must pass to be kept."""

    rouge_threshold: float = Field(0.7, gt=0, le=1)  # kept only if ROUGE-L F <= this against every kept one
    min_words: int = Field(3, ge=0)
    max_words: int = Field(150, ge=1)
    unsuitable_patterns: list[str] = Field(
        default_factory=lambda: [r"\bimage\b", r"\bpicture\b", r"\bgraph\b", r"\bplot\b", r"\bfile\b",
                                 r"\bdraw\b", r"\bvideo\b", r"\bdiagram\b"])


class ExhaustionConfig(Section):
    """When proposing stops short of a target: `patience` rounds in a row that keep under `min_acceptance_rate`."""

    min_acceptance_rate: float = Field(0.02, ge=0, le=1)
    patience: int = Field(5, ge=1)
    max_rounds: int | None = Field(None, ge=1)  # None: no cap (the teacher budget still applies)


class SelfInstructConfig(Section):
    """Self-instruct: the teacher proposes new tasks from sampled examples until `target_count` prompts."""

    enabled: bool = False
    target_count: int = Field(0, ge=0)  # prompts in all, the seeds included
    examples_per_request: int = Field(8, ge=1)
    seed_examples_per_request: int = Field(6, ge=0)
    tasks_per_request: int = Field(8, ge=1)
    requests_per_round: int = Field(64, ge=1)
    temperature: float = Field(1.0, ge=0)
    exhaustion: ExhaustionConfig = Field(default_factory=ExhaustionConfig)

    @model_validator(mode="before")
    @classmethod
    def _filter_keys_moved(cls, data: object) -> object:
        for key in ("rouge_threshold", "min_words", "max_words", "unsuitable_patterns"):
            if isinstance(data, dict) and key in data:
                raise ValueError(f"generate.self_instruct.{key} moved to generate.instruction_filter.{key} "
                                 "(one filter for self_instruct and self_prompting)")
        if isinstance(data, dict) and "max_rounds" in data:
            raise ValueError("generate.self_instruct.max_rounds moved to generate.self_instruct.exhaustion.max_rounds "
                             "(no cap by default: proposing stops at the target or when it stops paying)")
        return data


class SelfPromptingConfig(Section):
    """Iterative self-prompting (Zephyr): answer an instruction, then write a follow-on one from the answer."""

    enabled: bool = False
    depth: int = Field(3, ge=1)  # follow-on generations below each root prompt
    branching: int = Field(2, ge=1)  # follow-ons asked of each instruction
    attempts_per_branch: int = Field(3, ge=1)  # proposals per branch before it is given up
    target_count: int | None = Field(None, ge=1)  # prompts in all (roots included); None: grow the whole tree
    temperature: float = Field(1.0, ge=0)
    max_tokens: int = Field(256, ge=1)  # the follow-on instruction's reply
    exhaustion: ExhaustionConfig = Field(default_factory=ExhaustionConfig)


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
    instruction_filter: InstructionFilterConfig = Field(default_factory=InstructionFilterConfig)
    self_instruct: SelfInstructConfig = Field(default_factory=SelfInstructConfig)
    self_prompting: SelfPromptingConfig = Field(default_factory=SelfPromptingConfig)
    filters: FilterConfig = Field(default_factory=FilterConfig)

    @model_validator(mode="before")
    @classmethod
    def _decontamination_moved(cls, data: object) -> object:
        if isinstance(data, dict) and "decontamination" in data:
            raise ValueError("generate.decontamination moved to the top-level `decontamination` section "
                             "(same keys; it now covers sample's prompts too)")
        return data

    @model_validator(mode="after")
    def _rounds(self) -> GenerateConfig:
        if self.max_rounds < self.min_rounds:
            raise ValueError(f"max_rounds ({self.max_rounds}) must be >= min_rounds ({self.min_rounds})")
        return self
