"""Chat formats for SFT: the student keeps its own chat template; it trains with a variant that renders every
conversation identically and marks each answer and its end-of-turn token with {% generation %} for the loss, or,
where no variant renders like it, with a loss mask derived by rendering its own template (pipeline.train.masks)."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipeline.core.chat import SYSTEM, fold_system, system_support
from pipeline.train.errors import TrainingError

log = logging.getLogger("pipeline.train")

TEMPLATE_DIR = Path(__file__).with_name("chat_templates")
DEFAULT_FAMILY = "zephyr"  # a base model without a chat template trains (and is saved) in Zephyr's format
# The families whose training variant ships in chat_templates/<family>_training.jinja, and where the family's
# own template text comes from: TRL's package data, or chat_templates/<family>.jinja written from the model card.
FAMILIES: dict[str, str] = {
    "llama3": "trl", "llama3_1": "trl", "llama3_2": "trl", "qwen2": "ours", "qwen2_5": "trl", "qwen3": "trl",
    "mistral": "ours", "mistral_v3": "ours", "gemma": "trl", "gemma3": "trl", "phi3": "trl", "phi3_5": "trl", "phi4": "ours",
    "zephyr": "ours", "chatml": "ours",
}
OWN_MARKERS, TRL_VARIANT, RENDERED = "own-markers", "trl", "rendered"


class ChatTemplateError(TrainingError):
    """A chat template that cannot be trained on as it renders; the message names the model and the options."""


@dataclass(frozen=True)
class ChatFormat:
    """How a student is trained and saved: `native` is what it keeps, `training` renders like it, with markers."""

    native: Any  # the template the saved model carries (a string, or the tokenizer's dict of named variants)
    training: str
    variant: str  # the family whose training variant matched, OWN_MARKERS, TRL_VARIANT, or RENDERED (no markers)
    origin: str  # model | sft.chat_template | default (the model had none) | replaced (sft.replace_template)
    system: str  # pipeline.core.chat: system | user (the template moves it) | rejected; folded unless `system`

    @property
    def native_text(self) -> str:
        return _default_text(self.native)

    @property
    def rendered(self) -> bool:
        """The mask comes from rendering prefixes of each conversation, not from {% generation %} markers."""
        return self.variant == RENDERED


def family_template(family: str, training: bool = False) -> str:
    """A family's own template text (`training=False`) or the training variant this package ships for it."""
    if family not in FAMILIES:
        raise ChatTemplateError(f"unknown chat format '{family}'; the known ones are {', '.join(FAMILIES)}")
    if training:
        return (TEMPLATE_DIR / f"{family}_training.jinja").read_text(encoding="utf-8")
    if FAMILIES[family] == "trl":
        import trl

        return (Path(trl.__file__).parent / "chat_templates" / f"{family}.jinja").read_text(encoding="utf-8")
    return (TEMPLATE_DIR / f"{family}.jinja").read_text(encoding="utf-8")


def template_text(value: str, key: str = "sft.chat_template") -> str:
    """A recipe's chat template (`key`): a family name, template text, or a file (the loader reads files)."""
    if value in FAMILIES:
        return family_template(value)
    if "{{" in value or "{%" in value:
        return value
    path = Path(value).expanduser()
    if path.is_file():
        return path.read_text(encoding="utf-8")
    raise ChatTemplateError(f"{key}: '{value}' is not a chat format name ({', '.join(FAMILIES)}), "
                            "a Jinja template or an existing file")


