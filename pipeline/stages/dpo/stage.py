"""dDPO: TRL's DPOTrainer on the teacher-ranked pairs; policy and reference both start from the SFT model (in a
later on-policy round the policy starts from the previous round's model, and the reference is `dpo.reference`)."""

from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from pipeline.core.recipe import DPOStageConfig, Recipe
from pipeline.core.rounds import round_store
from pipeline.core.stage import StageReport
from pipeline.core.store import RunStore
from pipeline.review.answers import ReviewPending, apply_review, read_review, review_path
from pipeline.review.gate import review_command
from pipeline.series.data import earlier_records
from pipeline.train import configs, fastpath, models, outputs
from pipeline.train.launch import is_launched_rank, launch_stage, should_launch
from pipeline.train.progress import training_callbacks

log = logging.getLogger("pipeline.train")


def run(recipe: Recipe, store: RunStore) -> StageReport:
    """Align the SFT model with the preference pairs of `feedback` (as a person reviewed them, with
    feedback.review on; and a series' earlier ones) into `<run>/dpo/model`."""
    total, keyed, failures, verdicts = training_pairs(recipe, store)
    pairs, new = [pair for _, pair in keyed], len(keyed)
    earlier_total, earlier, earlier_failures = series_pairs(recipe, store)
    total, pairs, failures = total + earlier_total, pairs + earlier, {**failures, **earlier_failures}
    if not is_launched_rank():
        outputs.record_new_failures(store, "dpo", failures)
        if recipe.feedback.review is not None:
            record_training_pairs(store, keyed, verdicts)
    if not pairs:
        raise models.TrainingError(f"dpo: no usable pairs in {store.url}/feedback ({len(failures)} rejected; "
                                   f"see {store.url}/dpo/failures.jsonl)")
    if should_launch(recipe.compute):
        launch_stage("dpo", recipe, store, entry=__package__)
        metrics = store.read_json(store.join("dpo", "metrics.json"))
    else:
        metrics = train_dpo(recipe, store, pairs)
    final = metrics["final"]
    counts = {"input": total, "output": len(pairs), "failed": len(failures)}
    if verdicts:  # what the review changed
        counts.update(swapped=sum(v == "swap" for v in verdicts.values()),
                      dropped_in_review=sum(v == "drop" for v in verdicts.values()))
    if recipe.series.previous_runs:  # how much of it came from the series' earlier runs
        counts.update(new=new, earlier=len(earlier), earlier_runs=len(recipe.series.previous_runs))
    return StageReport(
        "dpo", counts=counts,
        outputs={"model": store.join("dpo", "model"), "metrics": store.join("dpo", "metrics.json"),
                 **outputs.tensorboard_output(store, "dpo")},
        message=f"{len(pairs)} pairs, final loss {final.get('loss', float('nan')):.4f}, reward accuracy "
                f"{final.get('rewards/accuracies', float('nan')):.2f}; "
                + outputs.training_size("dpo", metrics, len(pairs)))


def training_pairs(recipe: Recipe, store: RunStore) -> tuple[
        int, list[tuple[str, dict[str, Any]]], dict[str, str], dict[str, str]]:
    """This round's pairs, then (dpo.train_on: all) every earlier round's, each as its review left them: records
    read, [(id, pair)], {id: why not}, {id: review verdict} (see round_pairs)."""
    total, keyed, failures, verdicts = 0, [], {}, {}
    for q in trained_rounds(recipe, store):
        n, usable, problems, reviewed = round_pairs(recipe, store, q, "" if q == store.round else f"round{q}:")
        total, keyed = total + n, [*keyed, *usable]
        failures, verdicts = {**failures, **problems}, {**verdicts, **reviewed}
    return total, keyed, failures, verdicts


def trained_rounds(recipe: Recipe, store: RunStore) -> list[int]:
    """The rounds whose pairs this round's dpo trains on: its own, then (dpo.train_on: all) every earlier one."""
    if recipe.dpo.train_on == "all" and store.round > 1:
        return [store.round, *range(1, store.round)]
    return [store.round]


def round_pairs(recipe: Recipe, store: RunStore, round_: int, prefix: str = "") -> tuple[
        int, list[tuple[str, dict[str, Any]]], dict[str, str], dict[str, str]]:
    """Round `round_`'s pairs as dpo trains on them: (records read, [(prefix + pair_id, pair in TRL's form)] in
    pair_id order, {prefix + id: why not}, {prefix + pair_id: review verdict}); with feedback.review on, swapped
    pairs are exchanged and dropped ones ledgered with the person's note. The prefix keeps apart the pairs of two
    rounds, whose ids repeat where a prompt does."""
    view = round_store(store, round_)
    records, dropped, verdicts = list(view.read_records("feedback", "pairs")), {}, {}
    if recipe.feedback.review is not None:
        review = read_review(view)
        if review is None:
            raise ReviewPending(f"dpo: round {round_}'s pairs have no recorded review (feedback.review); run "
                                f"`{review_command(view)}`")
        records, dropped, verdicts = apply_review(records, review, review_path(view, "answers.json"), prefix)
    total, keyed, failures = keyed_pairs(records, prefix)
    return (total + len(dropped), [(prefix + pid, pair) for pid, pair in keyed], {**failures, **dropped},
            {prefix + pid: verdict for pid, verdict in verdicts.items()})


