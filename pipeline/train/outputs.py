"""What a training stage leaves behind: checkpoints, the final model, metrics.json, the model card, its ledger."""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path
from typing import Any

import yaml

from pipeline.core.recipe import Recipe
from pipeline.core.store import RunStore
from pipeline.train.models import load_model

_CHECKPOINT = re.compile(r"^checkpoint-(\d+)$")


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
    try:
        from peft import PeftModel
    except ImportError:  # the `lora` extra is not installed, so no adapter can have been trained
        PeftModel = None

    if not trainer.is_world_process_zero():
        trainer.save_model(str(model_dir))  # collective under ZeRO-3/FSDP: every rank must call it
        return
    if PeftModel is not None and isinstance(trainer.model, PeftModel):
        adapter_dir = model_dir.parent / "adapter"
        trainer.save_model(str(adapter_dir))
        merged = PeftModel.from_pretrained(load_model(base_path, "cpu"), str(adapter_dir)).merge_and_unload()
        merged.save_pretrained(str(model_dir))
    else:
        trainer.save_model(str(model_dir))
    tokenizer.save_pretrained(str(model_dir))


MARKED_RULE = "the tokens inside {% generation %} markers (each answer and its end-of-turn token)"


def write_chat_format(trainer: Any, tokenizer: Any, stage_dir: Path, fmt: Any, checked: int) -> None:
    """chat_format.json: which template the model keeps and trained with, and the first training example as
    TRL tokenized it, cut into the spans the loss was (`trained`) and was not taken on."""
    if not trainer.is_world_process_zero():
        return
    row = trainer.train_dataset[0]
    ids, labels = list(row["input_ids"]), list(row["labels"])
    if row.get("seq_lengths"):  # a pack of several conversations (sft.args.packing): its first one
        ids, labels = ids[:row["seq_lengths"][0]], labels[:row["seq_lengths"][0]]
    segments: list[dict[str, Any]] = []
    for token, label in zip(ids, labels, strict=True):
        trained = label != -100
        if segments and segments[-1]["trained"] == trained:
            segments[-1]["ids"].append(token)
        else:
            segments.append({"trained": trained, "ids": [token]})
    from pipeline.train.masks import RULE

    mask = ({"how": "rendered: each prompt and answer with the model's own template", "rule": RULE} if fmt.rendered
            else {"how": "generation markers: {% generation %} in the training template", "rule": MARKED_RULE})
    report = {
        "origin": fmt.origin, "training_variant": fmt.variant, "loss_mask": mask, "system_turn": fmt.system,
        "dialogues_checked_against_native_rendering": checked,
        "native_template": fmt.native_text, "training_template": fmt.training,
        "example": {"input_ids": ids, "segments": [{"trained": s["trained"], "text": tokenizer.decode(s["ids"])}
                                                   for s in segments]},
    }
    (stage_dir / "chat_format.json").write_text(json.dumps(report, indent=2))


TENSORBOARD_DIR = "tensorboard"


def tensorboard_into(trainer: Any, stage_dir: Path) -> None:
    """With `report_to: tensorboard`, the event files go to `<stage>/tensorboard`: in the run store (a remote
    store gets them uploaded with the stage, as the model is) rather than transformers' default,
    `checkpoints/runs/<date>_<host>`, among checkpoints that are pruned. TENSORBOARD_LOGGING_DIR still wins."""
    from transformers.integrations import TensorBoardCallback

    for callback in trainer.callback_handler.callbacks:
        if isinstance(callback, TensorBoardCallback) and callback.logging_dir is None:
            callback.logging_dir = str(stage_dir / TENSORBOARD_DIR)


def tensorboard_output(store: RunStore, stage: str) -> dict[str, str]:
    """`{"tensorboard": <run>/<stage>/tensorboard}` when the stage wrote TensorBoard event files there."""
    path = store.join(stage, TENSORBOARD_DIR)
    return {"tensorboard": path} if store.fs.exists(path) else {}