def resolve_chat_format(tokenizer: Any, model: str, override: str | None = None,
                        replace: bool = False) -> ChatFormat:
    """The format the student trains in: its own template (or `override`), with a training variant that
    renders identically; an unmarkable template is an error unless `replace` accepts the default instead."""
    if override:
        native, origin = template_text(override), "sft.chat_template"
    elif tokenizer.chat_template:
        native, origin = tokenizer.chat_template, "model"
    else:
        native, origin = family_template(DEFAULT_FAMILY), "default"
    if tokenizer.eos_token is None:
        raise ChatTemplateError(f"{model}: the tokenizer has no eos token; a chat template needs one to end turns")
    training, variant = training_variant(tokenizer, _default_text(native))
    why = "" if training else unmaskable_reason(tokenizer, _default_text(native))
    if training is None and not why:
        training, variant = _default_text(native), RENDERED
    if training is None:
        if not replace:
            raise ChatTemplateError(
                f"{model}: its chat template ({origin}) cannot be trained on as it renders: no training variant "
                f"renders it identically, and a loss mask cannot be derived by rendering it: {why}. Give one with "
                "{% generation %} markers as sft.chat_template (a chat format name, a Jinja file or the template "
                f"text), or set sft.replace_template: true to train and save the model in {DEFAULT_FAMILY}'s "
                "format instead")
        log.warning("%s: replacing its chat template with %s's format (sft.replace_template: true); the saved "
                    "model answers in that format", model, DEFAULT_FAMILY)
        native, origin = family_template(DEFAULT_FAMILY), "replaced"
        training, variant = training_variant(tokenizer, native)
    if variant != RENDERED:
        check_stop_token_trained(tokenizer, training, model)
    system = system_support(lambda m: render(tokenizer, _default_text(native), m, generation_prompt=True))
    return ChatFormat(native, training, variant, origin, system)


def unmaskable_reason(tokenizer: Any, native: str) -> str:
    """Why the loss mask of `native` cannot be derived by rendering the probe conversations ("" if it can)."""
    from pipeline.train import masks

    fold = system_support(lambda m: render(tokenizer, native, m, generation_prompt=True)) != SYSTEM
    for messages in probe_conversations():
        try:
            masks.tokenize_conversation(tokenizer, renderer(tokenizer, native),
                                        fold_system(messages) if fold else messages)
        except masks.UnmaskableError as exc:
            return str(exc)
    return ""


def renderer(tokenizer: Any, template: str) -> Any:
    """`template` as a function of (messages, add_generation_prompt), for pipeline.train.masks."""
    return lambda messages, generation_prompt: render(tokenizer, template, messages, generation_prompt)


def saved_template(tokenizer: Any, model: str, override: str | None = None, replace: bool = False) -> str | None:
    """The chat template the sft stage saves this student with; None where sft would refuse to train it."""
    try:
        return resolve_chat_format(tokenizer, model, override, replace).native_text
    except ChatTemplateError:
        return None


def training_variant(tokenizer: Any, native: str) -> tuple[str | None, str]:
    """(a marked template that renders like `native` on every probe conversation, where it came from)."""
    from trl.chat_template_utils import get_training_chat_template, has_generation_markers

    if has_generation_markers(native):
        return native, OWN_MARKERS
    for family in FAMILIES:
        candidate = family_template(family, training=True)
        if renders_like(tokenizer, native, candidate):
            return candidate, family
    original = tokenizer.chat_template
    try:
        tokenizer.chat_template = native
        candidate = get_training_chat_template(tokenizer)
    except Exception:  # noqa: BLE001 - TRL probes the template with tool calls: any failure means no variant
        candidate = None
    finally:
        tokenizer.chat_template = original
    if candidate and renders_like(tokenizer, native, candidate):
        return candidate, TRL_VARIANT
    return None, ""


def render(tokenizer: Any, template: str, messages: list[dict[str, str]], generation_prompt: bool = False) -> str:
    return tokenizer.apply_chat_template(messages, chat_template=template, tokenize=False,
                                         add_generation_prompt=generation_prompt)


def _outcome(tokenizer: Any, template: str, messages: list[dict[str, str]], generation_prompt: bool) -> str:
    try:
        return render(tokenizer, template, messages, generation_prompt)
    except Exception as exc:  # noqa: BLE001 - a template refusing a conversation is an outcome to compare
        return f"<refused: {type(exc).__name__}>"