def record_training_pairs(store: RunStore, keyed: list[tuple[str, dict[str, Any]]],
                          verdicts: dict[str, str]) -> None:
    """dpo/train_pairs.jsonl: the run's pairs exactly as the trainer gets them (an earlier round's ids prefixed
    `round<q>:`), with the review's verdict (null: not in the sample)."""
    lines = [json.dumps({"pair_id": pid, "review": verdicts.get(pid), "prompt": pair["prompt"],
                         "chosen": pair["chosen"], "rejected": pair["rejected"]}) for pid, pair in keyed]
    store.write_bytes(store.join("dpo", "train_pairs.jsonl"), "".join(f"{line}\n" for line in lines).encode())


def usable_pairs(records: Iterable[dict[str, Any]],
                 prefix: str = "") -> tuple[int, list[dict[str, Any]], dict[str, str]]:
    """(records read, pairs in TRL's form in pair_id order, {prefix + prompt_id: reason} for the rest)."""
    total, keyed, failures = keyed_pairs(records, prefix)
    return total, [pair for _, pair in keyed], failures


def keyed_pairs(records: Iterable[dict[str, Any]],
                prefix: str = "") -> tuple[int, list[tuple[str, dict[str, Any]]], dict[str, str]]:
    """(records read, [(pair_id, pair in TRL's form)] in pair_id order, {prefix + prompt_id: reason} for the rest).

    In pair_id order: `feedback` writes pairs as the rater finishes them, and the trainer's seeded shuffle only
    gives the same batches when it starts from the same order."""
    total, keyed, failures = 0, [], {}
    for record in records:
        total += 1
        pair = to_explicit_preference(record)
        if isinstance(pair, str):
            failures[prefix + record.get("prompt_id", f"#{total}")] = f"dpo: {pair}"
        else:  # pairs without an id (imported ones) are ordered by their content
            keyed.append((str(record.get("pair_id") or ""), json.dumps(pair, sort_keys=True), pair))
    return total, [(pid, pair) for pid, _, pair in sorted(keyed, key=lambda k: k[:2])], failures


def series_pairs(recipe: Recipe, store: RunStore) -> tuple[int, list[dict[str, Any]], dict[str, str]]:
    """The pairs of the series' earlier runs (`series.previous_runs`) that this run does not hold."""
    if not recipe.series.previous_runs:
        return 0, [], {}
    seen = {_pair_key(r) for r in store.read_records("feedback", "pairs")}
    total, pairs, failures = 0, [], {}
    for run_name, record in earlier_records(recipe, "feedback", "pairs"):
        if _pair_key(record) in seen:
            continue
        seen.add(_pair_key(record))
        n, usable, problems = usable_pairs([record], prefix=f"{run_name}:")
        total += n
        pairs.extend(usable)
        failures.update(problems)
    return total, pairs, failures


def _pair_key(record: dict[str, Any]) -> str | None:
    return record.get("pair_id") or record.get("prompt_id")


def to_explicit_preference(record: dict[str, Any]) -> dict[str, Any] | str:
    """ultrafeedback_binarized shape -> prompt = chosen[:-1], chosen/rejected = the last turn; else why not."""
    chosen = [_message(m) for m in record.get("chosen") or []]
    rejected = [_message(m) for m in record.get("rejected") or []]
    if len(chosen) < 2 or len(rejected) < 2:
        return "chosen and rejected must each hold a prompt and an answer"
    if chosen[:-1] != rejected[:-1]:
        return "chosen and rejected answer different conversations"
    if chosen[-1]["role"] != "assistant" or rejected[-1]["role"] != "assistant":
        return "chosen and rejected must end with an assistant turn"
    if chosen[-1]["content"] == rejected[-1]["content"]:
        return "chosen and rejected are the same answer"
    return {"prompt": chosen[:-1], "chosen": chosen[-1:], "rejected": rejected[-1:]}


def _message(message: dict[str, Any]) -> dict[str, str]:
    return {"role": message.get("role"), "content": message.get("content") or ""}



