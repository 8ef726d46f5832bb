"""The assistant-loss mask of a chat template without `{% generation %}` markers, derived by rendering.

For each answer (messages[i], role assistant) the model's own template renders the prompt inference shows it
(messages[:i] with the generation prompt) and the conversation up to that answer (messages[:i+1]). What the
model has to write is the text after the prompt, up to and including the first special token after the
answer's text: its end-of-turn token. The rule for the loss: a token is trained when one of its characters lies
in that span; the end-of-turn token is always trained (the model learns to stop); what the template writes after
it (a newline before the next turn, a final eos of the whole conversation) is not. The training text is the
template's rendering of the whole conversation, so it equals what inference shows; a template whose earlier
answers render differently once a later turn follows, or whose turns do not end in a special token, cannot be
masked this way and is refused with the reason.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

Render = Callable[[list[dict[str, str]], bool], str]  # (messages, add_generation_prompt) -> text
RULE = ("each answer from the end of its inference prompt through its end-of-turn special token; a token is "
        "trained when one of its characters lies in that span; text after the end-of-turn token is not trained")


class UnmaskableError(ValueError):
    """A conversation (or template) whose answers cannot be located by rendering; the message says why."""


def special_tokens(tokenizer: Any) -> list[str]:
    """The tokenizer's special tokens (named ones and added ones marked special), longest first."""
    found = set(tokenizer.all_special_tokens)
    found |= {t.content for t in tokenizer.added_tokens_decoder.values() if getattr(t, "special", False)}
    return sorted((t for t in found if t), key=len, reverse=True)


def answer_spans(render: Render, messages: list[dict[str, str]],
                 specials: list[str]) -> tuple[str, list[tuple[int, int]]]:
    """(the rendering of the whole conversation, the character span the loss covers for each answer)."""
    full = _render(render, messages, False, "the conversation")
    spans = []
    for n, i in enumerate((i for i, m in enumerate(messages) if m["role"] == "assistant"), start=1):
        prompt = _render(render, messages[:i], True, f"the prompt before answer {n}")
        upto = _render(render, messages[:i + 1], False, f"the conversation up to answer {n}")
        if not full.startswith(prompt):
            raise UnmaskableError(f"the prompt inference shows before answer {n} is not how the whole conversation "
                                  f"starts: the template renders earlier turns differently once a later turn follows "
                                  f"(prompt ends {prompt[-40:]!r})")
        if not upto.startswith(prompt):
            raise UnmaskableError(f"answer {n} rendered after its prompt changes the prompt: the generation prompt "
                                  f"({prompt[-40:]!r}) is not how the template starts the answer's turn")
        after, end = turn_end(upto, len(prompt), messages[i]["content"], specials, n)
        if full[:end] != upto[:end]:
            raise UnmaskableError(f"answer {n} renders differently once a later turn follows: as the last turn it "
                                  f"ends {upto[after:end]!r}, followed by another turn {full[after:end]!r}")
        spans.append((len(prompt), end))
    return full, spans


def turn_end(upto: str, start: int, content: str, specials: list[str], n: int) -> tuple[int, int]:
    """(where answer n's text ends, where its end-of-turn special token ends) in `upto`."""
    answer = content.strip()
    at = upto.find(answer, start) if answer else start
    if at < 0:
        raise UnmaskableError(f"answer {n}'s text does not appear in its rendering: the template changes it, so "
                              "the loss cannot be placed on what the model writes")
    after = at + len(answer)
    ends = [(pos, token) for token in specials if (pos := upto.find(token, after)) >= 0]
    if not ends:
        raise UnmaskableError(f"nothing after answer {n} is a special token of this tokenizer (the template ends "
                              f"the turn with {upto[after:][:40]!r}), so the model would never learn to stop")
    pos, token = min(ends, key=lambda e: (e[0], -len(e[1])))
    return after, pos + len(token)


def token_mask(tokenizer: Any, text: str, spans: list[tuple[int, int]]) -> tuple[list[int], list[int]]:
    """(input ids of `text` as TRL tokenizes a rendering, 1 on each token with a character inside a span)."""
    try:
        encoded = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    except NotImplementedError:
        raise UnmaskableError("deriving the loss mask needs a fast tokenizer (character offsets); this one is "
                              f"{type(tokenizer).__name__}") from None
    ids, offsets = list(encoded["input_ids"]), encoded["offset_mapping"]
    mask = [int(any(s < stop and e > begin for begin, stop in spans)) for s, e in offsets]
    ends = {e for _, e in offsets}
    for n, (_, stop) in enumerate(spans, start=1):
        if stop not in ends:
            raise UnmaskableError(f"answer {n}'s end-of-turn token is not a token of its own in the tokenized text "
                                  f"(it merges with {text[stop:stop + 10]!r})")
    return ids, mask


def tokenize_conversation(tokenizer: Any, render: Render, messages: list[dict[str, str]]) -> dict[str, list[int]]:
    """A TRL pre-tokenized example: `input_ids` and `assistant_masks` (1 on the trained tokens)."""
    text, spans = answer_spans(render, messages, special_tokens(tokenizer))
    ids, mask = token_mask(tokenizer, text, spans)
    return {"input_ids": ids, "assistant_masks": mask}


def _render(render: Render, messages: list[dict[str, str]], generation_prompt: bool, what: str) -> str:
    try:
        return render(messages, generation_prompt)
    except Exception as exc:  # noqa: BLE001 - jinja raise_exception, TemplateError, TypeError: all a refusal
        raise UnmaskableError(f"the template refuses to render {what} ({type(exc).__name__}: {exc})") from None
