"""An endpoint's `serve` section: a local model the stages that use it serve on loopback for themselves."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import Field, ValidationInfo, field_validator

from pipeline.core.gguf import package_file
from pipeline.core.recipe.base import Section, existing_path, local_path_or_id

# Server options that change where or how fast a server answers, not what: kept out of fingerprints.
NOT_ANSWERS = frozenset({"port", "host", "startup_timeout_s", "gpu_memory_utilization", "tensor_parallel_size",
                         "log_level", "max_num_seqs", "enable_cors"})
# transformers serve answers one request at a time: more in flight only queue there (and time out)
DEFAULT_CONCURRENCY = {"transformers": 1, "vllm": 32}


class ServeConfig(Section):
    """`serve: {model: PATH, server: transformers|vllm, ...}` instead of a `base_url`."""

    model: str  # a model directory, a hub id, a .gguf file or `package:MODULE/PATH.gguf` (converted once)
    server: Literal["transformers", "vllm"] = "transformers"  # vllm needs a GPU: such stages go to the gpu pool
    port: int | Literal["auto"] = "auto"
    startup_timeout_s: float = Field(600.0, gt=0)  # loading a large model takes minutes
    # vllm only: its parallelism and memory settings (the stage occupies tensor_parallel_size GPUs)
    tensor_parallel_size: int = Field(1, ge=1)
    gpu_memory_utilization: float = Field(0.9, gt=0, le=1)
    max_model_len: int | None = Field(None, ge=1)
    # more options of the server's command line, `--key value` (`true` alone: `--key`), e.g. {dtype: bfloat16}
    args: dict[str, Any] = Field(default_factory=dict)

    @field_validator("model")
    @classmethod
    def _local_model(cls, value: str, info: ValidationInfo) -> str:
        if value.startswith("package:"):
            if not package_file(value).is_file():
                raise ValueError(f"serve.model '{value}': the package has no such file")
            return value
        if value.lower().endswith(".gguf"):
            return existing_path(value, "serve.model", info)
        return local_path_or_id(value, info)

    @property
    def is_local(self) -> bool:
        return self.model.startswith("package:") or Path(self.model).exists()

    @property
    def needs_gpu(self) -> bool:
        return self.server == "vllm"

    def answer_settings(self) -> dict[str, Any]:
        """The settings that change the answers (the model's content is added by the fingerprint)."""
        data = self.model_dump(mode="json", exclude={"model", *NOT_ANSWERS})
        data["args"] = {k: v for k, v in self.args.items() if k.replace("-", "_") not in NOT_ANSWERS}
        return data
