"""Shared by the sft and dpo stages: device, models, chat template, TRL configs, checkpoints, metrics, model card."""

from __future__ import annotations

import dataclasses
import difflib
import inspect
import json
import logging
import os
import re
import shutil
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import yaml

from pipeline.recipe import BUILTIN_STUDENT, ComputeConfig, LoraConfig, Recipe
from pipeline.stages import STAGES, fingerprint
from pipeline.store import RunStore

log = logging.getLogger("pipeline.train")

# Zephyr-style fallback for students whose template has no {% generation %} markers: the assistant's
# content and its end-of-turn (eos) token are inside the markers, so every turn learns to stop.
GENERIC_TRAINING_TEMPLATE = (
    "{%- for message in messages -%}"
    "<|{{ message['role'] }}|>{{ '\\n' }}"
    "{%- if message['role'] == 'assistant' -%}"
    "{% generation %}{{ message['content'] }}{{ eos_token }}{% endgeneration %}"
    "{%- else -%}{{ message['content'] }}{{ eos_token }}{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}<|assistant|>{{ '\\n' }}{%- endif -%}"
)
_CHECKPOINT = re.compile(r"^checkpoint-(\d+)$")
STUDENT_CORPUS_KEYS = {"corpus_size": 2000, "corpus_seed": 0}


class TrainingError(RuntimeError):
    """A training stage cannot start or finish; the message says where and what to do."""


# -- device ----------------------------------------------------------------------------------------
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
    # activation_checkpointing is transformers 5's name for gradient_checkpointing (TRL turns it on by default)
    forced = {"use_cpu": True, "bf16": False, "fp16": False, "activation_checkpointing": False}
    for key in ("bf16", "fp16", "gradient_checkpointing", "activation_checkpointing"):
        if user_args.get(key):
            log.warning("%s.args.%s is not usable on CPU; training without it", section, key)
    return forced


# -- models ----------------------------------------------------------------------------------------
def resolve_base_model(recipe: Recipe, store: RunStore) -> str:
    """The student to start from: the built-in tiny student (built once into <run>/base/model) or a path/id."""
    if recipe.sft.model != BUILTIN_STUDENT:
        path = Path(recipe.sft.model).expanduser()
        return str(path.resolve()) if path.exists() else recipe.sft.model
    options = student_options(recipe.sft.student)
    if store.is_local:
        return str(build_tiny_student(Path(store.join("base", "model")), options))
    local = Path(tempfile.gettempdir()) / "zephyr-distill" / store.run_name / "base" / "model"
    remote = store.join("base", "model")
    if _built_with(local, options):
        return str(local)
    if store.fs.exists(f"{remote}/student.json"):
        store.fs.get(remote + "/", str(local) + "/", recursive=True)
        if _built_with(local, options):
            return str(local)
    build_tiny_student(local, options)
    store.fs.put(str(local) + "/", remote + "/", recursive=True)
    return str(local)


def student_options(raw: dict[str, Any]) -> dict[str, Any]:
    """sft.student with defaults filled in; unknown keys are errors naming the key."""
    from pipeline.toy.student import build_student

    params = inspect.signature(build_student).parameters
    allowed = {k: p.default for k, p in params.items() if k not in ("out_dir", "corpus")}
    allowed.update(STUDENT_CORPUS_KEYS)
    unknown = sorted(set(raw) - set(allowed))
    if unknown:
        raise TrainingError(f"sft.student: unknown option(s) {unknown}; the options are {sorted(allowed)}")
    return {**allowed, **raw}


def build_tiny_student(target: Path, options: dict[str, Any]) -> Path:
    """Build the offline student unless `target` already holds one built with these options."""
    from pipeline.toy.student import build_student
    from pipeline.toy.task import corpus

    if _built_with(target, options):
        return target
    model_opts = {k: v for k, v in options.items() if k not in STUDENT_CORPUS_KEYS}
    staging = target.parent / f".building-{os.getpid()}-{target.name}"
    shutil.rmtree(staging, ignore_errors=True)
    build_student(staging, corpus(options["corpus_size"], options["corpus_seed"]), **model_opts)
    (staging / "student.json").write_text(json.dumps(options, sort_keys=True))
    shutil.rmtree(target, ignore_errors=True)
    try:
        os.replace(staging, target)  # readers see a whole student or none
    except OSError:
        if not _built_with(target, options):  # not a concurrent builder that got there first
            raise
        shutil.rmtree(staging, ignore_errors=True)
    log.info("built the tiny student into %s", target)
    return target


