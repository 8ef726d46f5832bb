"""The `evaluate` section: which models answer which evaluation set, the judge's budget, the promotion gate."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, ValidationInfo, field_validator

from pipeline.core.recipe.base import Section, existing_path


class EvaluateConfig(Section):
    """Judge grading, pairwise win rate against a baseline (both orders), ground truth where there is a checker.

    `models` and `baseline` are `base`, `sft`, `dpo` (this run's), `policy` (the model a round starts from: sft in
    round 1), `outputs` (the answers the evaluation set ships, e.g. AlpacaEval's `output`) or a model path/id,
    e.g. a series' current model.
    """

    prompts: str | None = None  # None: the task's held-out set (when the task has one), else prompts/eval_set.jsonl
    # ground truth for any evaluation set: `package.module:function` taking (item, answer) -> bool | float
    checker: str | None = None
    models: list[str] = Field(default_factory=lambda: ["base", "sft", "dpo"])
    baseline: str = "sft"
    heldout_count: int = Field(100, ge=1)
    max_tokens: int = Field(256, ge=1)
    backend: Literal["transformers", "vllm"] = "transformers"  # greedy answers, one model loaded at a time
    batch_size: int = Field(32, ge=1)
    judge_max_tokens: int = Field(512, ge=16)
    judge_attempts: int = Field(2, ge=1)  # a reply without a parsable verdict is asked again, then ledgered
    max_failure_rate: float = Field(0.5, ge=0, le=1)
    # categories whose reference answers the judge sees (MT-Bench: math, reasoning, coding); null: every category
    reference_categories: list[str] | None = Field(default_factory=lambda: ["math", "reasoning", "coding"])
    # the promotion gate: promote only when win rate - promote_stderr_k x standard error > promote_min_win_rate
    promote_min_win_rate: float = Field(0.5, ge=0, le=1)
    promote_stderr_k: float = Field(2.0, ge=0)

    @field_validator("prompts")
    @classmethod
    def _prompts_exist(cls, value: str | None, info: ValidationInfo) -> str | None:
        return None if value is None else existing_path(value, "an evaluation prompts file", info)

    @field_validator("models")
    @classmethod
    def _models(cls, value: list[str]) -> list[str]:
        if not value:
            raise ValueError("list at least one model to evaluate (base, sft, dpo or a path)")
        if len(set(value)) != len(value):
            raise ValueError(f"models must be unique, got {value}")
        return value
