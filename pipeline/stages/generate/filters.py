"""Dialogue filters for dSFT data: disclaimers, role drift, degenerate turns, truecasing."""

from __future__ import annotations

import re

from pipeline.core.recipe import FilterConfig

# A simulated user that starts like this has slipped into the assistant's role.
_ASSISTANT_OPENERS = re.compile(
    r"^\s*(sure|certainly|of course|absolutely|great question|here(?: is|'s| are)|the answer is|"
    r"as an ai|i'd be (?:happy|glad)|i would be (?:happy|glad)|happy to help|yes, |no, )", re.IGNORECASE)
_REQUEST_CUES = re.compile(
    r"\?|\b(please|can you|could you|would you|tell me|explain|write|give|show|list|describe|compute|"
    r"calculate|add|subtract|what|how|why|which|who|where|when|help|suggest|compare|summari[sz]e|now)\b",
    re.IGNORECASE)
_SENTENCE_START = re.compile(r"(^|[.!?]\s+)([a-z])")


class DialogueFilters:
    """The configured filters, compiled once."""

    def __init__(self, cfg: FilterConfig):
        self.cfg = cfg
        self._disclaimers = [re.compile(p, re.IGNORECASE) for p in cfg.disclaimer_patterns]

    def disclaimer(self, text: str) -> str | None:
        """The pattern an assistant turn matched ("as an AI", "I don't have personal ..."), if any."""
        for pat in self._disclaimers:
            if pat.search(text):
                return pat.pattern
        return None

    @staticmethod
    def degenerate(text: str) -> bool:
        """Empty, or one token repeated: nothing a model should learn from."""
        toks = text.split()
        return not toks or (len(toks) >= 8 and len(set(toks)) <= 2)

    @staticmethod
    def role_drift(user_turn: str) -> bool:
        """A simulated user turn that answers instead of asking or asking for something."""
        return bool(_ASSISTANT_OPENERS.match(user_turn)) or not _REQUEST_CUES.search(user_turn)


def truecase(text: str) -> str:
    """Repair shouting and all-lowercase text (UltraChat truecased its data): sentence case."""
    letters = [c for c in text if c.isalpha()]
    if not letters:
        return text
    if all(c.isupper() for c in letters) and len(letters) > 3:
        text = text.lower()
    elif not any(c.isupper() for c in letters):
        pass
    else:
        return text
    text = _SENTENCE_START.sub(lambda m: m.group(1) + m.group(2).upper(), text)
    return re.sub(r"\bi\b", "I", text)
