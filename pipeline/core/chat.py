"""Chat turns across model families: where a chat template puts a system turn, and folding one into the first
user turn for templates that refuse it (Mistral-Instruct, Gemma 2) or servers that answer it with HTTP 400."""

from __future__ import annotations

from collections.abc import Callable

SYSTEM, USER, NONE = "system", "user", "none"  # where a system prompt ended up: its own turn, the user turn, nowhere
REJECTED = "rejected"  # a template that raises on a system turn

_SYSTEM_PROBE, _USER_PROBE = "SYSTEM-PROBE-7f3a", "USER-PROBE-7f3a"


def fold_system(messages: list[dict[str, str]]) -> list[dict[str, str]]:
    """The conversation without a leading system turn: its text opens the first user turn, a blank line between
    (Gemma 3's and Mistral v0.3's own templates do the same); unchanged when there is no system turn."""
    if not messages or messages[0].get("role") != "system":
        return messages
    system, rest = messages[0], list(messages[1:])
    for i, message in enumerate(rest):
        if message.get("role") == "user":
            rest[i] = {**message, "content": f"{system['content']}\n\n{message['content']}"}
            return rest
    return [{"role": "user", "content": system["content"]}, *rest]


def has_system(messages: list[dict[str, str]]) -> bool:
    return bool(messages) and messages[0].get("role") == "system"


def system_support(render: Callable[[list[dict[str, str]]], str]) -> str:
    """How a template (given as a render function) takes a system turn: SYSTEM (a turn of its own), USER (the
    template folds it into the user turn itself) or REJECTED (it raises)."""
    user = {"role": "user", "content": _USER_PROBE}
    try:
        with_system = render([{"role": "system", "content": _SYSTEM_PROBE}, user])
    except Exception:  # noqa: BLE001 - jinja raise_exception, TemplateError, ValueError: all mean "refused"
        return REJECTED
    alone = render([user])
    at = with_system.find(_SYSTEM_PROBE)
    user_at = with_system.find(_USER_PROBE)
    if at < 0:
        return REJECTED  # silently dropped: as good as refused, so fold it where the model will see it
    between = with_system[at + len(_SYSTEM_PROBE):user_at]
    folded = 0 <= at < user_at and not between.strip() and \
        with_system[:at] + with_system[user_at:] == alone
    return USER if folded else SYSTEM
