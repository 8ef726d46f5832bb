"""AIF sampling (UltraFeedback style): k of the M pool models answer each prompt under a principle system prompt."""

from __future__ import annotations

import logging
import random
from collections import Counter, defaultdict
from typing import Any

from pipeline.backends.answers import COMPLETIONS_SCHEMA, NO_PRINCIPLE, Assignment, sample_responses
from pipeline.core.decontam import CONTAMINATED, Match, counts_by_file, load_decontaminator
from pipeline.core.progress import progress
from pipeline.core.recipe import Recipe, SampleConfig
from pipeline.core.sources import SeedPrompt, unique_prompts
from pipeline.core.stage import StageReport, conclude, say_loud_drops
from pipeline.core.store import RunStore
from pipeline.core.templates import template_names

log = logging.getLogger(__name__)
STAGE = "sample"
COMPLETIONS = "completions"


class SampleError(ValueError):
    """A sample section that cannot be run; the message names the key."""


def principles_for(source: str, cfg: SampleConfig) -> list[str]:
    names = cfg.principles.get(source) or cfg.principles.get("default")
    if not names:
        raise SampleError(f"sample.principles has no entry for prompt source '{source}' and no 'default'; "
                          f"add one (keys now: {sorted(cfg.principles)})")
    return names


def check_principles(cfg: SampleConfig) -> None:
    """Every principle named in the recipe has its template (or is 'none')."""
    have = set(template_names())
    for source, names in cfg.principles.items():
        for name in names:
            if name != NO_PRINCIPLE and f"principle_{name}.jinja" not in have:
                known = sorted(n.removeprefix("principle_").removesuffix(".jinja") for n in have
                               if n.startswith("principle_"))
                raise SampleError(f"sample.principles.{source}: no template prompts/principle_{name}.jinja; "
                                  f"the principles are {known + [NO_PRINCIPLE]}")


def assign_models(prompts: list[SeedPrompt], cfg: SampleConfig) -> list[Assignment]:
    """For each prompt, k distinct pool models and one principle drawn from its source's list (seeded by
    prompt id, so a prompt's draw does not depend on the others)."""
    names = [m.name for m in cfg.pool]
    plan = []
    for p in prompts:
        rng = random.Random(f"{cfg.seed}:{p.prompt_id}")
        chosen = rng.sample(names, cfg.k)
        principle = rng.choice(principles_for(p.source, cfg))
        plan += [Assignment(p, name, principle, 0, cfg.seed) for name in sorted(chosen, key=names.index)]
    return plan


def decontaminate(recipe: Recipe, prompts: list[SeedPrompt]) -> tuple[list[SeedPrompt], dict[str, Match]]:
    """The prompts that share no n-gram with the recipe's evaluation sets, and what the others matched:
    preference pairs are training data too."""
    decon = load_decontaminator(recipe.decontamination)
    if not decon:
        return prompts, {}
    matches = {p.prompt_id: m for p in prompts if (m := decon.match(p.prompt)) is not None}
    return [p for p in prompts if p.prompt_id not in matches], matches


def run(recipe: Recipe, store: RunStore) -> StageReport:
    """Answer every prompt with k pool models, one model loaded at a time; resumable per model and chunk."""
    cfg = recipe.sample
    if not cfg.pool:
        raise SampleError("sample.pool is empty: list the models that answer the prompts (see configs/quickstart.yaml)")
    check_principles(cfg)
    prompts, contaminated = decontaminate(recipe, unique_prompts(recipe.sample.prompts or recipe.prompts, recipe.task))
    ledger = store.ledger(STAGE, "dropped")
    known = {e.item_id for e in ledger.entries()}
    ledger.record_many((pid, m.reason, 1, m.detail()) for pid, m in contaminated.items() if pid not in known)
    plan = assign_models(prompts, cfg)
    writer = store.shard_writer(STAGE, name=COMPLETIONS, shard_size=cfg.shard_size, id_key="completion_id",
                                schema=COMPLETIONS_SCHEMA)
    failures = store.ledger(STAGE)
    done = writer.done_ids()
    stop, cost = "", Counter()
    todo_all = [a for a in plan if a.completion_id not in done]
    bar = progress(STAGE, len(todo_all), "answer")
    with writer:
        for model in cfg.pool:
            todo = [a for a in todo_all if a.model == model.name]
            if not todo:
                continue
            log.info("sample: %s answers %d prompts", model.name, len(todo))
            stop, used = sample_responses(model, todo, recipe, store, writer, failures, cfg.shard_size, bar)
            cost.update(used)
            if stop:
                break
    bar.close()
    return _finish(recipe, store, prompts, plan, dict(cost), stop)


