"""The recipe package: the `Recipe` model, its sections (one module per area) and the loader."""

from pipeline.core.recipe.aif import FeedbackConfig, PairsConfig, PoolModel, SampleConfig
from pipeline.core.recipe.base import BUILTIN_STUDENT, BUILTIN_TEACHER, TASK_PROMPTS, RecipeError, Section
from pipeline.core.recipe.decontamination import DecontamConfig
from pipeline.core.recipe.evaluate import EvaluateConfig
from pipeline.core.recipe.generate import (
    ExhaustionConfig,
    FilterConfig,
    GenerateConfig,
    InstructionFilterConfig,
    PromptSource,
    SelfInstructConfig,
    SelfPromptingConfig,
)
from pipeline.core.recipe.load import (
    apply_overrides,
    load_recipe,
    load_recipe_text,
    parse_override,
    recipe_from_dict,
)
from pipeline.core.recipe.model import ComputeConfig, Recipe, StorageConfig
from pipeline.core.recipe.series import SeriesConfig
from pipeline.core.recipe.teacher import TeacherConfig
from pipeline.core.recipe.training import DPOStageConfig, LoraConfig, SFTStageConfig, TinyStudentConfig

__all__ = [
    "BUILTIN_STUDENT", "BUILTIN_TEACHER", "ComputeConfig", "DPOStageConfig", "DecontamConfig", "EvaluateConfig",
    "ExhaustionConfig", "FeedbackConfig", "FilterConfig", "GenerateConfig", "InstructionFilterConfig", "LoraConfig",
    "PairsConfig", "PoolModel", "PromptSource", "Recipe", "RecipeError", "SFTStageConfig", "SampleConfig",
    "Section", "SelfInstructConfig", "SelfPromptingConfig", "SeriesConfig", "StorageConfig", "TASK_PROMPTS",
    "TeacherConfig", "TinyStudentConfig", "apply_overrides", "load_recipe", "load_recipe_text", "parse_override",
    "recipe_from_dict",
]
