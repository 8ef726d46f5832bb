"""Training closer to the hardware: the attention kernel, Liger's kernels, padding-free SFT batches and DPO's
precomputed reference log-probs, chosen per device from what the machine has, with a log line for each choice.

On CUDA what keeps the same batches and the same loss is on by default: flash attention where flash-attn imports
(and the GPU does bf16), padding-free SFT batches with it, Liger's kernels where liger-kernel imports, and DPO's
reference log-probs computed once before training. On CPU nothing changes unless the recipe asks. Packing
(`sft.args.packing`) is never a default: it changes what a step holds. A kernel the recipe asks for that this
machine lacks is turned off with a warning instead of failing the run. Imports nothing of the recipe, so the GPU
check (benchmarks/gpu_check.py) runs it on an image without pydantic.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

log = logging.getLogger("pipeline.train")

FLASH = ("flash_attention_2", "flash_attention_3")  # preference order: FA2 is the one most models are tested with
FLASH_PACKAGES = {"flash_attention_2": "flash-attn", "flash_attention_3": "flash-attn-3 (flash_attn_interface)"}


@dataclass(frozen=True)
class Kernels:
    """The fused kernels this machine can use: flash attention implementations (best first) and Liger."""

    flash: tuple[str, ...] = ()
    liger: bool = False


@dataclass(frozen=True)
class FastPath:
    """What a stage trains with: TRL settings to add under the recipe's args, the recipe's args with what this
    machine cannot run turned off, and the model's init kwargs (its attention implementation)."""

    defaults: dict[str, Any]
    user_args: dict[str, Any]
    init_kwargs: dict[str, Any]
    chose_attention: bool = False  # the attention implementation is the fast path's choice, not the recipe's


def available_kernels(device: str) -> Kernels:
    """The kernels that import here and run on this device (flash attention and Liger need a CUDA GPU)."""
    if device != "cuda":
        return Kernels()
    import torch
    from transformers.utils import (
        is_flash_attn_2_available,
        is_flash_attn_3_available,
        is_liger_kernel_available,
    )

    flash: tuple[str, ...] = ()
    if torch.cuda.is_available() and torch.cuda.is_bf16_supported():  # flash-attn 2/3 need Ampere or newer
        found = {"flash_attention_2": is_flash_attn_2_available(), "flash_attention_3": is_flash_attn_3_available()}
        flash = tuple(name for name in FLASH if found[name])
    return Kernels(flash=flash, liger=bool(torch.cuda.is_available() and is_liger_kernel_available()))


def resolve(section: str, device: str, user_args: dict[str, Any], init_kwargs: dict[str, Any],
            kernels: Kernels | None = None) -> FastPath:
    """The fast path of `section` (sft | dpo) on `device` for the recipe's (checked) args and init kwargs."""
    kernels = kernels if kernels is not None else available_kernels(device)
    args, defaults = dict(user_args), {}
    init = attention(section, device, init_kwargs, kernels)
    flash = init.get("attn_implementation") in FLASH
    liger(section, device, args, defaults, kernels)
    if section == "sft":
        sft_batches(device, args, defaults, flash)
    elif device == "cuda" and "precompute_ref_log_probs" not in args and not args.get("sync_ref_model"):
        # the reference is frozen: one forward pass over the pairs before training instead of one per step, every
        # epoch (Zephyr's DPO runs 3); TR-DPO's synced reference (sync_ref_model) changes, so it cannot
        defaults["precompute_ref_log_probs"] = True
        log.info("dpo: reference log-probs computed once before training (dpo.args.precompute_ref_log_probs: "
                 "false turns it off)")
    return FastPath(defaults, args, init, chose_attention="attn_implementation" not in init_kwargs and flash)


def load_model(load: Callable[[dict[str, Any]], Any], fast: FastPath, section: str) -> tuple[Any, dict[str, Any]]:
    """(`load(init kwargs)`, the init kwargs it loaded with): where a model refuses the flash attention the fast
    path chose for it (its architecture lacks it, or the kernel fails to load), it loads without, as before."""
    try:
        return load(fast.init_kwargs), fast.init_kwargs
    except (ImportError, ValueError) as exc:
        if not fast.chose_attention:
            raise
        log.warning("%s: the model does not load with %s (%s); training with transformers' default attention",
                    section, fast.init_kwargs["attn_implementation"], str(exc)[:200])
        init = {k: v for k, v in fast.init_kwargs.items() if k != "attn_implementation"}
        return load(init), init


