"""The `sft` and `dpo` sections: the student, TRL arguments (checked against TRL's configs), LoRA."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import Field, ValidationInfo, field_validator, model_validator

from pipeline.core.recipe.base import BUILTIN_STUDENT, Section, existing_path, local_path_or_id


class LoraConfig(Section):
    r: int = Field(16, ge=1)
    alpha: int = Field(32, ge=1)
    dropout: float = Field(0.05, ge=0, le=1)
    target_modules: list[str] | str = "all-linear"
    load_in_4bit: bool = False


class TinyStudentConfig(Section):
    """The built-in student (`sft.model: builtin:tiny`): a BPE tokenizer trained on the task's texts + a small Llama."""

    vocab_size: int = Field(512, ge=64)
    hidden_size: int = Field(64, ge=8)
    num_layers: int = Field(2, ge=1)
    num_heads: int = Field(4, ge=1)
    max_position_embeddings: int = Field(512, ge=16)
    seed: int = 0
    corpus_size: int = Field(2000, ge=1)  # texts the tokenizer is trained on
    corpus_seed: int = 0

    @model_validator(mode="after")
    def _heads_divide(self) -> TinyStudentConfig:
        if self.hidden_size % self.num_heads:
            raise ValueError(f"hidden_size ({self.hidden_size}) must be a multiple of num_heads ({self.num_heads})")
        return self


class SFTStageConfig(Section):
    """dSFT: TRL SFTTrainer on the generated dialogues; `args` pass through to trl.SFTConfig."""

    model: str = BUILTIN_STUDENT  # builtin:tiny, a local path (relative to the recipe file) or a hub id
    student: TinyStudentConfig = Field(default_factory=TinyStudentConfig)
    args: dict[str, Any] = Field(default_factory=dict)  # checked against trl.SFTConfig by `distill validate`
    lora: LoraConfig | None = None
    # The chat format to train and save the student in instead of its own: a format name (chatml, zephyr,
    # llama3_1, ...), Jinja text, or a .jinja file (read here, so the fingerprint covers its content).
    chat_template: str | None = None
    replace_template: bool = False  # a template no training variant renders identically: use Zephyr's instead

    @field_validator("model")
    @classmethod
    def _model_path(cls, value: str, info: ValidationInfo) -> str:
        return local_path_or_id(value, info)

    @field_validator("chat_template")
    @classmethod
    def _template_file(cls, value: str | None, info: ValidationInfo) -> str | None:
        if value is None or "{{" in value or "{%" in value or not value.endswith((".jinja", ".j2")):
            return value
        return Path(existing_path(value, "the chat template file", info)).read_text(encoding="utf-8")


class DPOStageConfig(Section):
    """dDPO: TRL DPOTrainer with the SFT model as reference; `args` pass through to trl.DPOConfig."""

    beta: float | None = Field(None, gt=0)  # shorthand for args.beta
    loss_type: list[str] | None = None  # shorthand for args.loss_type, e.g. [sigmoid, sft]
    args: dict[str, Any] = Field(default_factory=dict)  # checked against trl.DPOConfig by `distill validate`
    lora: LoraConfig | None = None  # with LoRA the reference is the adapter-disabled SFT model
    # On-policy rounds: round r >= 2 samples the previous round's model (the pool's `policy` members and those
    # with later_rounds), rates and pairs as feedback says, and trains from that model; a round must beat the
    # one before to be kept, and the first that does not ends the loop (rounds is a maximum).
    rounds: int = Field(1, ge=1)
    reference: Literal["sft", "previous"] = "sft"  # rounds >= 2: the DPO reference model
    train_on: Literal["round", "all"] = "round"  # rounds >= 2: that round's pairs, or every round's so far
    # rounds >= 2: the prompts round 1 answered (`same`), or new ones each round (`fresh`: a task's prompts
    # drawn with another seed, a file's next `prompts.limit` rows), as iterative DPO splits its prompts
    round_prompts: Literal["same", "fresh"] = "same"

    @model_validator(mode="after")
    def _no_double_keys(self) -> DPOStageConfig:
        for key in ("beta", "loss_type"):
            if getattr(self, key) is not None and key in self.args:
                raise ValueError(f"'{key}' is set both as dpo.{key} and dpo.args.{key}; keep one")
        return self

    def trl_args(self) -> dict[str, Any]:
        """dpo.args with the dpo.beta / dpo.loss_type shorthands folded in."""
        args = dict(self.args)
        if self.beta is not None:
            args["beta"] = self.beta
        if self.loss_type is not None:
            args["loss_type"] = list(self.loss_type)
        return args
