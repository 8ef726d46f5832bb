"""dSFT: TRL's SFTTrainer on the teacher's dialogues, with the loss on every assistant turn."""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from pipeline.core.chat import fold_system
from pipeline.core.recipe import Recipe
from pipeline.core.stage import StageReport
from pipeline.core.store import RunStore
from pipeline.series.data import earlier_records
from pipeline.train import configs, fastpath, models, outputs, templates
from pipeline.train.launch import is_launched_rank, launch_stage, should_launch
from pipeline.train.progress import training_callbacks

log = logging.getLogger("pipeline.train")

ROLES = {"system", "user", "assistant"}


def run(recipe: Recipe, store: RunStore) -> StageReport:
    """Fine-tune the student on `generate`'s dialogues (and a series' earlier ones) into `<run>/sft/model`."""
    total, dialogues, failures = read_dialogues(store)
    new = len(dialogues)
    earlier_total, earlier, earlier_failures = series_dialogues(recipe, store)
    total, dialogues, failures = total + earlier_total, {**dialogues, **earlier}, {**failures, **earlier_failures}
    if not is_launched_rank():
        outputs.record_new_failures(store, "sft", failures)
    if not dialogues:
        raise models.TrainingError(f"sft: no usable dialogues in {store.url}/generate ({len(failures)} rejected; "
                                   f"see {store.url}/sft/failures.jsonl)")
    if should_launch(recipe.compute):
        models.resolve_base_model(recipe, store)  # build the tiny student once, not once per rank
        launch_stage("sft", recipe, store, entry=__package__)
        metrics = store.read_json(store.join("sft", "metrics.json"))
    else:
        metrics = train_sft(recipe, store, dialogues)
    counts = {"input": total, "output": len(dialogues), "failed": len(failures)}
    if recipe.series.previous_runs:  # how much of it came from the series' earlier runs
        counts.update(new=new, earlier=len(earlier), earlier_runs=len(recipe.series.previous_runs))
    return StageReport(
        "sft", counts=counts,
        outputs={"model": store.join("sft", "model"), "metrics": store.join("sft", "metrics.json"),
                 **outputs.tensorboard_output(store, "sft")},
        message=f"{len(dialogues)} dialogues, final loss {metrics['final'].get('loss', float('nan')):.4f}; "
                + outputs.training_size("sft", metrics, len(dialogues)))


def read_dialogues(store: RunStore) -> tuple[int, dict[str, list[dict[str, str]]], dict[str, str]]:
    """(records read, {prompt_id: usable message list} in prompt_id order, {prompt_id: reason} for the rest)."""
    return usable_dialogues(store.read_records("generate"))


def usable_dialogues(records: Iterable[dict[str, Any]],
                     prefix: str = "") -> tuple[int, dict[str, list[dict[str, str]]], dict[str, str]]:
    """(records read, {prefix + prompt_id: usable message list} in id order, {prefix + prompt_id: reason}).

    Sorted by id: `generate` writes dialogues in the order the teacher finished them, and the trainer's seeded
    shuffle only gives the same batches when it starts from the same order."""
    total, dialogues, failures = 0, {}, {}
    for record in records:
        total += 1
        item_id = prefix + (record.get("prompt_id") or f"#{total}")
        messages = [{"role": m.get("role"), "content": m.get("content")} for m in record.get("messages") or []]
        problem = dialogue_problem(messages)
        if problem:
            failures[item_id] = f"sft: {problem}"
        else:
            dialogues[item_id] = messages
    return total, dict(sorted(dialogues.items())), failures


def series_dialogues(recipe: Recipe, store: RunStore) -> tuple[int, dict[str, list[dict[str, str]]], dict[str, str]]:
    """The dialogues of the series' earlier runs (`series.previous_runs`) for prompts this run has not."""
    if not recipe.series.previous_runs:
        return 0, {}, {}
    seen = {r["prompt_id"] for r in store.read_records("generate", columns=["prompt_id"])}
    total, dialogues, failures = 0, {}, {}
    for run_name, record in earlier_records(recipe, "generate"):
        if record["prompt_id"] in seen:
            continue
        seen.add(record["prompt_id"])
        n, usable, problems = usable_dialogues([record], prefix=f"{run_name}:")
        total += n
        dialogues.update(usable)
        failures.update(problems)
    return total, dialogues, failures


def dialogue_problem(messages: list[dict[str, Any]]) -> str | None:
    """Why a dialogue cannot be trained on, or None."""
    if not messages:
        return "no messages"
    roles = [m["role"] for m in messages]
    if set(roles) - ROLES:
        return f"unknown role(s) {sorted(set(roles) - ROLES, key=str)}"
    if any(not isinstance(m["content"], str) for m in messages):
        return "a message has no text content"
    if not any(r == "assistant" and m["content"].strip() for r, m in zip(roles, messages, strict=True)):
        return "no assistant turn with content"
    return None


def chat_format(recipe: Recipe, base: str, dialogues: dict[str, list[dict[str, str]]]) -> tuple[Any, Any, int]:
    """(tokenizer carrying the training template, the chat format, dialogues checked against the model's own
    rendering); a system turn the template refuses is folded into the first user turn, as sampling does."""
    tokenizer = models.load_tokenizer(base)
    fmt = templates.resolve_chat_format(tokenizer, base, recipe.sft.chat_template, recipe.sft.replace_template)
    if templates.needs_folding(fmt):
        for item_id, messages in dialogues.items():
            dialogues[item_id] = fold_system(messages)
    checked = templates.check_dialogues(tokenizer, fmt, dialogues)
    tokenizer.chat_template = fmt.training
    log.info("sft: training in %s's chat format (%s template; loss mask: %s)", base, fmt.origin,
             "derived by rendering it" if fmt.rendered else f"the {fmt.variant} training variant's markers")
    return tokenizer, fmt, checked