def attention(section: str, device: str, init_kwargs: dict[str, Any], kernels: Kernels) -> dict[str, Any]:
    """The model's init kwargs with the attention implementation it will train with: flash attention on CUDA
    where it imports, transformers' default in place of a flash attention that does not (with a warning), else
    as given."""
    init = dict(init_kwargs)
    wanted = init.get("attn_implementation")
    if wanted in FLASH and wanted not in kernels.flash:
        log.warning("%s.args.model_init_kwargs.attn_implementation: %s needs %s and a CUDA GPU with bf16, which "
                    "this machine lacks; training with transformers' default (sdpa where the model has it)",
                    section, wanted, FLASH_PACKAGES[wanted])
        init.pop("attn_implementation")
    elif wanted is None and kernels.flash and device == "cuda" and _half(init.get("dtype")):
        init["attn_implementation"] = kernels.flash[0]
        log.info("%s: attention with %s (set %s.args.model_init_kwargs.attn_implementation to choose another)",
                 section, kernels.flash[0], section)
    elif wanted is None and device == "cuda":
        log.info("%s: flash attention does not import here (pip install flash-attn); attention with sdpa", section)
    return init


def liger(section: str, device: str, args: dict[str, Any], defaults: dict[str, Any], kernels: Kernels) -> None:
    """Liger's fused kernels (RMSNorm, RoPE, SwiGLU; TRL keeps its own fused LM head) where liger-kernel imports."""
    if args.get("use_liger_kernel") and not kernels.liger:
        log.warning("%s.args.use_liger_kernel: liger-kernel does not import here or there is no CUDA GPU (its kernels "
                    "are Triton); training without it", section)
        args["use_liger_kernel"] = False
    elif "use_liger_kernel" not in args and kernels.liger:
        defaults["use_liger_kernel"] = True
        log.info("%s: Liger kernels on (%s.args.use_liger_kernel: false turns them off)", section, section)
    elif device == "cuda" and not kernels.liger:
        log.info("%s: liger-kernel does not import here (pip install liger-kernel); training without its kernels",
                 section)


def sft_batches(device: str, args: dict[str, Any], defaults: dict[str, Any], flash: bool) -> None:
    """Padding-free SFT batches by default with flash attention: the same conversations a step, no padding."""
    if device == "cuda" and flash and "padding_free" not in args and not args.get("packing"):
        defaults["padding_free"] = True
        log.info("sft: padding-free batches (sft.args.padding_free: false pads them)")
    elif (args.get("padding_free") or args.get("packing")) and not flash:
        # transformers 5 turns position ids that restart into a block-diagonal causal mask for sdpa and eager
        log.info("sft: padding-free batches without flash attention: the mask keeps each conversation to itself, "
                 "but attention still computes the whole flattened batch (slower, not faster)")


def padding_free_collator(args: Any, tokenizer: Any) -> Any:
    """TRL's padding-free collator where the stage flattens the batches itself (else None). TRL's own
    `padding_free` without packing refuses to truncate to `max_length`; so TRL prepares the data padded (it
    truncates and masks each conversation as always) and this collator flattens each batch into one row whose
    position ids restart at every conversation. `args.padding_free` is turned off for TRL's checks."""
    if not args.padding_free or args.packing or args.max_length is None:
        return None
    from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

    args.padding_free = False
    return DataCollatorForLanguageModeling(pad_token_id=tokenizer.pad_token_id, padding_free=True,
                                           pad_to_multiple_of=args.pad_to_multiple_of)


def summary(trainer: Any) -> dict[str, Any]:
    """What a trainer runs with, for metrics.json: attention, batches (as its collator builds them), kernels,
    reference log-probs."""
    args = trainer.args
    used = {"attn_implementation": getattr(trainer.model.config, "_attn_implementation", None),
            "padding_free": bool(getattr(trainer.data_collator, "padding_free", False)),
            "use_liger_kernel": bool(args.use_liger_kernel), "bf16": bool(args.bf16)}
    if hasattr(args, "packing"):
        used["packing"] = args.packing_strategy if args.packing else False
    if hasattr(args, "precompute_ref_log_probs"):
        used["precompute_ref_log_probs"] = bool(args.precompute_ref_log_probs)
    return used


def _half(dtype: Any) -> bool:
    """Whether a model loads in a dtype flash attention runs in (the stages load bf16 on CUDA by default)."""
    return dtype is None or str(dtype).removeprefix("torch.") in ("auto", "bfloat16", "float16")
