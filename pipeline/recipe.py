"""The recipe: one YAML file, one pydantic model, one section per stage."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    PrivateAttr,
    ValidationError,
    field_validator,
    model_validator,
)

BUILTIN_TEACHER = "builtin:toy"
BUILTIN_STUDENT = "builtin:tiny"
TOY_PROMPTS = "toy"


class RecipeError(ValueError):
    """A recipe that cannot be used; the message names the file and the key path."""


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class ToyTeacherOptions(Section):
    """Behaviour of the built-in rule-based teacher (only used when base_url is builtin:toy)."""

    error_rate: float = Field(0.3, ge=0, le=1)
    seed: int = 0
    latency_ms: float = Field(0, ge=0)
    disclaimer_rate: float = Field(0.0, ge=0, le=1)
    drift_rate: float = Field(0.0, ge=0, le=1)
    empty_rate: float = Field(0.0, ge=0, le=1)
    rater_noise: float = Field(0.0, ge=0, le=1)
    messy_rater: bool = False
    fault_429: float = Field(0.0, ge=0, le=1)
    fault_500: float = Field(0.0, ge=0, le=1)
    fault_hang: float = Field(0.0, ge=0, le=1)
    fault_bad_json: float = Field(0.0, ge=0, le=1)
    fault_seed: int = 0
    retry_after_s: float = Field(1.0, ge=0)
    hang_s: float = Field(600.0, ge=0)


class TeacherConfig(Section):
    """The teacher and judge: any OpenAI-compatible chat-completions API."""

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
    max_cost_usd: float | None = Field(None, ge=0)
    toy: ToyTeacherOptions = Field(default_factory=ToyTeacherOptions)

    @model_validator(mode="before")
    @classmethod
    def _secret_needs_a_variable(cls, data: Any) -> Any:
        # The flows export a Secret block's value into a process-local variable; give it a name if none.
        if isinstance(data, dict) and data.get("api_key_secret_block") and not data.get("api_key_env"):
            data = {**data, "api_key_env": "ZEPHYR_DISTILL_TEACHER_KEY"}
        return data

    # Where the built-in teacher listens once the runner has started it; never part of the recipe's data,
    # so fingerprints and snapshots stay those of `builtin:toy`.
    _live_url: str | None = PrivateAttr(None)

    @property
    def is_builtin(self) -> bool:
        return self.base_url == BUILTIN_TEACHER

    @property
    def endpoint(self) -> str:
        """The URL requests go to."""
        if self.is_builtin:
            if self._live_url is None:
                raise RuntimeError("the built-in toy teacher is not running (use pipeline.runner.teacher_endpoint)")
            return self._live_url
        return self.base_url

    def with_live_url(self, url: str) -> TeacherConfig:
        copy = self.model_copy()
        copy._live_url = url
        return copy

    def identity(self) -> dict[str, Any]:
        """What decides the teacher's answers (endpoint, limits and prices do not)."""
        ident: dict[str, Any] = {"model": self.model}
        if self.is_builtin:
            ident["toy"] = self.toy.model_dump(mode="json")
        return ident


class PromptSource(Section):
    """Where prompts come from: a JSONL/parquet file, a local HF dataset directory, or the toy task."""

    source: str = TOY_PROMPTS
    column: Literal["prompt", "messages"] | None = None
    limit: int | None = Field(None, ge=1)
    toy_count: int = Field(64, ge=1)
    toy_seed: int = 0

    @field_validator("source")
    @classmethod
    def _source_exists(cls, value: str) -> str:
        return value if value == TOY_PROMPTS else _existing_path(value, "a prompts file or dataset directory")

    @property
    def is_toy(self) -> bool:
        return self.source == TOY_PROMPTS


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
        return [_existing_path(f, "an evaluation set file") for f in files]


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


class LoraConfig(Section):
    r: int = Field(16, ge=1)
    alpha: int = Field(32, ge=1)
    dropout: float = Field(0.05, ge=0, le=1)
    target_modules: list[str] | str = "all-linear"
    load_in_4bit: bool = False


