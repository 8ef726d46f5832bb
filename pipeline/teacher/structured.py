"""Structured replies: the OpenAI `response_format` a request carries when its endpoint has `structured` on, the
JSON a reply holds, and the tally of how a role's replies were parsed (the stage reports say which mode each
role used and its parse rates)."""

from __future__ import annotations

import json
import re
from dataclasses import asdict, dataclass
from typing import Any

_FENCE = re.compile(r"^\s*```(?:json)?\s*\n?(.*?)\n?\s*```\s*$", re.S | re.I)


def response_format(name: str, schema: dict[str, Any]) -> dict[str, Any]:
    """OpenAI's strict json_schema response format (what vLLM, llama.cpp and OpenAI itself accept)."""
    return {"type": "json_schema", "json_schema": {"name": name, "strict": True, "schema": schema}}


def json_reply(text: str) -> Any:
    """The JSON value a reply holds (a ```json fence around it is allowed); None when it holds none, so the
    caller falls back to its text parser."""
    body = text.strip()
    fenced = _FENCE.match(body)
    if fenced:
        body = fenced.group(1).strip()
    if not body.startswith(("{", "[")):
        return None
    try:
        return json.loads(body)
    except ValueError:
        return None


@dataclass
class ParseTally:
    """How one role's calls at one endpoint went: the mode asked for and used, replies by how they parsed, calls
    usable at the first attempt and at all."""

    mode: str = "text"  # the endpoint's `structured` setting: off, json_schema or auto
    used: str = "text"  # structured, text, or text after a fallback
    fallback: str = ""  # why auto fell back to text (the server's refusal)
    calls: int = 0
    first_ok: int = 0
    ok: int = 0
    replies: int = 0
    json_ok: int = 0  # replies parsed as JSON
    text_ok: int = 0  # replies read by the text parser (a structured reply that was not JSON included)
    unusable: int = 0
    known_unusable: int = 0  # replies marked unusable before (an earlier run's), skipped without a request

    def reply(self, parsed_as: str | None) -> None:
        """One reply: parsed as `json` or `text`, or None when it was unusable."""
        self.replies += 1
        if parsed_as == "json":
            self.json_ok += 1
        elif parsed_as == "text":
            self.text_ok += 1
        else:
            self.unusable += 1

    def call(self, attempt: int | None) -> None:
        """One call ended: usable at `attempt` (1 = the first ask), or None when it failed."""
        self.calls += 1
        if attempt is not None:
            self.ok += 1
            self.first_ok += attempt == 1

    def as_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["first_attempt_rate"] = round(self.first_ok / self.calls, 4) if self.calls else None
        out["parse_rate"] = round(self.ok / self.calls, 4) if self.calls else None
        out["reply_parse_rate"] = round((self.json_ok + self.text_ok) / self.replies, 4) if self.replies else None
        return out


def merge_tallies(before: dict[str, Any] | None, now: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """This run's tallies added to those an earlier run of the stage recorded (its stats.json), per role."""
    merged = {k: dict(v) for k, v in (before or {}).items()}
    counts = ("calls", "first_ok", "ok", "replies", "json_ok", "text_ok", "unusable", "known_unusable")
    for role, tally in now.items():
        old = merged.get(role)
        row = dict(tally)
        if old and tally["calls"] + tally["replies"] == 0:  # nothing asked this time: the earlier modes stand
            row = old
        elif old:
            row.update({k: int(old.get(k, 0)) + int(tally[k]) for k in counts})
            row["fallback"] = tally["fallback"] or old.get("fallback", "")
        summary = ParseTally(**{k: row[k] for k in ("mode", "used", "fallback", *counts)})
        merged[role] = summary.as_dict()
    return merged


def describe(tally: dict[str, Any]) -> str:
    """`structured (json_schema): 40 calls, 97.5% usable at the first attempt, 100% overall; 39 JSON, 1 text`."""
    used = tally["used"] + (f" (asked: {tally['mode']})" if tally["mode"] not in ("off", tally["used"]) else "")
    if tally.get("fallback"):
        used += f"; fell back to text: {tally['fallback']}"
    if not tally["calls"]:
        return f"{used}: no calls"
    return (f"{used}: {tally['calls']} calls, {_pct(tally['first_attempt_rate'])} usable at the first attempt, "
            f"{_pct(tally['parse_rate'])} overall; replies {tally['replies']}: {tally['json_ok']} parsed as JSON, "
            f"{tally['text_ok']} by the text parser, {tally['unusable']} unusable"
            + (f", {tally['known_unusable']} known unusable from before" if tally.get("known_unusable") else ""))


def _pct(rate: float | None) -> str:
    return "n/a" if rate is None else f"{100 * rate:.1f}%"
