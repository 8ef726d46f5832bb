"""AIF sampling (UltraFeedback style): k of the M pool models answer each prompt under a principle system prompt."""

from __future__ import annotations

import logging
import random
from collections import Counter, defaultdict
from collections.abc import Iterable
from typing import Any

from pipeline.backends.answers import COMPLETIONS_SCHEMA, NO_PRINCIPLE, Assignment, sample_responses
from pipeline.core.decontam import CONTAMINATED, load_decontaminator
from pipeline.core.ledger import tally
from pipeline.core.progress import progress
from pipeline.core.recipe import Recipe, SampleConfig
from pipeline.core.sources import SeedPrompt, iter_unique_prompts
from pipeline.core.stage import StageReport, conclude, say_loud_drops
from pipeline.core.store import RunStore
from pipeline.core.templates import template_names
from pipeline.stages.sample.plan import Plan

log = logging.getLogger(__name__)
STAGE = "sample"
COMPLETIONS = "completions"
PLAN_CHUNK = 4000  # assignments and drops written at a time while the plan is drawn


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


def assign_models(prompts: Iterable[SeedPrompt], cfg: SampleConfig) -> list[Assignment]:
    """For each prompt, k distinct pool models and one principle drawn from its source's list (seeded by
    prompt id, so a prompt's draw does not depend on the others)."""
    names = [m.name for m in cfg.pool]
    return [a for p in prompts for a in assignments_of(p, cfg, names)]


def assignments_of(p: SeedPrompt, cfg: SampleConfig, names: list[str]) -> list[Assignment]:
    """One prompt's k assignments, in pool order."""
    rng = random.Random(f"{cfg.seed}:{p.prompt_id}")
    chosen = rng.sample(names, cfg.k)
    principle = rng.choice(principles_for(p.source, cfg))
    return [Assignment(p, name, principle, 0, cfg.seed) for name in sorted(chosen, key=names.index)]


def plan_answers(recipe: Recipe, store: RunStore, plan: Plan) -> None:
    """Stream the unique prompts into the plan; those that share an n-gram with the recipe's evaluation sets go
    to the dropped ledger instead (once, with what matched): preference pairs are training data too."""
    cfg = recipe.sample
    decon = load_decontaminator(recipe.decontamination)
    ledger = store.ledger(STAGE, "dropped")
    known = ledger.ids()
    names = [m.name for m in cfg.pool]
    batch: list[Assignment] = []
    drops: list[tuple[str, str, int, dict]] = []
    for p in iter_unique_prompts(recipe.sample.prompts or recipe.prompts, recipe.task):
        if decon and (match := decon.match(p.prompt)) is not None:
            if p.prompt_id not in known:
                drops.append((p.prompt_id, match.reason, 1, match.detail()))
            continue
        plan.prompts += 1
        batch += assignments_of(p, cfg, names)
        if len(batch) + len(drops) >= PLAN_CHUNK:
            plan.add(batch)
            ledger.record_many(drops)
            batch, drops = [], []
    plan.add(batch)
    ledger.record_many(drops)


def run(recipe: Recipe, store: RunStore) -> StageReport:
    """Answer every prompt with k pool models, one model loaded at a time; resumable per model and chunk."""
    cfg = recipe.sample
    if not cfg.pool:
        raise SampleError("sample.pool is empty: list the models that answer the prompts (see configs/quickstart.yaml)")
    check_principles(cfg)
    with Plan(cfg.seed) as plan:
        plan_answers(recipe, store, plan)
        writer = store.shard_writer(STAGE, name=COMPLETIONS, shard_size=cfg.shard_size, id_key="completion_id",
                                    schema=COMPLETIONS_SCHEMA)
        failures = store.ledger(STAGE)
        done = writer.done_set()
        todo = Counter(a.model for a in plan.assignments(skip=done))
        stop, cost = "", Counter()
        bar = progress(STAGE, sum(todo.values()), "answer")
        with writer:
            for model in cfg.pool:
                if not todo[model.name]:
                    continue
                log.info("sample: %s answers %d prompts", model.name, todo[model.name])
                stop, used = sample_responses(model, plan.assignments(model.name, skip=done), recipe, store, writer,
                                              failures, cfg.shard_size, bar)
                cost.update(used)
                if stop:
                    break
        bar.close()
        return _finish(recipe, store, plan, dict(cost), stop)


def _finish(recipe: Recipe, store: RunStore, plan: Plan, cost: dict[str, float], stop: str) -> StageReport:
    """Account for every planned answer from what the store holds; write stats.json. The completions, the plan
    and the ledgers are read as streams."""
    out_ids = store.shard_writer(STAGE, name=COMPLETIONS, id_key="completion_id").done_set()
    failures = store.ledger(STAGE)
    failures.prune(out_ids)
    failed = failures.ids()
    failed_by_model = Counter(f.reason.split(":", 1)[0] for f in failures.iter_entries())
    pending = sum(a.completion_id not in failed for a in plan.assignments(skip=out_ids))
    per_model: dict[str, dict[str, Any]] = defaultdict(lambda: {"answers": 0, "finish_length": 0, "chars": 0})
    principles: Counter[str] = Counter()
    for r in store.read_records(STAGE, COMPLETIONS, columns=["model", "principle", "finish_reason", "completion"]):
        m = per_model[r["model"]]
        m["answers"] += 1
        m["finish_length"] += r["finish_reason"] == "length"
        m["chars"] += len(r["completion"])
        principles[r["principle"]] += 1
    for m in per_model.values():
        m["mean_chars"] = round(m.pop("chars") / max(1, m["answers"]), 1)
    dropped = tally(store.ledger(STAGE, "dropped"), lambda reason: reason.split(":", 1)[0])
    counts = {"input": len(plan), "prompts": plan.prompts, "output": len(out_ids), "failed": len(failed),
              "pending": pending, "dropped_prompts": dropped.items}
    stats = {
        "counts": counts,
        "assigned_per_model": dict(plan.by_model),
        "per_model": dict(per_model),
        "principles": dict(principles),
        "answers_per_prompt": {str(k): v for k, v in sorted(plan.answers_per_prompt(out_ids).items())},
        "failed_by_model": dict(failed_by_model),
        "dropped_prompts_by_reason": dict(dropped.by_reason),
        "decontamination": {"eval_files": recipe.decontamination.eval_files, "ngram": recipe.decontamination.ngram,
                            "prompts_by_file": dict(dropped.by_file)},
        "cost": cost,
    }
    store.write_json(store.join(STAGE, "stats.json"), stats)
    status, message = conclude(
        STAGE, stop=stop, pending=pending, failed=len(failed), total=len(plan),
        max_failure_rate=recipe.sample.max_failure_rate, ledger=store.join(STAGE, "failures.jsonl"),
        saved=f"{len(out_ids)} answers",
        done=(f"{len(out_ids)} answers to {plan.prompts} prompts from {len(recipe.sample.pool)} pool models, "
              f"{len(failed)} failed" + (f"; {dropped.items} prompts dropped ({CONTAMINATED})" if dropped.items else "")))
    message, stats["warnings"] = say_loud_drops(STAGE, message, (f.reason for f in failures.iter_entries()),
                                                len(plan))
    store.write_json(store.join(STAGE, "stats.json"), stats)
    log.info("sample: %s", message)
    return StageReport(STAGE, status, counts, cost, {"completions": store.join(STAGE)}, message)