class SFTStageConfig(Section):
    """dSFT: TRL SFTTrainer on the generated dialogues; `args` pass through to trl.SFTConfig."""

    model: str = BUILTIN_STUDENT  # builtin:tiny, a local path (relative to the recipe file) or a hub id
    student: dict[str, Any] = Field(default_factory=dict)  # options for the built-in tiny student
    args: dict[str, Any] = Field(default_factory=dict)
    lora: LoraConfig | None = None

    @field_validator("model")
    @classmethod
    def _local_model_path(cls, value: str) -> str:
        """A student directory next to the recipe becomes an absolute path; anything else stays a hub id."""
        base = _BASE_DIR.get("dir")
        if value == BUILTIN_STUDENT or base is None or "://" in value or Path(value).is_absolute():
            return value
        candidate = base / Path(value).expanduser()
        return str(candidate.resolve()) if candidate.exists() else value


class DPOStageConfig(Section):
    """dDPO: TRL DPOTrainer with the SFT model as reference; `args` pass through to trl.DPOConfig."""

    beta: float | None = Field(None, gt=0)  # shorthand for args.beta
    loss_type: list[str] | None = None  # shorthand for args.loss_type, e.g. [sigmoid, sft]
    args: dict[str, Any] = Field(default_factory=dict)
    lora: LoraConfig | None = None  # with LoRA the reference is the adapter-disabled SFT model

    @model_validator(mode="after")
    def _no_double_keys(self) -> DPOStageConfig:
        for key in ("beta", "loss_type"):
            if getattr(self, key) is not None and key in self.args:
                raise ValueError(f"'{key}' is set both as dpo.{key} and dpo.args.{key}; keep one")
        return self


class PoolModel(Section):
    """One model of the sampling pool."""

    name: str
    backend: Literal["vllm", "openai", "transformers"]
    model: str  # path, hub id, "sft" (this run's SFT model) or "base" (the untrained student)
    base_url: str | None = None
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
    principles: bool = True  # False: no principle system prompt (a student never trained with a system turn)


class SampleConfig(Section):
    """AIF sampling: k of the M pool models answer each prompt."""

    prompts: PromptSource | None = None  # None: the top-level `prompts` section
    pool: list[PoolModel] = Field(default_factory=list)
    k: int = Field(4, ge=1)
    seed: int = 0
    # prompt source (a prompts file's name, "toy") -> principles drawn from per prompt; "default" for the rest;
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
    seed: int = 0


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
    shard_size: int = Field(1000, ge=1)
    max_failure_rate: float = Field(0.5, ge=0, le=1)

    @model_validator(mode="after")
    def _something_to_rate(self) -> FeedbackConfig:
        if not self.aspects and not self.overall_critique:
            raise ValueError("no aspects and no overall_critique: nothing to rate answers on")
        if not self.sources:
            raise ValueError("sources is empty; use pool, on_policy and/or correction")
        if "on_policy" in self.sources and self.on_policy_sampler.temperature == 0:
            raise ValueError("on_policy_sampler.temperature is 0: its k samples would all be the same answer")
        return self


class EvaluateConfig(Section):
    """Judge grading, pairwise win rate against a baseline (both orders), ground truth on the toy task.

    `models` and `baseline` are `base`, `sft`, `dpo` (this run's) or a model path/id, e.g. a series' current model.
    """

    prompts: str | None = None  # None: the toy heldout set when prompts.source is toy, else prompts/eval_set.jsonl
    models: list[str] = Field(default_factory=lambda: ["base", "sft", "dpo"])
    baseline: str = "sft"
    heldout_count: int = Field(100, ge=1)
    max_tokens: int = Field(256, ge=1)
    backend: Literal["transformers", "vllm"] = "transformers"  # greedy answers, one model loaded at a time
    batch_size: int = Field(32, ge=1)
    judge_max_tokens: int = Field(512, ge=16)
    judge_attempts: int = Field(2, ge=1)  # a reply without a parsable verdict is asked again, then ledgered
    max_failure_rate: float = Field(0.5, ge=0, le=1)
    promote_min_win_rate: float = Field(0.5, ge=0, le=1)

    @field_validator("prompts")
    @classmethod
    def _prompts_exist(cls, value: str | None) -> str | None:
        return None if value is None else _existing_path(value, "an evaluation prompts file")

    @field_validator("models")
    @classmethod
    def _models(cls, value: list[str]) -> list[str]:
        if not value:
            raise ValueError("list at least one model to evaluate (base, sft, dpo or a path)")
        if len(set(value)) != len(value):
            raise ValueError(f"models must be unique, got {value}")
        return value


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
    """A whole distillation run, one section per stage plus teacher, storage and compute."""

    name: str = "distill"
    teacher: TeacherConfig = Field(default_factory=TeacherConfig)
    prompts: PromptSource = Field(default_factory=PromptSource)
    generate: GenerateConfig = Field(default_factory=GenerateConfig)
    sft: SFTStageConfig = Field(default_factory=SFTStageConfig)
    sample: SampleConfig = Field(default_factory=SampleConfig)
    feedback: FeedbackConfig = Field(default_factory=FeedbackConfig)
    dpo: DPOStageConfig = Field(default_factory=DPOStageConfig)
    evaluate: EvaluateConfig = Field(default_factory=EvaluateConfig)
    storage: StorageConfig = Field(default_factory=StorageConfig)
    compute: ComputeConfig = Field(default_factory=ComputeConfig)

    def snapshot(self) -> dict[str, Any]:
        """The recipe as JSON-able data (it holds no secrets: keys are named, never stored)."""
        return self.model_dump(mode="json")