def _finish(recipe: Recipe, store: RunStore, prompts: list[SeedPrompt], plan: list[Assignment],
            cost: dict[str, float], stop: str) -> StageReport:
    """Account for every planned answer from what the store holds; write stats.json."""
    rows = list(store.read_records(STAGE, COMPLETIONS, columns=[
        "completion_id", "prompt_id", "model", "principle", "finish_reason", "completion", "completion_tokens"]))
    out_ids = {r["completion_id"] for r in rows}
    failed = store.ledger(STAGE).compact(out_ids)
    planned = {a.completion_id for a in plan}
    pending = len(planned - out_ids - set(failed))
    per_model: dict[str, dict[str, Any]] = defaultdict(lambda: {"answers": 0, "finish_length": 0, "chars": 0})
    for r in rows:
        m = per_model[r["model"]]
        m["answers"] += 1
        m["finish_length"] += r["finish_reason"] == "length"
        m["chars"] += len(r["completion"])
    for m in per_model.values():
        m["mean_chars"] = round(m.pop("chars") / max(1, m["answers"]), 1)
    answers_per_prompt = Counter(Counter(r["prompt_id"] for r in rows).values())
    dropped = store.ledger(STAGE, "dropped").latest()
    counts = {"input": len(planned), "prompts": len(prompts), "output": len(out_ids), "failed": len(failed),
              "pending": pending, "dropped_prompts": len(dropped)}
    stats = {
        "counts": counts,
        "assigned_per_model": dict(Counter(a.model for a in plan)),
        "per_model": dict(per_model),
        "principles": dict(Counter(r["principle"] for r in rows)),
        "answers_per_prompt": {str(k): v for k, v in sorted(answers_per_prompt.items())},
        "failed_by_model": dict(Counter(f.reason.split(":", 1)[0] for f in failed.values())),
        "dropped_prompts_by_reason": dict(Counter(d.reason.split(":", 1)[0] for d in dropped.values())),
        "decontamination": {"eval_files": recipe.decontamination.eval_files, "ngram": recipe.decontamination.ngram,
                            "prompts_by_file": counts_by_file(d.detail for d in dropped.values())},
        "cost": cost,
    }
    store.write_json(store.join(STAGE, "stats.json"), stats)
    status, message = conclude(
        STAGE, stop=stop, pending=pending, failed=len(failed), total=len(planned),
        max_failure_rate=recipe.sample.max_failure_rate, ledger=store.join(STAGE, "failures.jsonl"),
        saved=f"{len(out_ids)} answers",
        done=(f"{len(out_ids)} answers to {len(prompts)} prompts from {len(recipe.sample.pool)} pool models, "
              f"{len(failed)} failed" + (f"; {len(dropped)} prompts dropped ({CONTAMINATED})" if dropped else "")))
    message, stats["warnings"] = say_loud_drops(STAGE, message, [f.reason for f in failed.values()], len(planned))
    store.write_json(store.join(STAGE, "stats.json"), stats)
    log.info("sample: %s", message)
    return StageReport(STAGE, status, counts, cost, {"completions": store.join(STAGE)}, message)
