"""The `teacher` section (the default endpoint; every entry of `endpoints` takes the same keys): an
OpenAI-compatible API (or a local model served for the stages that use it), its limits, retries, prices,
budget and Batch API settings."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, field_validator, model_validator

from pipeline.core import environment
from pipeline.core.filehash import content_hash
from pipeline.core.gguf import package_file
from pipeline.core.recipe.base import BUILTIN_TEACHER, Section
from pipeline.core.recipe.serve import DEFAULT_CONCURRENCY, ServeConfig

AUTO_CEILING = 256  # max_concurrency: auto grows no further unless max_concurrency_ceiling says


class TeacherConfig(Section):
    """One endpoint: any OpenAI-compatible chat-completions API, the task's built-in one, or a served model."""

    base_url: str | None = BUILTIN_TEACHER  # None exactly when `serve` names a model instead
    serve: ServeConfig | None = None
    model: str = "toy-teacher"
    api_key_env: str | None = "OPENAI_API_KEY"
    api_key_secret_block: str | None = None
    # requests in flight at once: a number, or `auto`: found while running (AIMD, pipeline.teacher.limits),
    # between 1 and max_concurrency_ceiling
    max_concurrency: int | Literal["auto"] = 32
    max_concurrency_ceiling: int | None = Field(None, ge=1)  # only with auto; AUTO_CEILING when not given
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
            data = {**data, "api_key_env": environment.TEACHER_KEY}
        return data

    @model_validator(mode="before")
    @classmethod
    def _served_defaults(cls, data: Any) -> Any:
        """`serve` replaces `base_url`; a served model needs no key and gets its server's concurrency."""
        if not isinstance(data, dict) or data.get("serve") is None:
            return data
        if data.get("base_url") is not None:
            raise ValueError("set base_url or serve, not both (serve starts a server on loopback for the stages "
                             "that use this endpoint)")
        serve = data["serve"]
        server = serve.get("server", "transformers") if isinstance(serve, dict) else getattr(serve, "server", "")
        model = serve.get("model", "") if isinstance(serve, dict) else getattr(serve, "model", "")
        defaults = {"api_key_env": None, "max_concurrency": DEFAULT_CONCURRENCY.get(server, 1),
                    "timeout_s": 600.0, "model": str(model).rsplit("/", 1)[-1] or "served"}
        return {**defaults, **data, "base_url": None}

    @field_validator("max_concurrency", mode="before")
    @classmethod
    def _count_or_auto(cls, value: Any) -> Any:
        if value == "auto" or (isinstance(value, int) and not isinstance(value, bool) and value >= 1):
            return value
        raise ValueError(f"expected a number of requests in flight (1 or more) or 'auto' (found while running, "
                         f"up to max_concurrency_ceiling), got {value!r}")

    @model_validator(mode="after")
    def _ceiling_needs_auto(self) -> TeacherConfig:
        if self.max_concurrency_ceiling is not None and self.max_concurrency != "auto":
            raise ValueError(f"max_concurrency_ceiling applies only with max_concurrency: auto (it is fixed at "
                             f"{self.max_concurrency}); set max_concurrency: auto or drop the ceiling")
        return self

    @field_validator("structured", mode="before")
    @classmethod
    def _yaml_off(cls, value: Any) -> Any:
        return "off" if value is False else value  # YAML 1.1 reads a bare `off` as false

    @field_validator("base_url")
    @classmethod
    def _http_url(cls, value: str | None) -> str | None:
        if value is None:
            return None
        if value != BUILTIN_TEACHER and not value.startswith(("http://", "https://")):
            raise ValueError(f"'{value}' is not an http(s) URL (or '{BUILTIN_TEACHER}' for the task's own teacher)")
        return value.rstrip("/")

    @model_validator(mode="after")
    def _somewhere_to_send(self) -> TeacherConfig:
        if self.base_url is None and self.serve is None:
            raise ValueError("base_url is empty: give an OpenAI-compatible URL, 'builtin', or serve: {model: PATH}")
        return self

    @property
    def adaptive(self) -> bool:
        """Whether the client finds the concurrency itself (`max_concurrency: auto`)."""
        return self.max_concurrency == "auto"

    @property
    def concurrency_cap(self) -> int:
        """The most requests in flight: the fixed max_concurrency, or auto's ceiling."""
        if isinstance(self.max_concurrency, int):
            return self.max_concurrency
        return self.max_concurrency_ceiling or AUTO_CEILING

    @property
    def is_builtin(self) -> bool:
        return self.base_url == BUILTIN_TEACHER

    @property
    def is_served(self) -> bool:
        return self.serve is not None

    @property
    def needs_server(self) -> bool:
        """Whether a stage must start a server on loopback for this endpoint (its URL is known only then)."""
        return self.is_builtin or self.is_served

    def identity(self, structured_role: bool = False) -> dict[str, Any]:
        """What decides the teacher's answers (endpoint, limits and prices do not); `structured` only for a role
        that asks for structured replies (rater, judge), and only when on, so no other fingerprint moves."""
        ident: dict[str, Any] = {"model": self.model}
        if self.is_builtin:
            ident["builtin"] = self.builtin
        if self.serve is not None:  # the model's content, not where it lies
            model = self.serve.model
            ident["serve"] = {**self.serve.answer_settings(), "model": (
                content_hash(package_file(model)) if self.serve.is_local else model)}
        if structured_role and self.structured != "off":
            ident["structured"] = self.structured
        return ident