def _existing_path(value: str, what: str) -> str:
    if "://" in value:
        return value  # remote (fsspec) paths are checked when read
    base = _BASE_DIR.get("dir")
    path = Path(value).expanduser()
    if not path.is_absolute() and base is not None:
        path = base / path
    if not path.exists():
        raise ValueError(f"{what} '{value}' does not exist (looked at {path})")
    return str(path.resolve())


# Relative paths in a recipe are resolved against the recipe file's folder while it is validated.
_BASE_DIR: dict[str, Path | None] = {"dir": None}


class _Loader(yaml.SafeLoader):
    """YAML 1.1 reads `2e-5` as a string; recipes are full of such learning rates."""


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:\d[\d_]*(?:\.\d*)?|\.\d+)[eE][-+]?\d+$|^[-+]?(?:\d[\d_]*)?\.\d+$|^[-+]?\d[\d_]*\.$"),
    list("-+0123456789."),
)


def parse_override(item: str) -> tuple[list[str], Any]:
    """Split `a.b.c=value`; the value is read as YAML (numbers, booleans, lists)."""
    if "=" not in item:
        raise RecipeError(f"--set '{item}': expected KEY.PATH=VALUE, e.g. --set dpo.beta=0.05")
    key, raw = item.split("=", 1)
    if not key.strip():
        raise RecipeError(f"--set '{item}': the key path is empty")
    try:
        value = yaml.load(raw, Loader=_Loader) if raw.strip() else ""
    except yaml.YAMLError as exc:
        raise RecipeError(f"--set '{item}': the value is not valid YAML ({exc})") from None
    return key.strip().split("."), value


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    for item in overrides:
        path, value = parse_override(item)
        node = data
        for part in path[:-1]:
            child = node.get(part)
            if child is None:
                child = node[part] = {}
            if not isinstance(child, dict):
                raise RecipeError(f"--set '{item}': '{part}' is not a section")
            node = child
        node[path[-1]] = value
    return data


def _format_validation(exc: ValidationError, origin: str) -> str:
    lines = [f"{origin}: invalid recipe ({exc.error_count()} problem{'s' if exc.error_count() > 1 else ''})"]
    for err in exc.errors():
        loc = ".".join(str(p) for p in err["loc"]) or "(top level)"
        msg = err["msg"]
        if err["type"] == "extra_forbidden":
            msg = "unknown key"
        elif err["type"].endswith("_type") or err["type"].endswith("_parsing"):
            msg = f"{msg}, got {err.get('input')!r}"
        lines.append(f"  {loc}: {msg}")
    return "\n".join(lines)


def recipe_from_dict(data: Any, origin: str = "<recipe>", base_dir: Path | None = None) -> Recipe:
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise RecipeError(f"{origin}: expected a mapping of sections at the top level, got {type(data).__name__}")
    _BASE_DIR["dir"] = base_dir
    try:
        return Recipe.model_validate(data)
    except ValidationError as exc:
        raise RecipeError(_format_validation(exc, origin)) from None
    finally:
        _BASE_DIR["dir"] = None


def load_recipe(path: str | Path, overrides: list[str] | None = None) -> Recipe:
    """Read, override and validate a recipe file; every error names the file and the key path."""
    path = Path(path)
    if not path.is_file():
        raise RecipeError(f"{path}: recipe file not found")
    try:
        data = yaml.load(path.read_text(), Loader=_Loader)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(exc, "problem", None) or str(exc)
        raise RecipeError(f"{path}:{where}: malformed YAML: {problem}") from None
    if isinstance(data, dict) and overrides:
        data = apply_overrides(data, overrides)
    return recipe_from_dict(data, origin=str(path), base_dir=path.parent.resolve())
