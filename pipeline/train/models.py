"""Devices, the student to start from, loading models and tokenizers, and where a stage's files live."""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from pipeline.core import environment
from pipeline.core.recipe import BUILTIN_STUDENT, ComputeConfig, LoraConfig, Recipe
from pipeline.core.store import RunStore
from pipeline.train.errors import TrainingError
from pipeline.train.student import build_tiny_student

log = logging.getLogger("pipeline.train")


def detect_device(compute: ComputeConfig) -> str:
    """`cuda` or `cpu`, from compute.device and what this machine has."""
    import torch

    if compute.device == "cpu":
        return "cpu"
    if torch.cuda.is_available():
        return "cuda"
    if compute.device == "cuda":
        raise TrainingError("compute.device is 'cuda' but torch sees no CUDA device on this machine; "
                            "set compute.device: auto (or cpu) to train on the CPU")
    return "cpu"


def device_args(device: str, user_args: dict[str, Any], section: str) -> dict[str, Any]:
    """Settings TRL needs on this device; on CPU bf16 and gradient checkpointing are turned off (they fail)."""
    if device != "cpu":
        import torch

        return {"bf16": torch.cuda.is_bf16_supported()}
    forced = {"use_cpu": True, "bf16": False, "fp16": False, checkpointing_field(): False}
    for key in ("bf16", "fp16", "gradient_checkpointing", "activation_checkpointing"):
        if user_args.get(key):
            log.warning("%s.args.%s is not usable on CPU; training without it", section, key)
    return forced


def checkpointing_field() -> str:
    """The TrainingArguments field that turns activation checkpointing on (TRL's configs default it to on):
    `activation_checkpointing` from transformers 5.23, `gradient_checkpointing` before (the floor stays below:
    vLLM 0.33 caps transformers under 5.21)."""
    import dataclasses

    from transformers import TrainingArguments

    names = {f.name for f in dataclasses.fields(TrainingArguments)}
    return "activation_checkpointing" if "activation_checkpointing" in names else "gradient_checkpointing"


def resolve_base_model(recipe: Recipe, store: RunStore) -> str:
    """The student to start from: the built-in tiny student (built once into <run>/base/model), a path/id, or
    a GGUF file (converted once into a model directory)."""
    if recipe.sft.model != BUILTIN_STUDENT:
        return model_path(recipe.sft.model, "sft.model")
    if store.is_local:
        return str(build_tiny_student(Path(store.join("base", "model")), recipe))
    local = Path(tempfile.gettempdir()) / "zephyr-distill" / store.run_name / "base" / "model"
    remote = store.join("base", "model")
    if not (local / "student.json").is_file() and store.fs.exists(f"{remote}/student.json"):
        store.download_dir(local, "base", "model")
    build_tiny_student(local, recipe)  # nothing to do when the copy was built from the same recipe data
    if store.read_json(f"{remote}/student.json") != json.loads((local / "student.json").read_text()):
        store.upload_dir(local, "base", "model")
    return str(local)


def model_path(spec: str, key: str) -> str:
    """A loadable model for a recipe's model spec (`key` names it in errors): a GGUF file (or
    `package:MODULE/PATH.gguf`) converted once into a cached directory, a URL copied, a path made absolute."""
    from pipeline.core import gguf

    if gguf.is_gguf(spec):
        try:
            return gguf.hf_model_dir(spec)
        except gguf.GGUFError as exc:
            raise TrainingError(f"{key}: {exc}") from None
    if "://" in spec:  # e.g. a series' current model on shared storage (series.warm_start)
        return download_model(spec)
    path = Path(spec).expanduser()
    return str(path.resolve()) if path.exists() else spec


def download_model(url: str) -> str:
    """A model directory at an fsspec URL, copied once into the local temp dir."""
    import hashlib

    import fsspec

    local = Path(tempfile.gettempdir()) / "zephyr-distill" / "models" / hashlib.sha256(url.encode()).hexdigest()[:16]
    if not (local / "config.json").is_file():
        fs, path = fsspec.core.url_to_fs(url)
        part = local.with_name(local.name + ".part")
        for stale in (part, local):  # left by a copy that was killed
            shutil.rmtree(stale, ignore_errors=True)
        fs.get(path.rstrip("/") + "/", str(part) + "/", recursive=True)
        part.rename(local)  # whole or absent: a half copy is never taken for the model
    return str(local)


def load_tokenizer(path: str) -> Any:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(path)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_model(path: str, device: str, lora: LoraConfig | None = None,
               init_kwargs: dict[str, Any] | None = None) -> Any:
    """A causal LM from a local path or id: bf16 on GPUs that support it, fp32 on CPU, or args.model_init_kwargs."""
    import torch
    from transformers import AutoModelForCausalLM

    kwargs: dict[str, Any] = {"dtype": torch.float32}
    if device == "cuda":
        kwargs["dtype"] = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    kwargs.update(init_kwargs or {})
    if isinstance(kwargs["dtype"], str) and kwargs["dtype"] != "auto":
        kwargs["dtype"] = getattr(torch, kwargs["dtype"])
    if lora is not None and lora.load_in_4bit:
        if device != "cuda":
            raise TrainingError("lora.load_in_4bit (QLoRA) needs a CUDA GPU (bitsandbytes); set it to false on CPU")
        from transformers import BitsAndBytesConfig

        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=kwargs["dtype"])
    return AutoModelForCausalLM.from_pretrained(path, **kwargs)


def peft_config(lora: LoraConfig | None) -> Any:
    """The peft LoraConfig for a `lora:` section, or None for full fine-tuning."""
    if lora is None:
        return None
    try:
        from peft import LoraConfig as PeftLoraConfig
    except ImportError:
        raise TrainingError("a `lora:` section needs peft: pip install 'zephyr-distill[lora]'") from None
    return PeftLoraConfig(r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout,
                          target_modules=lora.target_modules, task_type="CAUSAL_LM")


@contextmanager
def local_stage_dir(store: RunStore, stage: str) -> Iterator[Path]:
    """The stage dir itself for a local store; for a remote one a local copy (its checkpoints downloaded),
    uploaded when the stage ends or stops. A rank of a multi-process run gets its parent's copy and uploads
    nothing: the parent uploads once, after every rank has finished (no rank races another's upload)."""
    if store.is_local:
        yield Path(store.stage_dir(stage))
        return
    if os.environ.get(environment.STAGE_DIR):
        yield Path(os.environ[environment.STAGE_DIR])
        return
    local = Path(tempfile.mkdtemp(prefix=f"distill-{stage}-"))
    store.download_dir(local / "checkpoints", stage, "checkpoints")
    try:
        yield local
    finally:
        t0 = time.perf_counter()
        store.upload_dir(local, stage)
        log.info("%s: uploaded %s to %s in %.1fs", stage, local, store.url, time.perf_counter() - t0)
        shutil.rmtree(local, ignore_errors=True)


def local_model(store: RunStore, stage: str) -> str:
    """A local path to `<run>/<stage>/model` (downloaded from a remote store)."""
    remote = store.join(stage, "model")
    if not store.fs.exists(f"{remote}/config.json"):
        raise TrainingError(f"{store.url}/{stage}/model holds no model; run `distill stage {stage}` first")
    if store.is_local:
        return remote
    local = Path(tempfile.mkdtemp(prefix=f"distill-{stage}-model-"))
    store.download_dir(local, stage, "model")
    return str(local)
