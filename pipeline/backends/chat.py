"""What the local backends (transformers, vLLM) share: rendering prompts with the model's own chat template (a
system turn the template refuses goes into the first user turn) and the tokens generation stops on."""

from __future__ import annotations

from typing import Any

from pipeline.core.chat import NONE, REJECTED, USER, fold_system, has_system, system_support


class PromptRenderer:
    """Renders a conversation as the model's prompt and says where its system prompt ended up."""

    def __init__(self, tokenizer: Any, chat_template: str | None = None):
        self.tokenizer = tokenizer
        if chat_template is not None:  # e.g. `base` in a pool answers in the format `sft` trains it in
            tokenizer.chat_template = chat_template
        self.system = system_support(self._render)

    def _render(self, messages: list[dict[str, str]]) -> str:
        return self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)

    def render(self, messages: list[dict[str, str]]) -> tuple[str, str]:
        """(prompt text, where the system prompt is: `system`, `user` or `none`)."""
        if not has_system(messages):
            return self._render(messages), NONE
        if self.system == REJECTED:
            return self._render(fold_system(messages)), USER
        return self._render(messages), self.system


def stop_token_ids(tokenizer: Any, generation_eos: int | list[int] | None) -> list[int]:
    """The tokenizer's eos and every eos id of the model's generation config (Gemma ends a turn with
    <end_of_turn>, Llama 3 with <|eot_id|>, Phi-3 with <|end|>, none of which is the tokenizer's eos)."""
    ids = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    extra = generation_eos if isinstance(generation_eos, list) else [generation_eos]
    return list(dict.fromkeys(ids + [int(i) for i in extra if i is not None]))


def generation_eos(path: str) -> int | list[int] | None:
    """`eos_token_id` of the generation config saved with a model (None when it has none)."""
    from transformers import GenerationConfig

    try:
        return GenerationConfig.from_pretrained(path).eos_token_id
    except (OSError, ValueError):
        return None
