"""What can be checked before anything is paid: every check a later stage would make on static input."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from pipeline.core.recipe import Recipe
from pipeline.run.errors import StageFailed
from pipeline.train.configs import check_trl_args
from pipeline.train.models import TrainingError


def check_settings(recipe: Recipe, stages: list[str]) -> None:
    """What can be checked before anything is paid, for the chosen stages only (see before_paying_checks)."""
    for needs, check in before_paying_checks():
        if set(needs) & set(stages):
            check(recipe)


def before_paying_checks() -> list[tuple[tuple[str, ...], Callable[[Recipe], None]]]:
    """Every check a later stage would make on static input, each with the stages that make it: `distill
    validate` runs them all, `distill run` those of the stages it runs, before a request is sent."""
    return [(("sft", "dpo"), check_training_args), (("sft",), check_student_template),
            (("sft", "dpo"), check_accelerate_config), (("sample",), check_pool_templates),
            (("evaluate",), check_evaluate_models), (("evaluate",), check_eval_set)]


def check_training_args(recipe: Recipe) -> None:
    """The TRL arguments of sft and dpo, as TRL would read them."""
    try:
        check_trl_args(recipe)
    except TrainingError as exc:
        raise StageFailed(str(exc)) from None


def check_accelerate_config(recipe: Recipe) -> None:
    """More than one GPU trains through `accelerate launch`: its config file must resolve."""
    if recipe.compute.num_gpus <= 1:
        return
    from pipeline.train.launch import accelerate_config_path

    try:
        accelerate_config_path(recipe.compute)
    except TrainingError as exc:
        raise StageFailed(str(exc)) from None


def local_model_dir(spec: str | None) -> str | None:
    """A model given as a local directory (a run's own `sft`/`base`, a hub id or a GGUF file: None)."""
    if not spec or spec in ("sft", "base", "dpo", "policy", "outputs") or not Path(spec).expanduser().is_dir():
        return None
    return str(Path(spec).expanduser().resolve())


def check_renders(where: str, path: str) -> None:
    """What sample and evaluate need of a local model: a tokenizer whose chat template renders a conversation
    (pipeline.backends.chat renders every prompt with it)."""
    from pipeline.backends.chat import PromptRenderer
    from pipeline.train.models import load_tokenizer

    try:
        PromptRenderer(load_tokenizer(path)).render([{"role": "user", "content": "Hello"}])
    except Exception as exc:  # noqa: BLE001 - the tokenizer's or the template's own error, said with the key
        raise StageFailed(f"{where}: model {path}: its tokenizer or chat template cannot render a conversation "
                          f"({type(exc).__name__}: {exc}); give a model directory with a chat template") from None


def check_pool_templates(recipe: Recipe) -> None:
    for i, member in enumerate(recipe.sample.pool):
        if member.backend in ("transformers", "vllm") and (path := local_model_dir(member.model)):
            check_renders(f"sample.pool[{i}] ({member.name})", path)


def check_evaluate_models(recipe: Recipe) -> None:
    for i, spec in enumerate([*recipe.evaluate.models, recipe.evaluate.baseline]):
        if path := local_model_dir(spec):
            where = f"evaluate.models[{i}]" if i < len(recipe.evaluate.models) else "evaluate.baseline"
            check_renders(where, path)


def check_eval_set(recipe: Recipe) -> None:
    """The evaluation file readable and of a known shape, `evaluate.checker` importable, `outputs` shipped."""
    from pipeline.stages.evaluate.records import check_outputs, load_eval_set

    try:
        check_outputs(recipe.evaluate, load_eval_set(recipe))
    except (ValueError, OSError, ImportError) as exc:
        raise StageFailed(f"evaluate would refuse its inputs: {exc}") from None


def check_student_template(recipe: Recipe) -> None:
    """sft's own refusal of an untrainable chat template, raised before generate pays for dialogues."""
    from pipeline.core.gguf import is_gguf
    from pipeline.train import models, templates

    spec = recipe.sft.model
    if spec == models.BUILTIN_STUDENT or not (is_gguf(spec) or Path(spec).expanduser().is_dir()):
        return
    try:
        base = models.model_path(spec, "sft.model")  # a GGUF student is converted here, once, for sft too
        templates.resolve_chat_format(models.load_tokenizer(base), base, recipe.sft.chat_template,
                                      recipe.sft.replace_template)
    except TrainingError as exc:
        raise StageFailed(f"sft would refuse this student: {exc}") from None
