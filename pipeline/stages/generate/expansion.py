"""What self-instruct and self-prompting share: asking the teacher in a fixed order, filtering off the event
loop, and the rule that says when proposing has stopped paying (written to stats.json with the reason)."""

from __future__ import annotations

import asyncio
import hashlib
from collections import Counter
from collections.abc import Sequence
from typing import Any

from pipeline.core.recipe import ExhaustionConfig
from pipeline.stages.generate.instruction_filter import Candidate, InstructionFilter
from pipeline.teacher.client import BudgetExceeded, TeacherError, TeacherFatal
from pipeline.teacher.messages import ChatRequest, ChatResult
from pipeline.teacher.session import RoleClient

TARGET_REACHED = "target_reached"


def request_seed(*parts: object) -> int:
    """A stable 31-bit sampling seed from the parts (the API's `seed`; also a distinct cache key per attempt)."""
    return int.from_bytes(hashlib.sha256(":".join(map(str, parts)).encode()).digest()[:4], "big") >> 1


async def ask_in_order(client: RoleClient, requests: Sequence[ChatRequest],
                       stats: Counter[str]) -> list[ChatResult | None]:
    """The replies in request order (None where a request failed for good); a stop (budget, bad key) is raised.

    Order matters: what is kept is decided in this order, so a resumed run makes the same requests and the
    response cache answers them."""
    results = await asyncio.gather(*(client.chat(r) for r in requests), return_exceptions=True)
    out: list[ChatResult | None] = []
    for res in results:
        if isinstance(res, (BudgetExceeded, TeacherFatal)):
            raise res
        if isinstance(res, TeacherError):
            stats["request_failed"] += 1
            out.append(None)
        elif isinstance(res, BaseException):
            raise res
        else:
            out.append(res)
    return out


async def offer_all(filt: InstructionFilter, cands: list[Candidate | None], room: int | None) -> list[bool]:
    """Offer candidates in order until `room` are kept; the ROUGE-L index runs in a worker thread so requests
    in flight keep going."""
    def work() -> list[bool]:
        kept, flags = 0, []
        for cand in cands:
            ok = cand is not None and (room is None or kept < room) and filt.offer(cand)
            kept += ok
            flags.append(ok)
        return flags
    return await asyncio.to_thread(work)


class Exhaustion:
    """Stops proposing when `patience` rounds in a row keep fewer than `min_acceptance_rate` of their
    proposals, or after `max_rounds`; the target reached ends it too. `reason` says which."""

    def __init__(self, cfg: ExhaustionConfig, target: int | None):
        self.cfg, self.target = cfg, target
        self.rounds, self._low = 0, 0
        self.acceptance: list[float] = []
        self.reason = ""

    def after_round(self, proposed: int, accepted: int, total: int) -> bool:
        """Record a round; True when proposing should stop (`reason` then says why)."""
        self.rounds += 1
        rate = accepted / proposed if proposed else 0.0
        self.acceptance.append(round(rate, 4))
        self._low = self._low + 1 if rate < self.cfg.min_acceptance_rate else 0
        if self.target is not None and total >= self.target:
            self.reason = TARGET_REACHED
        elif self._low >= self.cfg.patience:
            self.reason = (f"exhausted: {self._low} rounds in a row kept under {self.cfg.min_acceptance_rate:.1%} "
                           f"of their proposals (last round {accepted} of {proposed})")
        elif self.cfg.max_rounds is not None and self.rounds >= self.cfg.max_rounds:
            self.reason = f"max_rounds: stopped after {self.rounds} rounds (exhaustion.max_rounds)"
        return bool(self.reason)

    def summary(self, total: int) -> dict[str, Any]:
        reached = self.target is None or total >= self.target
        reason = self.reason or (TARGET_REACHED if reached else "")
        return {"target": self.target, "total": total, "reached": reached, "stop_reason": reason,
                "rounds": self.rounds, "acceptance_by_round": self.acceptance}
