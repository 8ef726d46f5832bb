"""The `sample` and `feedback` sections: the model pool that answers, and how the rater's ratings become pairs."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, field_validator, model_validator

from pipeline.core.recipe.base import BUILTIN_TEACHER, Section
from pipeline.core.recipe.generate import PromptSource


class PoolModel(Section):
    """One model of the sampling pool."""

    name: str
    backend: Literal["vllm", "openai", "transformers"]
    # path, hub id, "sft" (this run's SFT model), "base" (the untrained student) or "policy" (the model being
    # improved: the SFT model in round 1, the previous round's DPO model after); an openai member without one
    # asks its endpoint's model
    model: str | None = None
    endpoint: str | None = None  # openai members: `teacher` or a name under `endpoints` (prices, cap, batch)
    base_url: str | None = None  # openai members without an endpoint: another server, unpriced (prefer endpoint)
    api_key_env: str | None = None
    temperature: float = Field(1.0, ge=0)
    top_p: float = Field(1.0, gt=0, le=1)
    max_tokens: int = Field(512, ge=1)
    batch_size: int = Field(16, ge=1)
    device: str = "auto"
    dtype: str = "auto"
    tensor_parallel_size: int = Field(1, ge=1)
    gpu_memory_utilization: float = Field(0.9, gt=0, le=1)
    max_model_len: int | None = Field(None, ge=1)
    engine_args: dict[str, Any] = Field(default_factory=dict)  # more vllm.LLM arguments (enforce_eager, ...)
    # local backends: a chat template for a model without one (a format name, Jinja text); `base` gets sft's
    chat_template: str | None = None
    principles: bool = True  # False: no principle system prompt (a student never trained with a system turn)
    # dpo.rounds > 1: a `policy` member answers in every round; any other member only in round 1 unless this
    later_rounds: bool = False

    @field_validator("base_url")
    @classmethod
    def _http_url(cls, value: str | None) -> str | None:
        if value is not None and value != BUILTIN_TEACHER and not value.startswith(("http://", "https://")):
            raise ValueError(f"'{value}' is not an http(s) URL (or '{BUILTIN_TEACHER}' for the task's own teacher)")
        return value.rstrip("/") if value else value

    @model_validator(mode="after")
    def _where_it_runs(self) -> PoolModel:
        if self.backend != "openai" and (self.endpoint or self.base_url):
            raise ValueError(f"pool model '{self.name}': endpoint and base_url are for backend openai only")
        if self.endpoint and self.base_url:
            raise ValueError(f"pool model '{self.name}': set endpoint or base_url, not both (an endpoint has its "
                             "own base_url)")
        if self.model is None and self.backend != "openai":
            raise ValueError(f"pool model '{self.name}': model is required for backend {self.backend}")
        return self


class SampleConfig(Section):
    """AIF sampling: k of the M pool models answer each prompt."""

    prompts: PromptSource | None = None  # None: the top-level `prompts` section
    pool: list[PoolModel] = Field(default_factory=list)
    k: int = Field(4, ge=1)
    seed: int = 0
    # prompt source (a prompts file's name, or the task's name) -> principles drawn from per prompt; "default" for the rest;
    # each principle is prompts/principle_<name>.jinja, "none" means no system prompt
    principles: dict[str, list[str]] = Field(
        default_factory=lambda: {"default": ["helpfulness", "honesty", "truthfulness", "verbalized_calibration"]})
    shard_size: int = Field(1000, ge=1)
    max_failure_rate: float = Field(0.5, ge=0, le=1)

    @model_validator(mode="after")
    def _pool(self) -> SampleConfig:
        names = [m.name for m in self.pool]
        if len(set(names)) != len(names):
            raise ValueError(f"pool model names must be unique, got {names}")
        empty = [source for source, chosen in self.principles.items() if not chosen]
        if empty:
            raise ValueError(f"principles for {empty} are empty; list at least one (or 'none')")
        if self.pool and self.k > len(self.pool):
            raise ValueError(f"k ({self.k}) cannot exceed the pool size ({len(self.pool)})")
        return self


class PairsConfig(Section):
    strategy: Literal["best_vs_random", "best_vs_worst"] = "best_vs_random"
    min_margin: float = Field(0.0, ge=0)
    # length-aware selection: a chosen answer longer than the rejected one must win by this much more per extra
    # word, so a judge's length bias alone cannot make a pair (0: off)
    length_margin_per_word: float = Field(0.0, ge=0)
    seed: int = 0


class ReviewConfig(Section):
    """A person reviews a sample of the pairs before DPO trains on them (README "Review before DPO")."""

    sample: int = Field(ge=1)  # pairs drawn at random (seeded) from the round's pairs; all of them when fewer
    seed: int = 0
    # how long a paused Prefect flow run waits for the answers; without Prefect nothing waits: the run stops
    # before dpo until the review is recorded
    timeout_s: int = Field(86400, ge=1)
    on_timeout: Literal["continue", "fail"] = "fail"  # continue: dpo trains on the judge's pairs as they are


class FeedbackConfig(Section):
    """AI feedback: the teacher rates every answer (UltraFeedback aspects) and pairs are formed."""

    aspects: list[Literal["instruction_following", "honesty", "truthfulness", "helpfulness"]] = Field(
        default_factory=lambda: ["instruction_following", "honesty", "truthfulness", "helpfulness"])
    overall_critique: bool = False
    max_parse_attempts: int = Field(3, ge=1)
    pairs: PairsConfig = Field(default_factory=PairsConfig)
    sources: list[Literal["pool", "on_policy", "correction"]] = Field(default_factory=lambda: ["pool"])
    on_policy_k: int = Field(4, ge=2)
    # how the on_policy samples are drawn from this run's student (model: sft)
    on_policy_sampler: PoolModel = Field(default_factory=lambda: PoolModel(
        name="on_policy", backend="transformers", model="sft", temperature=1.0, max_tokens=256, principles=False))
    max_tokens_per_answer: int = Field(256, ge=16)  # the judge's reply budget per rated answer
    seed: int = 0  # the order answers are shown in
    # position-bias mitigations: rate every aspect in this many orders (rotations of the shuffled one, so each
    # answer is shown first once when orders = answers) and average; drop a pair whose preference flips
    orders: int = Field(1, ge=1)
    drop_order_flips: bool = False
    # a panel of raters: endpoints (`teacher` or names under `endpoints`) that each rate every answer; empty: the
    # `rater` role's endpoint alone. mean: an answer's score is its mean over the panel; majority: that too, and a
    # pair forms only when more than half the raters score the chosen answer above the rejected one
    panel: list[str] = Field(default_factory=list)
    aggregate: Literal["mean", "majority"] = "mean"
    shard_size: int = Field(1000, ge=1)
    max_failure_rate: float = Field(0.5, ge=0, le=1)
    review: ReviewConfig | None = None  # off by default; it decides what dpo trains on, not feedback's output

    @model_validator(mode="after")
    def _something_to_rate(self) -> FeedbackConfig:
        if not self.aspects and not self.overall_critique:
            raise ValueError("no aspects and no overall_critique: nothing to rate answers on")
        if not self.sources:
            raise ValueError("sources is empty; use pool, on_policy and/or correction")
        if len(set(self.panel)) != len(self.panel):
            raise ValueError(f"panel names an endpoint twice: {self.panel}")
        if self.drop_order_flips and self.orders < 2:
            raise ValueError("drop_order_flips needs orders >= 2: a preference can only flip between two orders")
        if "on_policy" in self.sources and self.on_policy_sampler.temperature == 0:
            raise ValueError("on_policy_sampler.temperature is 0: its k samples would all be the same answer")
        return self
