"""The `preview` flow: `distill preview` under Prefect, its items and spend as artifacts of the flow run.

One flow, no task per stage: a preview is a short look at a few items, and the stages' own Prefect parts
(dispatch to the gpu pool, retries of one stage) are for runs; every stage runs in this process.
"""

from __future__ import annotations

from typing import Any

from prefect import flow, get_run_logger
from prefect.artifacts import create_markdown_artifact, create_table_artifact
from pydantic import BaseModel, ConfigDict, Field

from pipeline.core.recipe import Recipe, load_recipe
from pipeline.flows.artifacts import ProgressArtifact, artifact_key
from pipeline.flows.distill import export_teacher_key
from pipeline.run.errors import explained
from pipeline.run.preview import DEFAULT_STEPS, PreviewPlan, PreviewStore, open_preview, run_preview
from pipeline.run.preview_items import KINDS, PreviewItems, preview_items_and_spend

TITLES = {"dialogues": "dialogues", "answers": "pool answers with their ratings", "pairs": "preference pairs",
          "verdicts": "judge verdicts"}
PREVIEW = "preview"
CELL_CHARS = 400  # a table cell longer than this is cut: the whole item is in the preview's run directory


class PreviewRequest(BaseModel):
    """A preview of a recipe: n prompts through every stage, sft and dpo trained a few steps."""

    model_config = ConfigDict(extra="forbid")

    recipe_path: str = Field("configs/quickstart.yaml", description="Recipe YAML, relative to the working directory.")
    run_name: str | None = Field(None, description="The run the preview is for (default: the recipe's name); "
                                                   "its full run reuses the preview's cached requests.")
    n: int = Field(5, ge=1, description="Prompts (and evaluation items) to run through every stage.")
    steps: int = Field(DEFAULT_STEPS, ge=1, description="Training steps of sft and dpo.")
    overrides: list[str] = Field(default_factory=list, description="Recipe overrides KEY.PATH=VALUE.")

    def load(self) -> Recipe:
        return load_recipe(self.recipe_path, self.overrides)


@flow(name="preview", persist_result=True)
def preview(request: PreviewRequest = PreviewRequest()) -> dict[str, Any]:  # noqa: B008 - the UI's default form
    """n prompts through every stage of a recipe, the items and spend as artifacts; writes under <run>/preview/."""
    with explained():
        recipe = request.load()
        export_teacher_key(recipe)
        plan, store = PreviewPlan(request.n, request.steps), open_preview(recipe, request.run_name)
        get_run_logger().info("preview of run %s in %s", store.run_name, store.join())
        with ProgressArtifact.installed(f"{store.run_name}-{PREVIEW}", "preview"):
            run_preview(recipe, plan, store)
        items, spend = preview_items_and_spend(store, recipe, plan.n)
        publish_preview(store, recipe, plan, items, spend)
    return {"run_name": store.run_name, "preview_dir": store.join(), "totals": items.totals}


def publish_preview(store: PreviewStore, recipe: Recipe, plan: PreviewPlan, items: PreviewItems,
                    spend: list[dict[str, Any]]) -> None:
    """A table artifact per kind of item and a summary: what the preview changed, the spend beside the estimate."""
    for kind in KINDS:
        rows = [{k: _cell(v) for k, v in row.items()} for row in items.rows(kind)]
        create_table_artifact(rows, key=artifact_key(store.run_name, PREVIEW, kind),
                              description=f"preview of {store.run_name}: {len(rows)} of {items.total(kind)} "
                                          f"{TITLES[kind]}" + (f" (models trained {plan.steps} steps only)"
                                                               if kind == "verdicts" else ""))
    create_markdown_artifact(summary_markdown(store, recipe, plan, items, spend),
                             key=artifact_key(store.run_name, PREVIEW, "summary"),
                             description=f"preview of {store.run_name}: what it ran and what it paid")


def summary_markdown(store: PreviewStore, recipe: Recipe, plan: PreviewPlan, items: PreviewItems,
                     spend: list[dict[str, Any]]) -> str:
    """The preview's label (what it changed), its items' counts and the spend table beside the estimate."""
    lines = [f"## Preview of recipe `{recipe.name}` (run `{store.run_name}`): not a run", "",
             *[f"- {change}" for change in plan.changes(recipe)], "",
             "The student's answers and the judge's verdicts show what each stage does, not what the full run "
             "reaches.", "", f"Written to `{store.join()}`; the response cache is the run's, so `distill run` "
             "reuses these requests.", "",
             "| | " + " | ".join(KINDS) + " |", "|---|" + "---|" * len(KINDS),
             "| shown / made | " + " | ".join(f"{len(getattr(items, k))} / {items.total(k)}"
                                             for k in KINDS) + " |", "",
             "### The full run's estimate beside what the preview paid", "",
             "| stage | full run: requests | full run: $ | preview estimate: requests | preview estimate: $ | "
             "preview paid: requests | preview paid: $ | cache hits |", "|---|---|---|---|---|---|---|---|"]
    lines += [f"| {r['stage']} | {r['full_requests']:.0f} | {r['full_usd']:.4f} | {r['estimated_requests']:.0f} | "
              f"{r['estimated_usd']:.4f} | {r['paid_requests']:.0f} | {r['paid_usd']:.4f} | {r['cached']:.0f} |"
              for r in spend]
    return "\n".join(lines)


def _cell(value: Any) -> Any:
    if isinstance(value, str) and len(value) > CELL_CHARS:
        return value[:CELL_CHARS] + "…"
    return value