def train_dpo(recipe: Recipe, store: RunStore, pairs: list[dict[str, Any]]) -> dict[str, Any]:
    """Train (resuming from the last checkpoint), save the model, metrics.json and the model card."""
    t0 = time.perf_counter()
    device = models.detect_device(recipe.compute)
    sft_model = models.local_model(store, "sft")
    start = models.local_model(*store.policy()) if store.round > 1 else sft_model
    ref_path = start if recipe.dpo.reference == "previous" else sft_model
    with models.local_stage_dir(store, "dpo") as stage_dir:
        tokenizer = models.load_tokenizer(sft_model)  # carries the chat template SFT trained with
        trainer = dpo_trainer(recipe, device, start, ref_path, tokenizer, pairs, stage_dir / "checkpoints",
                              run_name=f"{store.run_name}-dpo")
        fast, args = fastpath.summary(trainer), trainer.args
        outputs.tensorboard_into(trainer, stage_dir)
        resume = outputs.last_checkpoint(stage_dir / "checkpoints")
        if resume:
            log.info("dpo: resuming from %s", resume)
        trainer.train(resume_from_checkpoint=resume)
        outputs.save_final_model(trainer, tokenizer, stage_dir / "model", start)
        metrics = outputs.write_metrics(trainer, stage_dir, {
            "stage": "dpo", "base_model": start, "reference_model": ref_path, "round": store.round,
            "pairs": len(pairs), "beta": args.beta, "fast_path": fast,
            "loss_type": list(args.loss_type), "resumed_from_step": outputs.checkpoint_step(resume),
            "launched": is_launched_rank(), "device": device, "wall_seconds": time.perf_counter() - t0})
        if trainer.is_world_process_zero():
            start_from = "this run's SFT model" if store.round == 1 else f"round {store.round - 1}'s DPO model"
            outputs.write_model_card(stage_dir / "model", "dpo", recipe, store, start_from,
                                    f"{len(pairs)} teacher-ranked preference pairs from `feedback`", metrics,
                                     inputs=("sft", "feedback"))
    return metrics


def dpo_trainer(recipe: Recipe, device: str, start: str, ref_path: str, tokenizer: Any, pairs: list[dict[str, Any]],
                output_dir: Path, run_name: str = "dpo") -> Any:
    """TRL's DPOTrainer as the stage trains: the policy from `start`, the reference from `ref_path`, Zephyr's
    settings under `dpo.args`, and the device's fast path (attention, kernels, precomputed reference log-probs)."""
    from datasets import Dataset
    from transformers import set_seed
    from trl import DPOConfig, DPOTrainer

    user_args, init_kwargs = configs.split_model_init_kwargs(recipe.dpo.trl_args())
    fast = fastpath.resolve("dpo", device, configs.checked_args(DPOConfig, "dpo", user_args), init_kwargs)
    model, init_kwargs = fastpath.load_model(lambda init: models.load_model(start, device, recipe.dpo.lora, init),
                                             fast, "dpo")
    defaults = zephyr_dpo_defaults(len(pairs), configs.max_positions(model, 1024),
                                   user_args.get("per_device_train_batch_size"))
    defaults.update(fast.defaults, run_name=run_name)  # the run's name in W&B, MLflow, Trackio
    args = configs.build_trl_config(DPOConfig, "dpo", fast.user_args, defaults, output_dir, device)
    reference = reference_model(recipe.dpo, args, ref_path, start, device, init_kwargs)
    set_seed(args.seed)  # TRL adds the LoRA adapters before the Trainer seeds itself: seed their init too
    return DPOTrainer(model=model, ref_model=reference, args=args, processing_class=tokenizer,
                      train_dataset=Dataset.from_list(pairs), peft_config=models.peft_config(recipe.dpo.lora),
                      callbacks=training_callbacks("dpo"))


def reference_model(section: DPOStageConfig, args: Any, ref_path: str, start: str, device: str,
                    init_kwargs: dict[str, Any]) -> Any:
    """A frozen copy of the reference model from its saved directory (never the hub).

    None where TRL needs none: with LoRA the reference is the adapter-disabled policy, and precomputed
    reference log-probs are taken from the policy before it trains, which is right only where the policy starts
    from the reference (round 1, or `dpo.reference: previous`).
    """
    if section.lora is not None or (args.precompute_ref_log_probs and ref_path == start):
        return None
    return models.load_model(ref_path, device, init_kwargs=init_kwargs)


def zephyr_dpo_defaults(pairs: int, max_length: int, per_device: int | None = None) -> dict[str, Any]:
    """Zephyr's dDPO settings (beta 0.1, lr 5e-7 linear, warmup 0.1, 3 epochs, global batch 32) scaled to small data."""
    global_batch = min(32, max(8, pairs // 32))
    per_device = per_device or min(8, global_batch)
    return {
        **configs.stage_defaults(max_length),
        "beta": 0.1, "learning_rate": 5e-7, "lr_scheduler_type": "linear", "warmup_steps": 0.1,
        "num_train_epochs": 3, "per_device_train_batch_size": per_device,
        "gradient_accumulation_steps": max(1, math.ceil(global_batch / per_device)),
    }