def write_metrics(trainer: Any, stage_dir: Path, extra: dict[str, Any]) -> dict[str, Any]:
    """metrics.json: the final summary, the last logged values (loss, rewards, logps) and the history."""
    history = trainer.state.log_history
    logged = [h for h in history if "loss" in h and "train_runtime" not in h]
    summary = next((h for h in reversed(history) if "train_runtime" in h), {})
    args = trainer.args
    metrics = {"global_step": trainer.state.global_step, "epoch": trainer.state.epoch,
               "world_size": args.world_size,
               "effective_batch": args.per_device_train_batch_size * args.gradient_accumulation_steps
               * args.world_size,
               "batch_settings": {"per_device_train_batch_size": args.per_device_train_batch_size,
                                  "gradient_accumulation_steps": args.gradient_accumulation_steps,
                                  "num_train_epochs": args.num_train_epochs, "max_steps": args.max_steps},
               "final": logged[-1] if logged else {}, "summary": summary, "history": history, **extra}
    if trainer.is_world_process_zero():
        (stage_dir / "metrics.json").write_text(json.dumps(metrics, indent=2, sort_keys=True, default=str))
    return metrics


def write_model_card(model_dir: Path, stage: str, recipe: Recipe, store: RunStore, base: str,
                     data: str, metrics: dict[str, Any], inputs: tuple[str, ...]) -> None:
    """README.md next to the model: what it was trained from, on what, with which recipe section."""
    import transformers
    import trl

    section = getattr(recipe, stage).model_dump(mode="json")
    # the runner records each stage's fingerprint in the manifest before the stage starts
    fingerprints = {name: store.stage_state(name).fingerprint for name in (stage, *inputs)}
    final = {k: v for k, v in metrics["final"].items() if isinstance(v, int | float)}
    card = "\n".join([
        "---", "library_name: transformers", "tags: [zephyr-distill, trl, " + stage + "]", "---", "",
        f"# {recipe.name} / {store.run_name}: {stage} model", "",
        f"Trained by the `{stage}` stage of zephyr-distill with TRL {trl.__version__} "
        f"(transformers {transformers.__version__}).", "",
        f"- **Started from:** `{base}`", f"- **Data:** {data}", f"- **Run:** `{store.url}`",
        f"- **Stage fingerprint:** `{fingerprints[stage]}`; inputs: "
        + ", ".join(f"{k} `{fingerprints[k]}`" for k in inputs),
        f"- **Steps:** {metrics['global_step']} ({metrics['epoch']:.2f} epochs)", "",
        "## Final logged metrics", "", "```json", json.dumps(final, indent=2, sort_keys=True), "```", "",
        f"## Recipe section `{stage}`", "", "```yaml", yaml.safe_dump(section, sort_keys=True).rstrip(), "```", "",
        "The model keeps its own chat template; training rendered every conversation identically (see "
        "chat_format.json next to the stage's metrics).", "",
    ])
    (model_dir / "README.md").write_text(card)


def record_new_failures(store: RunStore, stage: str, failures: dict[str, str]) -> None:
    """Ledger the rejected items not yet in it (a resumed run does not count them twice)."""
    ledger = store.ledger(stage)
    known = ledger.latest()
    for item_id, reason in failures.items():
        if item_id not in known:
            ledger.record(item_id, reason)


# Fewer optimizer steps than this is a run too short to trust; the stage says so and names the settings.
MIN_STEPS = 20


def training_size(stage: str, metrics: dict[str, Any], examples: int) -> str:
    """`N steps, E epochs, effective batch B`, plus a warning naming the settings when N < MIN_STEPS."""
    steps, batch = metrics["global_step"], metrics.get("effective_batch", "?")
    text = f"{steps} steps, {metrics.get('epoch') or 0:.2f} epochs, effective batch {batch}"
    if steps < MIN_STEPS:
        settings = ", ".join(f"{stage}.args.{k}={v}" for k, v in metrics.get("batch_settings", {}).items())
        warning = (f"{stage} trained only {steps} steps (< {MIN_STEPS}) on {examples} examples; "
                   f"the steps follow from {settings} (and the number of examples): lower the batch or raise "
                   "the epochs for a run worth evaluating")
        logging.getLogger("pipeline").warning("%s", warning)
        text += f"\nWARNING: {warning}"
    return text