def train_sft(recipe: Recipe, store: RunStore, dialogues: dict[str, list[dict[str, str]]]) -> dict[str, Any]:
    """Train (resuming from the last checkpoint), save the model in its own chat format, metrics.json, the
    chat format report and the model card."""
    t0 = time.perf_counter()
    device = models.detect_device(recipe.compute)
    base = models.resolve_base_model(recipe, store)
    with models.local_stage_dir(store, "sft") as stage_dir:
        tokenizer, fmt, checked = chat_format(recipe, base, dialogues)
        trainer = sft_trainer(recipe, device, base, tokenizer, fmt, dialogues, stage_dir / "checkpoints",
                              run_name=f"{store.run_name}-sft")
        fast = fastpath.summary(trainer)
        outputs.tensorboard_into(trainer, stage_dir)
        resume = outputs.last_checkpoint(stage_dir / "checkpoints")
        if resume:
            log.info("sft: resuming from %s", resume)
        trainer.train(resume_from_checkpoint=resume)
        tokenizer.chat_template = fmt.native  # the model keeps its own format; the markers were for the loss
        outputs.save_final_model(trainer, tokenizer, stage_dir / "model", base)
        outputs.write_chat_format(trainer, tokenizer, stage_dir, fmt, checked)
        metrics = outputs.write_metrics(trainer, stage_dir, {
            "stage": "sft", "base_model": base, "chat_template": fmt.origin, "chat_template_variant": fmt.variant,
            "examples": len(dialogues), "fast_path": fast,
            "resumed_from_step": outputs.checkpoint_step(resume), "launched": is_launched_rank(),
            "device": device, "wall_seconds": time.perf_counter() - t0})
        if trainer.is_world_process_zero():
            outputs.write_model_card(stage_dir / "model", "sft", recipe, store, base,
                                    f"{len(dialogues)} teacher dialogues from `generate`", metrics, inputs=("generate",))
    return metrics


def sft_trainer(recipe: Recipe, device: str, base: str, tokenizer: Any, fmt: Any,
                dialogues: dict[str, list[dict[str, str]]], output_dir: Path, run_name: str = "sft") -> Any:
    """TRL's SFTTrainer as the stage trains: the student, its chat format's examples, Zephyr's settings under
    `sft.args`, and the device's fast path (attention, padding-free batches, kernels; pipeline.train.fastpath)."""
    from datasets import Dataset
    from transformers import set_seed
    from trl import SFTConfig, SFTTrainer

    user_args, init_kwargs = configs.split_model_init_kwargs(recipe.sft.args)
    fast = fastpath.resolve("sft", device, configs.checked_args(SFTConfig, "sft", user_args), init_kwargs)
    model, _ = fastpath.load_model(lambda init: models.load_model(base, device, recipe.sft.lora, init), fast, "sft")
    defaults = zephyr_sft_defaults(len(dialogues), configs.max_positions(model, 2048),
                                   user_args.get("per_device_train_batch_size"))
    defaults.update(fast.defaults, run_name=run_name)  # the run's name in W&B, MLflow, Trackio
    args = configs.build_trl_config(SFTConfig, "sft", fast.user_args, defaults, output_dir, device)
    set_seed(args.seed)  # TRL adds the LoRA adapters before the Trainer seeds itself: seed their init too
    examples = training_examples(tokenizer, fmt, dialogues, args.assistant_only_loss)
    if fmt.rendered:  # the mask travels in the examples; TRL refuses the flag on pre-tokenized data
        args.assistant_only_loss = False
    return SFTTrainer(model=model, args=args, processing_class=tokenizer, train_dataset=Dataset.from_list(examples),
                      data_collator=fastpath.padding_free_collator(args, tokenizer),
                      peft_config=models.peft_config(recipe.sft.lora), callbacks=training_callbacks("sft"))


def training_examples(tokenizer: Any, fmt: Any, dialogues: dict[str, list[dict[str, str]]],
                      assistant_only_loss: bool) -> list[dict[str, Any]]:
    """The trainer's dataset: the conversations, which TRL renders with the marked training template; for a
    rendered format, pre-tokenized examples whose `assistant_masks` TRL turns into the labels (-100 on every
    other token), which is what assistant_only_loss does with markers."""
    if not fmt.rendered:
        return [{"messages": m} for m in dialogues.values()]
    examples = templates.masked_examples(tokenizer, fmt, dialogues)
    if not assistant_only_loss:  # sft.args.assistant_only_loss: false trains on every token, as TRL would
        return [{"input_ids": e["input_ids"]} for e in examples]
    return examples


def zephyr_sft_defaults(examples: int, max_length: int, per_device: int | None = None) -> dict[str, Any]:
    """Zephyr's dSFT settings (lr 2e-5 cosine, warmup 0.1, 1 epoch, global batch 128) scaled to small data."""
    global_batch = min(128, max(8, examples // 32))  # at least ~32 optimizer steps per epoch
    per_device = per_device or min(16, global_batch)
    return {
        **configs.stage_defaults(max_length),
        "learning_rate": 2e-5, "lr_scheduler_type": "cosine", "warmup_steps": 0.1, "num_train_epochs": 1,
        "per_device_train_batch_size": per_device,
        "gradient_accumulation_steps": max(1, math.ceil(global_batch / per_device)),
        "assistant_only_loss": True,
    }
