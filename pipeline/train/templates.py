"""Chat templates for training: the assistant turns and their end-of-turn token must be markable for the loss."""

from __future__ import annotations

import logging
from typing import Any

from pipeline.train.models import TrainingError

log = logging.getLogger("pipeline.train")

# Zephyr-style fallback for students whose template has no {% generation %} markers: the assistant's
# content and its end-of-turn (eos) token are inside the markers, so every turn learns to stop.
GENERIC_TRAINING_TEMPLATE = (
    "{%- for message in messages -%}"
    "<|{{ message['role'] }}|>{{ '\\n' }}"
    "{%- if message['role'] == 'assistant' -%}"
    "{% generation %}{{ message['content'] }}{{ eos_token }}{% endgeneration %}"
    "{%- else -%}{{ message['content'] }}{{ eos_token }}{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}<|assistant|>{{ '\\n' }}{%- endif -%}"
)


def ensure_training_template(tokenizer: Any) -> str:
    """Give the tokenizer a chat template with {% generation %} markers; returns where it came from."""
    from trl.chat_template_utils import get_training_chat_template, has_generation_markers

    template = tokenizer.chat_template
    if template and has_generation_markers(template):
        return "student"
    if template:
        try:
            patched = get_training_chat_template(tokenizer)
        except (ValueError, NotImplementedError):
            patched = None
        if patched:
            tokenizer.chat_template = patched
            return "trl-training"
        log.warning("the student's chat template has no {%% generation %%} markers and TRL has no training "
                    "version of it; training (and saving) with a generic Zephyr-style template instead")
    if tokenizer.eos_token is None:
        raise TrainingError("the student's tokenizer has no eos token to end assistant turns with")
    tokenizer.chat_template = GENERIC_TRAINING_TEMPLATE
    return "generic"