def _built_with(target: Path, options: dict[str, Any]) -> bool:
    marker = target / "student.json"
    return marker.is_file() and json.loads(marker.read_text()) == json.loads(json.dumps(options))


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


def ensure_training_template(tokenizer: Any) -> str:
    """Give the tokenizer a chat template with {% generation %} markers; returns where it came from."""
    from trl.chat_template_utils import get_training_chat_template, has_generation_markers

    template = tokenizer.chat_template
    if template and has_generation_markers(template):
        return "student"
    if template:
        try:
            patched = get_training_chat_template(tokenizer)
        except (ValueError, NotImplementedError):
            patched = None
        if patched:
            tokenizer.chat_template = patched
            return "trl-training"
        log.warning("the student's chat template has no {%% generation %%} markers and TRL has no training "
                    "version of it; training (and saving) with a generic Zephyr-style template instead")
    if tokenizer.eos_token is None:
        raise TrainingError("the student's tokenizer has no eos token to end assistant turns with")
    tokenizer.chat_template = GENERIC_TRAINING_TEMPLATE
    return "generic"


# -- TRL configs -----------------------------------------------------------------------------------
def split_model_init_kwargs(user_args: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """(args for the TRL config, args.model_init_kwargs): the stage loads the model, so it applies them."""
    args = dict(user_args)
    return args, dict(args.pop("model_init_kwargs", None) or {})


def build_trl_config(config_cls: type, section: str, user_args: dict[str, Any], defaults: dict[str, Any],
                     output_dir: Path, device: str) -> Any:
    """`config_cls(**defaults, **device settings, **user args)`; an unknown key is an error naming it."""
    user_args = normalize_args(user_args, section)
    known = {f.name for f in dataclasses.fields(config_cls)}
    for key in user_args:
        if key not in known:
            close = difflib.get_close_matches(key, known, n=1)
            hint = f"; did you mean '{close[0]}'?" if close else ""
            raise TrainingError(f"{section}.args.{key}: not a field of trl.{config_cls.__name__}{hint}")
    if "output_dir" in user_args:
        raise TrainingError(f"{section}.args.output_dir: the stage decides where checkpoints go ({output_dir})")
    merged = {**defaults, **user_args, **device_args(device, user_args, section)}
    return config_cls(output_dir=str(output_dir), **merged)


def normalize_args(user_args: dict[str, Any], section: str) -> dict[str, Any]:
    """Accept `warmup_ratio` (removed in transformers 5) as the fraction form of `warmup_steps`."""
    args = dict(user_args)
    if "warmup_ratio" in args:
        if "warmup_steps" in args:
            raise TrainingError(f"{section}.args: set warmup_ratio or warmup_steps, not both")
        args["warmup_steps"] = float(args.pop("warmup_ratio"))
    return args


def stage_defaults(max_positions: int | None) -> dict[str, Any]:
    """Checkpointing, logging and reporting settings shared by both stages."""
    defaults: dict[str, Any] = {
        "save_strategy": "steps", "save_steps": 0.25, "save_total_limit": 2,
        "logging_steps": 0.05, "logging_first_step": True, "report_to": "none", "seed": 0,
    }
    if max_positions:
        defaults["max_length"] = max_positions
    return defaults


def max_positions(model: Any, wanted: int) -> int:
    """`wanted`, capped at what the model's position embeddings allow."""
    limit = getattr(model.config.get_text_config(), "max_position_embeddings", None)
    return min(wanted, limit) if limit else wanted


# -- checkpoints and the final model ----------------------------------------------------------------
def last_checkpoint(checkpoints: Path) -> str | None:
    """The newest complete checkpoint (trainer_state.json is written last), or None."""
    if not checkpoints.is_dir():
        return None
    found = [(int(m.group(1)), p) for p in checkpoints.iterdir()
             if (m := _CHECKPOINT.match(p.name)) and (p / "trainer_state.json").is_file()]
    return str(max(found)[1]) if found else None


def checkpoint_step(checkpoint: str | None) -> int:
    return int(_CHECKPOINT.match(Path(checkpoint).name).group(1)) if checkpoint else 0


def save_final_model(trainer: Any, tokenizer: Any, model_dir: Path, base_path: str) -> None:
    """Save model + tokenizer (with the chat template it was trained with); LoRA adapters are merged."""
    from peft import PeftModel

    if not trainer.is_world_process_zero():
        trainer.save_model(str(model_dir))  # collective under ZeRO-3/FSDP: every rank must call it
        return
    if isinstance(trainer.model, PeftModel):
        adapter_dir = model_dir.parent / "adapter"
        trainer.save_model(str(adapter_dir))
        merged = PeftModel.from_pretrained(load_model(base_path, "cpu"), str(adapter_dir)).merge_and_unload()
        merged.save_pretrained(str(model_dir))
    else:
        trainer.save_model(str(model_dir))
    tokenizer.save_pretrained(str(model_dir))


# -- metrics and model card ------------------------------------------------------------------------
def write_metrics(trainer: Any, stage_dir: Path, extra: dict[str, Any]) -> dict[str, Any]:
    """metrics.json: the final summary, the last logged values (loss, rewards, logps) and the history."""
    history = trainer.state.log_history
    logged = [h for h in history if "loss" in h and "train_runtime" not in h]
    summary = next((h for h in reversed(history) if "train_runtime" in h), {})
    metrics = {"global_step": trainer.state.global_step, "epoch": trainer.state.epoch,
               "world_size": trainer.args.world_size,
               "final": logged[-1] if logged else {}, "summary": summary, "history": history, **extra}
    if trainer.is_world_process_zero():
        (stage_dir / "metrics.json").write_text(json.dumps(metrics, indent=2, sort_keys=True, default=str))
    return metrics


def write_model_card(model_dir: Path, stage: str, recipe: Recipe, store: RunStore, base: str,
                     data: str, metrics: dict[str, Any]) -> None:
    """README.md next to the model: what it was trained from, on what, with which recipe section."""
    import transformers
    import trl

    section = getattr(recipe, stage).model_dump(mode="json")
    inputs = {dep: fingerprint(dep, recipe) for dep in STAGES[stage].inputs(recipe)}
    final = {k: v for k, v in metrics["final"].items() if isinstance(v, int | float)}
    card = "\n".join([
        "---", "library_name: transformers", "tags: [zephyr-distill, trl, " + stage + "]", "---", "",
        f"# {recipe.name} / {store.run_name}: {stage} model", "",
        f"Trained by the `{stage}` stage of zephyr-distill with TRL {trl.__version__} "
        f"(transformers {transformers.__version__}).", "",
        f"- **Started from:** `{base}`", f"- **Data:** {data}", f"- **Run:** `{store.url}`",
        f"- **Stage fingerprint:** `{fingerprint(stage, recipe)}`; inputs: "
        + ", ".join(f"{k} `{v}`" for k, v in inputs.items()),
        f"- **Steps:** {metrics['global_step']} ({metrics['epoch']:.2f} epochs)", "",
        "## Final logged metrics", "", "```json", json.dumps(final, indent=2, sort_keys=True), "```", "",
        f"## Recipe section `{stage}`", "", "```yaml", yaml.safe_dump(section, sort_keys=True).rstrip(), "```", "",
        "The chat template saved with this model is the one it was trained with.", "",
    ])
    (model_dir / "README.md").write_text(card)


def record_new_failures(store: RunStore, stage: str, failures: dict[str, str]) -> None:
    """Ledger the rejected items not yet in it (a resumed run does not count them twice)."""
    ledger = store.ledger(stage)
    known = ledger.latest()
    for item_id, reason in failures.items():
        if item_id not in known:
            ledger.record(item_id, reason)


# -- where the stage writes ------------------------------------------------------------------------
@contextmanager
def local_stage_dir(store: RunStore, stage: str) -> Iterator[Path]:
    """The stage dir itself for a local store; for a remote one a local copy, uploaded when done or stopped."""
    if store.is_local:
        yield Path(store.stage_dir(stage))
        return
    local = Path(tempfile.mkdtemp(prefix=f"distill-{stage}-"))
    remote = store.join(stage)
    if store.fs.exists(f"{remote}/checkpoints"):
        store.fs.get(f"{remote}/checkpoints/", f"{local}/checkpoints/", recursive=True)
    try:
        yield local
    finally:
        t0 = time.perf_counter()
        store.fs.put(f"{local}/", f"{remote}/", recursive=True)
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
    store.fs.get(f"{remote}/", f"{local}/", recursive=True)
    return str(local)
