"""The `teacher` section (the default endpoint; every entry of `endpoints` takes the same keys): an
OpenAI-compatible API, its limits, retries, prices, budget and Batch API settings."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, PrivateAttr, field_validator, model_validator

from pipeline.core.recipe.base import BUILTIN_TEACHER, Section


class TeacherConfig(Section):
    """One endpoint: any OpenAI-compatible chat-completions API, or the task's built-in one."""

    base_url: str = BUILTIN_TEACHER
    model: str = "toy-teacher"
    api_key_env: str | None = "OPENAI_API_KEY"
    api_key_secret_block: str | None = None
    max_concurrency: int = Field(32, ge=1)
    requests_per_minute: float | None = Field(None, gt=0)
    tokens_per_minute: float | None = Field(None, gt=0)
    timeout_s: float = Field(60.0, gt=0)
    max_retries: int = Field(6, ge=0)
    backoff_base_s: float = Field(0.5, ge=0)
    backoff_max_s: float = Field(30.0, ge=0)
    price_input_per_1k: float = Field(0.0, ge=0)
    price_output_per_1k: float = Field(0.0, ge=0)
    max_cost_usd: float | None = Field(None, ge=0)  # caps this endpoint's spend over the whole run
    # The Batch API (/v1/files + /v1/batches): one batch per round of requests, billed at batch_discount.
    batch: bool = False
    batch_fallback: Literal["retry", "live"] = "retry"  # failed or expired lines: the next batch, or live
    batch_discount: float = Field(0.5, ge=0, le=1)  # the batch price as a share of the live price
    batch_poll_s: float = Field(30.0, gt=0)  # longest wait between two polls (the first come sooner)
    batch_max_requests: int = Field(50_000, ge=1)  # the provider's limits per input file
    batch_max_bytes: int = Field(200_000_000, ge=1024)
    # JSON-schema-constrained replies for the rater and the judge: off, always (json_schema), or auto (asked
    # for on the first request; an HTTP 400/422 to it means unsupported, and text mode is used from then on)
    structured: Literal["off", "json_schema", "auto"] = "off"
    # options of the task's built-in teacher (base_url: builtin), checked against the task's own model
    builtin: dict[str, Any] = Field(default_factory=dict)

    @model_validator(mode="before")
    @classmethod
    def _secret_needs_a_variable(cls, data: Any) -> Any:
        # The flows export a Secret block's value into a process-local variable; give it a name if none.
        if isinstance(data, dict) and data.get("api_key_secret_block") and not data.get("api_key_env"):
            data = {**data, "api_key_env": "ZEPHYR_DISTILL_TEACHER_KEY"}
        return data

    @field_validator("base_url")
    @classmethod
    def _http_url(cls, value: str) -> str:
        if value != BUILTIN_TEACHER and not value.startswith(("http://", "https://")):
            raise ValueError(f"'{value}' is not an http(s) URL (or '{BUILTIN_TEACHER}' for the task's own teacher)")
        return value.rstrip("/")

    # Where the built-in teacher listens once the runner has started it; never part of the recipe's data,
    # so fingerprints and snapshots stay those of `builtin`.
    _live_url: str | None = PrivateAttr(None)

    @property
    def is_builtin(self) -> bool:
        return self.base_url == BUILTIN_TEACHER

    @property
    def endpoint(self) -> str:
        """The URL requests go to."""
        if self.is_builtin:
            if self._live_url is None:
                raise RuntimeError("the built-in teacher is not running (use pipeline.core.runner.teacher_endpoint)")
            return self._live_url
        return self.base_url

    def with_live_url(self, url: str) -> TeacherConfig:
        copy = self.model_copy()
        copy._live_url = url
        return copy

    def identity(self, structured_role: bool = False) -> dict[str, Any]:
        """What decides the teacher's answers (endpoint, limits and prices do not); `structured` only for a role
        that asks for structured replies (rater, judge), and only when on, so no other fingerprint moves."""
        ident: dict[str, Any] = {"model": self.model}
        if self.is_builtin:
            ident["builtin"] = self.builtin
        if structured_role and self.structured != "off":
            ident["structured"] = self.structured
        return ident