def renders_like(tokenizer: Any, native: str, candidate: str) -> bool:
    """Both templates render (or both refuse) every probe conversation, with and without a generation prompt."""
    for messages in probe_conversations():
        for generation_prompt in (False, True):
            shown = messages[:-1] if generation_prompt else messages  # a prompt ends with the user's turn
            if _outcome(tokenizer, native, shown, generation_prompt) != \
                    _outcome(tokenizer, candidate, shown, generation_prompt):
                return False
    return True


def probe_conversations() -> list[list[dict[str, str]]]:
    """Conversations that tell templates apart: a system turn (empty too) or none, several turns, text with
    spaces to trim around it, and an answer holding a thinking block."""
    first = [{"role": "user", "content": "  What is 2 + 3?\n"}, {"role": "assistant", "content": " It is 5. "}]
    more = [{"role": "user", "content": "And 4 + 4?"}, {"role": "assistant", "content": "8"}]
    system = [{"role": "system", "content": " Answer briefly. "}]
    thought = [{"role": "user", "content": "Why?"},
               {"role": "assistant", "content": "<think>\nadd them\n</think>\n\nBecause 4 + 4 = 8."}]
    empty_system = [{"role": "system", "content": ""}]
    return [first, first + more, system + first + more, first + more + thought, system + first, empty_system + first]


def check_stop_token_trained(tokenizer: Any, training: str, model: str) -> None:
    from trl.chat_template_utils import is_chat_template_stop_token_trained

    if not is_chat_template_stop_token_trained(tokenizer, chat_template=training):
        raise ChatTemplateError(f"{model}: the training chat template leaves the end-of-turn token of an answer "
                                "outside its {% generation %} markers, or that token is not a special token of this "
                                "tokenizer (a format from another family needs its tokens), so the model would never "
                                "learn to stop; fix sft.chat_template")


def check_dialogues(tokenizer: Any, fmt: ChatFormat, dialogues: dict[str, list[dict[str, str]]],
                    limit: int = 256) -> int:
    """The training text of (up to `limit`) dialogues equals the model's own rendering; returns how many. (A
    rendered format trains on the model's own rendering itself: its dialogues are checked as they are masked.)"""
    if fmt.rendered:
        return len(dialogues)
    for checked, (item_id, messages) in enumerate(dialogues.items()):
        if checked >= limit:
            return checked
        if render(tokenizer, fmt.training, messages) != render(tokenizer, fmt.native_text, messages):
            raise ChatTemplateError(f"sft: dialogue {item_id} renders differently in the training template "
                                    f"({fmt.variant}) than in the model's own; report this with the dialogue")
    return len(dialogues)


def masked_examples(tokenizer: Any, fmt: ChatFormat,
                    dialogues: dict[str, list[dict[str, str]]]) -> list[dict[str, list[int]]]:
    """Pre-tokenized TRL examples (`input_ids`, `assistant_masks`) of a rendered format's dialogues, in order."""
    from pipeline.train import masks

    render_native = renderer(tokenizer, fmt.native_text)
    examples = []
    for item_id, messages in dialogues.items():
        try:
            examples.append(masks.tokenize_conversation(tokenizer, render_native, messages))
        except masks.UnmaskableError as exc:
            raise ChatTemplateError(f"sft: dialogue {item_id}: the loss mask cannot be derived by rendering the "
                                    f"model's chat template: {exc}") from None
    return examples


def needs_folding(fmt: ChatFormat) -> bool:
    """Fold a system turn into the first user turn before training unless the template gives it a turn of its
    own: where it refuses one, and where it moves one itself (Mistral v0.3 drops it unless the last message is
    the user's, so training would lose what inference shows)."""
    return fmt.system != SYSTEM


def _default_text(template: Any) -> str:
    return template["default"] if isinstance(template, dict) else template
