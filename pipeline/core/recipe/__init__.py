"""The recipe package: the `Recipe` model, its sections (one module per area) and the loader."""

from pipeline.core.recipe.aif import FeedbackConfig, PairsConfig, PoolModel, ReviewConfig, SampleConfig
from pipeline.core.recipe.base import BUILTIN_STUDENT, BUILTIN_TEACHER, TASK_PROMPTS, RecipeError, Section
from pipeline.core.recipe.decontamination import DecontamConfig
from pipeline.core.recipe.endpoints import (
    DEFAULT_ENDPOINT,
    ROLES,
    BudgetConfig,
    EstimateConfig,
    ReplyTokens,
    RolesConfig,
)
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
from pipeline.core.recipe.roles import (
    EndpointUse,
    all_endpoints,
    endpoint_key,
    panel_uses,
    pool_endpoint,
    pool_uses,
    role_endpoint,
    role_uses,
    unpriced_pool_members,
)
from pipeline.core.recipe.series import SeriesConfig
from pipeline.core.recipe.teacher import TeacherConfig
from pipeline.core.recipe.training import DPOStageConfig, LoraConfig, SFTStageConfig, TinyStudentConfig

__all__ = [
    "BUILTIN_STUDENT", "BUILTIN_TEACHER", "BudgetConfig", "ComputeConfig", "DEFAULT_ENDPOINT", "DPOStageConfig",
    "DecontamConfig", "EndpointUse", "EstimateConfig", "EvaluateConfig", "ExhaustionConfig", "FeedbackConfig", "FilterConfig",
    "GenerateConfig", "InstructionFilterConfig", "LoraConfig", "PairsConfig", "PoolModel", "PromptSource", "ROLES",
    "Recipe", "RecipeError", "ReplyTokens", "ReviewConfig", "RolesConfig", "SFTStageConfig", "SampleConfig",
    "Section", "SelfInstructConfig", "SelfPromptingConfig", "SeriesConfig", "StorageConfig", "TASK_PROMPTS",
    "TeacherConfig", "TinyStudentConfig", "all_endpoints", "apply_overrides", "endpoint_key", "load_recipe",
    "load_recipe_text", "panel_uses", "parse_override", "pool_endpoint", "pool_uses", "recipe_from_dict",
    "role_endpoint", "role_uses", "unpriced_pool_members",
]
