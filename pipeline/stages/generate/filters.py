"""Dialogue filters for dSFT data: disclaimers, degenerate turns, role drift (see role_drift.py)."""

from __future__ import annotations

import re

from pipeline.core.recipe import FilterConfig
from pipeline.stages.generate.role_drift import role_drift


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
    def role_drift(user_turn: str) -> str | None:
        """Why a simulated user turn reads as the assistant's (answers, speaks as the assistant, ...), if it does."""
        return role_drift(user_turn)
