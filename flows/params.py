"""Typed flow parameters: the Prefect UI draws its run form from these pydantic models."""

from __future__ import annotations

import re
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StringConstraints, field_validator

from pipeline.core.recipe import Recipe, load_recipe, load_recipe_text, recipe_from_dict
from pipeline.run.registry import STAGE_NAMES
from pipeline.run.runner import chosen_stages

StageName = Literal[STAGE_NAMES]  # one definition of the stages: the registry
# a later on-policy round's stage (dpo.rounds > 1), e.g. dpo@2
RoundStage = Annotated[str, StringConstraints(pattern=r"^(sample|feedback|dpo|evaluate)@([2-9]|[1-9][0-9]+)$")]
_RUN_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")


class DistillRequest(BaseModel):
    """One distillation run: which recipe, which stages, what to override."""

    model_config = ConfigDict(extra="forbid")

    recipe_path: str = Field("configs/quickstart.yaml",
                             description="Recipe YAML on the worker, relative to its working directory.")
    recipe_yaml: str | None = Field(None, description="A whole recipe inline (YAML); used instead of recipe_path.")
    run_name: str | None = Field(None, description="Run directory name; reuse one to resume it. "
                                                   "Default: the recipe's name (or series-timestamp).")
    stages: list[StageName] = Field(default_factory=lambda: list(STAGE_NAMES),
                                    description="Stages to run, in pipeline order (all of them: then the later "
                                                "on-policy rounds too, while each is kept).")
    round_stages: list[RoundStage] = Field(default_factory=list,
                                           description="Stages of later on-policy rounds to run too, e.g. dpo@2.")
    overrides: list[str] = Field(default_factory=list,
                                 description="Recipe overrides KEY.PATH=VALUE, e.g. dpo.beta=0.05.")
    series: str | None = Field(None, description="Recurring series: use only prompts no earlier run of it used.")
    force: bool = Field(False, description="Redo the chosen stages even if they completed.")
    from_round: int | None = Field(None, ge=1, description="Redo the on-policy rounds from this one on "
                                                           "(dpo.rounds > 1), whatever they did before.")

    @field_validator("overrides")
    @classmethod
    def _overrides(cls, items: list[str]) -> list[str]:
        for item in items:
            if "=" not in item or not item.split("=", 1)[0].strip():
                raise ValueError(f"override '{item}' should look like KEY.PATH=VALUE, e.g. dpo.beta=0.05")
        return items

    @field_validator("run_name", "series")
    @classmethod
    def _names(cls, value: str | None) -> str | None:
        if value is not None and not _RUN_NAME.fullmatch(value):
            raise ValueError(f"'{value}': use letters, digits, '.', '_' and '-' only")
        return value

    def stage_keys(self, recipe: Recipe) -> list[str]:
        """The stages to run, in order: every stage's and then later rounds' by default (pipeline.run.runner)."""
        whole = set(self.stages) == set(STAGE_NAMES) and not self.round_stages
        return chosen_stages(recipe, None if whole else [*self.stages, *self.round_stages], self.from_round)

    def load(self) -> Recipe:
        """The validated recipe; errors name the recipe (file or inline) and the key path."""
        if self.recipe_yaml is None:
            return load_recipe(self.recipe_path, self.overrides)
        # the same loader as files and --set: `2e-5` is a number here too
        return load_recipe_text(self.recipe_yaml, "<inline recipe_yaml>", self.overrides)


class StageRequest(BaseModel):
    """What the parent flow hands a stage flow on a worker: the resolved recipe and the run."""

    model_config = ConfigDict(extra="forbid")

    recipe: dict[str, Any] = Field(description="The resolved recipe (the run manifest's snapshot).")
    run_name: str
    force: bool = False
    round: int = Field(1, ge=1, description="The on-policy round the stage belongs to.")

    def load(self) -> Recipe:
        return recipe_from_dict(self.recipe, origin=f"<recipe of run {self.run_name}>")
