"""`distill preview`: a few prompts through every stage with the recipe's own endpoints and models, before paying
for a full run. SFT and DPO train a few steps only, so the student's answers and the judge's verdicts show what
the stages do, not what the full run will reach.

The preview writes under `<run>/preview/` (its own manifest, its stage directories) through a store view, and
shares only the run's response cache and spend ledger (`<run>/cache/`): the full run's requests that the preview
already made (the dialogues of the same first prompts, the teacher's answers in the pool) are cache hits there,
and what the preview paid is in the run's ledger under `preview:<stage>`. It never marks the run's stages done.
"""

from __future__ import annotations

import json
import tempfile
from dataclasses import dataclass
from itertools import islice
from pathlib import Path

from pipeline.core.evalsets import raw_rows
from pipeline.core.recipe import Recipe, recipe_from_dict
from pipeline.core.stage import StageReport
from pipeline.core.store import RunStore
from pipeline.run.checks import check_settings
from pipeline.run.registry import STAGE_NAMES
from pipeline.run.runner import package_versions, run_stage
from pipeline.run.status import PREVIEW_LABEL as LABEL

PREVIEW_DIR = "preview"
SHARED = ("cache",)  # what the preview shares with the full run: the response cache and the spend ledger
DEFAULT_STEPS = 4


class PreviewStore(RunStore):
    """The run store as a preview sees it: everything under `<run>/preview/` but the response cache and the
    spend ledger, whose rows are labelled `preview:<stage>` (`state_key`, which the teacher session ledgers by)."""

    def __init__(self, run: RunStore):  # a view: no directory is created
        self.root, self.run_name, self.fs, self.is_local, self.path = (run.root, run.run_name, run.fs,
                                                                       run.is_local, run.path)
        self.run = run

    def join(self, *parts: str) -> str:
        if parts and parts[0] in SHARED:
            return super().join(*parts)
        return super().join(PREVIEW_DIR, *parts)

    def state_key(self, stage: str) -> str:
        return f"{LABEL}:{stage}"


@dataclass(frozen=True)
class PreviewPlan:
    """What the preview runs: `n` prompts (and `n` evaluation items), `steps` training steps for sft and dpo."""

    n: int = 5
    steps: int = DEFAULT_STEPS

    def changes(self, recipe: Recipe) -> list[str]:
        """What the preview runs differently from the recipe, in words (printed with every preview)."""
        said = [f"{self.n} prompts of {_prompt_count(recipe)} and {self.n} evaluation items",
                f"sft and dpo train {self.steps} steps only (the full run trains what sft.args and dpo.args say)"]
        if recipe.dpo.rounds > 1:
            said.append(f"one round of {recipe.dpo.rounds}")
        if recipe.feedback.review is not None:
            said.append("no review of the pairs (they are shown below; the full run asks for the review)")
        if any(cfg.batch for cfg in [recipe.teacher, *recipe.endpoints.values()]):
            said.append("every endpoint live, at live prices (the full run's batches reuse the cached answers)")
        gen = recipe.generate
        if gen.self_instruct.enabled or gen.self_prompting.enabled:
            said.append("no self-instruct or self-prompting (they grow prompts beyond the first ones)")
        return said


def _prompt_count(recipe: Recipe) -> str:
    src = recipe.prompts
    if src.from_task:
        return str(min(src.limit or src.count, src.count))
    return str(src.limit) if src.limit else "all"


def preview_recipe(recipe: Recipe, plan: PreviewPlan, store: PreviewStore) -> Recipe:
    """The recipe trimmed to the plan: the first n prompts (the same ones the full run starts with, so their
    requests are the same), n evaluation items, a few training steps, one round, no review, no batches."""
    data = recipe.snapshot()
    for src in (data["prompts"], data["sample"].get("prompts")):
        if src is not None:
            src["limit"] = min(plan.n, src.get("limit") or plan.n)
    data["generate"]["self_instruct"]["enabled"] = data["generate"]["self_prompting"]["enabled"] = False
    for section in ("sft", "dpo"):
        data[section]["args"] = {**data[section]["args"], "max_steps": plan.steps}
    data["dpo"]["rounds"] = 1
    data["feedback"]["review"] = None  # the preview shows its pairs itself; a person reviews the full run's
    data["evaluate"]["heldout_count"] = min(plan.n, data["evaluate"]["heldout_count"])
    if data["evaluate"]["prompts"]:
        data["evaluate"]["prompts"] = first_items(data["evaluate"]["prompts"], plan.n, store)
    for endpoint in [data["teacher"], *data["endpoints"].values()]:
        endpoint["batch"] = False  # a batch may take hours; the cache key does not hold the mode
    return recipe_from_dict(data, origin=f"<preview of recipe {recipe.name}>")


def first_items(path: str, n: int, store: PreviewStore) -> str:
    """The evaluation file's first n rows as a JSONL file at a stable local path (the preview's evaluate
    fingerprint holds the path, so a second preview skips what the first finished)."""
    local = (Path(store.join("inputs")) if store.is_local else
             Path(tempfile.gettempdir()) / "zephyr-distill" / store.run_name / PREVIEW_DIR / "inputs")
    local.mkdir(parents=True, exist_ok=True)
    target = local / "evaluate.jsonl"
    rows = [row for row, _where in islice(raw_rows(path), n)]
    text = "".join(json.dumps(row, default=str, ensure_ascii=False) + "\n" for row in rows)
    if not target.is_file() or target.read_text(encoding="utf-8") != text:
        target.write_text(text, encoding="utf-8")
    return str(target)


def open_preview(recipe: Recipe, run_name: str | None = None) -> PreviewStore:
    """The preview's view of the run directory (created if need be; the run's own manifest is not written)."""
    return PreviewStore(RunStore(recipe.storage.root, run_name or recipe.name))


def run_preview(recipe: Recipe, plan: PreviewPlan, store: PreviewStore) -> list[StageReport]:
    """Run every stage of round 1 on the trimmed recipe in the preview's directory; a stage a previous preview
    finished with the same settings is skipped, and requests made before are answered from the cache."""
    trimmed = preview_recipe(recipe, plan, store)
    check_settings(trimmed, list(STAGE_NAMES))
    store.init_manifest(trimmed.snapshot(), package_versions(), list(STAGE_NAMES))
    manifest = store.read_manifest()
    manifest["preview"] = {"n": plan.n, "steps": plan.steps, "changes": plan.changes(recipe)}
    store.write_manifest(manifest)
    return [run_stage(stage, trimmed, store) for stage in STAGE_NAMES]
