"""TRL configs from the recipe: `sft.args` / `dpo.args` over the stage defaults and the device's needs."""

from __future__ import annotations

import dataclasses
import difflib
from pathlib import Path
from typing import Any

from pipeline.core.recipe import Recipe
from pipeline.train.models import TrainingError, device_args


def split_model_init_kwargs(user_args: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """(args for the TRL config, args.model_init_kwargs): the stage loads the model, so it applies them."""
    args = dict(user_args)
    return args, dict(args.pop("model_init_kwargs", None) or {})


def build_trl_config(config_cls: type, section: str, user_args: dict[str, Any], defaults: dict[str, Any],
                     output_dir: Path, device: str) -> Any:
    """`config_cls(**defaults, **device settings, **user args)`; a wrong key or value is an error naming it."""
    user_args = checked_args(config_cls, section, user_args)
    merged = {**defaults, **user_args, **device_args(device, user_args, section)}
    return config_cls(output_dir=str(output_dir), **merged)


def checked_args(config_cls: type, section: str, user_args: dict[str, Any]) -> dict[str, Any]:
    """`user_args` checked against the TRL config's fields and their types; a number written as a string
    (`"2e-5"`) comes back as the number. An unknown field names the closest valid one."""
    args = normalize_args(user_args, section)
    fields = {f.name: f for f in dataclasses.fields(config_cls)}
    hints = _type_hints(config_cls)
    for key, value in list(args.items()):
        if key not in fields:
            close = difflib.get_close_matches(key, fields, n=1)
            hint = f"; did you mean {close[0]}?" if close else ""
            raise TrainingError(f"{section}.args.{key}: unknown TRL {config_cls.__name__} field{hint}")
        if key == "output_dir":
            raise TrainingError(f"{section}.args.output_dir: the stage decides where checkpoints go")
        if key in hints:
            args[key] = _checked_value(hints[key], value, f"{section}.args.{key}")
    return args


def _type_hints(config_cls: type) -> dict[str, Any]:
    import typing

    try:
        return typing.get_type_hints(config_cls)
    except Exception:  # noqa: BLE001 - an annotation that cannot be resolved here: check the names only
        return {f.name: f.type for f in dataclasses.fields(config_cls) if not isinstance(f.type, str)}


def _checked_value(hint: Any, value: Any, key: str) -> Any:
    from pydantic import TypeAdapter, ValidationError

    try:
        converted = TypeAdapter(hint).validate_python(value)
    except ValidationError as exc:
        problem = exc.errors()[0]["msg"] if exc.errors() else str(exc)
        raise TrainingError(f"{key}: {value!r} is not a valid value ({problem})") from None
    except Exception:  # noqa: BLE001 - a type pydantic cannot check (a callable, a class): leave it to TRL
        return value
    # keep the user's value unless it was text standing for a number or a flag (YAML 1.1 reads 2e-5 as text)
    return converted if isinstance(value, str) and isinstance(converted, int | float | bool) else value


def check_trl_args(recipe: Recipe) -> None:
    """Build trl.SFTConfig and trl.DPOConfig from `sft.args` and `dpo.args` (no model needed), and look up the
    chat formats named, so that a typo or a bad value fails at `distill validate`, not hours later."""
    import tempfile

    from trl import DPOConfig, SFTConfig

    from pipeline.train.templates import template_text

    named = {"sft.chat_template": recipe.sft.chat_template,
             **{f"sample.pool.{m.name}.chat_template": m.chat_template for m in recipe.sample.pool}}
    for key, chat_template in named.items():
        if chat_template is not None:
            template_text(chat_template, key)  # a format name that does not exist fails here, not after generate
    for section, cls, raw in (("sft", SFTConfig, recipe.sft.args), ("dpo", DPOConfig, recipe.dpo.trl_args())):
        args, _ = split_model_init_kwargs(raw)
        args = checked_args(cls, section, args)
        # on any machine: device settings that would fail here are the device's business, not the recipe's
        args.update({"use_cpu": True, "bf16": False, "fp16": False})
        with tempfile.TemporaryDirectory() as tmp:
            try:
                cls(output_dir=tmp, **args)
            except (ValueError, TypeError) as exc:
                raise TrainingError(f"{section}.args: trl.{cls.__name__} rejects these settings: {exc}") from None


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
