"""What the toy teacher answers for each role it detects in a chat request (rater, judges, user, ...)."""

from __future__ import annotations

import json
import random
import re
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, model_validator

from pipeline.tasks.toy.judge_flaws import biased_ratings, own_answers
from pipeline.tasks.toy.task import (
    DISCLAIMER,
    GENERIC_REPLY,
    extract_answer,
    follow_up,
    format_answer,
    is_correct,
    parse_problem,
    prompt_pool,
    teacher_answer,
)

TRAIN_PROMPTS = prompt_pool("train")  # generated questions come from train only: no heldout leak
FAULTS = ("fault_429", "fault_500", "fault_hang", "fault_bad_json")
ASPECT_TYPES = {"truthfulness": ("None", "1"), "helpfulness": ("1, 2, 3", "1")}  # (correct, wrong)


class ToyTeacherOptions(BaseModel):
    """How the toy teacher behaves: its systematic error rate, noise and injected faults (`teacher.builtin`)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    error_rate: float = Field(0.3, ge=0, le=1)
    seed: int = 0
    latency_ms: float = Field(0.0, ge=0)
    disclaimer_rate: float = Field(0.0, ge=0, le=1)
    drift_rate: float = Field(0.0, ge=0, le=1)
    empty_rate: float = Field(0.0, ge=0, le=1)
    rater_noise: float = Field(0.0, ge=0, le=1)  # share of ratings replaced by a uniform draw on the scale
    messy_rater: bool = False
    # a judge's flaws (judge_flaws.py): the first text shown gains position_bias, a text gains length_bias per
    # word beyond the mean of those shown with it, the teacher's own answers gain self_preference
    position_bias: float = 0.0
    length_bias: float = 0.0
    self_preference: float = 0.0
    fault_429: float = Field(0.0, ge=0, le=1)
    fault_500: float = Field(0.0, ge=0, le=1)
    fault_hang: float = Field(0.0, ge=0, le=1)
    fault_bad_json: float = Field(0.0, ge=0, le=1)
    fault_seed: int = 0
    retry_after_s: float = Field(1.0, ge=0)
    # a provider's concurrency limit, hidden from the client: a request that finds this many in flight is
    # answered 429 at once (no Retry-After), as `max_concurrency: auto` must discover
    max_concurrent: int | None = Field(None, ge=1)
    hang_s: float = Field(600.0, ge=0)
    # answer a request holding a system turn with HTTP 400, as a server whose model's chat template refuses
    # one does (vLLM serving Mistral-Instruct or Gemma 2)
    refuse_system: bool = False
    # answer a request carrying a response_format with HTTP 400, as a server without structured output does
    structured_unsupported: bool = False
    # the Batch API (/v1/files, /v1/batches): served or not, a share of lines failing, how long a batch stays
    # in_progress, a share of lines left undone (the batch then ends `expired`)
    batch_api: bool = True
    batch_fail_rate: float = Field(0.0, ge=0, le=1)
    batch_in_progress_s: float = Field(0.0, ge=0)
    batch_expired_share: float = Field(0.0, ge=0, le=1)

    @model_validator(mode="after")
    def _rates_add_up(self) -> ToyTeacherOptions:
        if sum(getattr(self, name) for name in FAULTS) > 1:
            raise ValueError("the fault rates add up to more than 1")
        if self.empty_rate + self.drift_rate > 1:
            raise ValueError("empty_rate + drift_rate add up to more than 1")
        return self


class ToyTeacherConfig(ToyTeacherOptions):
    """The options plus the API key the server demands (tests of key handling); the key never enters a recipe."""

    api_key: str | None = Field(None, repr=False, exclude=True)


def count_tokens(text: str) -> int:
    """The toy teacher's tokens: whitespace-separated words (what its `usage` reports)."""
    return len(text.split())


def message_text(content: Any) -> str:
    """The text of a message content (a string or a list of content parts)."""
    if isinstance(content, list):  # content parts
        return "".join(p.get("text", "") for p in content if isinstance(p, dict))
    return content if isinstance(content, str) else ""


def _section(text: str, title: str) -> str:
    match = re.search(rf"##\s*{title}\s*\n(.*?)(?=\n\s*##|<text 1>|<answer|<draft>|\Z)", text, re.I | re.S)
    return match.group(1).strip() if match else ""


def _tagged(text: str, tag: str) -> str | None:
    # The last block: prompt instructions may name the tags themselves ("quoted between <answer> and </answer>").
    found = re.findall(rf"<{tag}>\s*(.*?)\s*</{tag}>", text, re.I | re.S)
    return found[-1] if found else None


def _verdict(question: str, answer: str) -> bool | None:
    """True/False if the answer is right/wrong, None if the question is not a toy problem."""
    return is_correct(question, answer) if parse_problem(question) else None


SCHEMA_ROLES = {"ratings": "rater", "single_grade": "single_judge", "pairwise_verdict": "pairwise_judge"}


def detect_role(messages: list[dict[str, Any]], response_format: dict[str, Any] | None = None) -> str:
    """Which job a request asks for: from its JSON schema's name, else the marker strings in its messages."""
    schema_name = ((response_format or {}).get("json_schema") or {}).get("name")
    if schema_name in SCHEMA_ROLES:
        return SCHEMA_ROLES[schema_name]
    text = "\n".join(message_text(m.get("content")) for m in messages).lower()
    system = "\n".join(message_text(m.get("content")) for m in messages if m.get("role") == "system").lower()
    if "<text 1>" in text:
        return "rater"
    if "[[a]]" in text and "[[b]]" in text:
        return "pairwise_judge"
    if "[[rating]]" in text:
        return "single_judge"
    if "new tasks" in text:
        return "self_instruct"
    if "follow-on instruction" in text:
        return "follow_on"
    if "corrected answer" in text:
        return "correction"
    if "role-playing the user" in system:
        return "user_simulator"
    return "assistant"


class ToyRoles:
    """The teacher's answer for each role; pure functions of the messages and a seeded RNG."""

    def __init__(self, config: ToyTeacherConfig) -> None:
        self.config = config

    def answer(self, role: str, messages: list[dict[str, Any]], rng: random.Random, varied: bool) -> str:
        return getattr(self, role)(messages, rng, varied)

    def assistant(self, messages: list[dict[str, Any]], rng: random.Random, varied: bool) -> str:
        users = [message_text(m.get("content")) for m in messages if m.get("role") == "user"]
        problem = parse_problem(users[-1]) if users else None
        if problem is None:
            return GENERIC_REPLY
        value = teacher_answer(problem, self.config.error_rate, self.config.seed)
        reply = format_answer(problem, value, style=rng.randrange(3) if varied else 0)
        if rng.random() < self.config.disclaimer_rate:
            reply = DISCLAIMER + reply[0].lower() + reply[1:]
        return reply

    def user_simulator(self, messages: list[dict[str, Any]], rng: random.Random, varied: bool) -> str:
        turns = [message_text(m.get("content")) for m in messages if m.get("role") != "system"]
        draw = rng.random()
        if draw < self.config.empty_rate:
            return ""
        if draw < self.config.empty_rate + self.config.drift_rate:
            problems = [p for p in map(parse_problem, turns) if p]
            value = teacher_answer(problems[-1], self.config.error_rate, self.config.seed) if problems else 11
            return f"The answer is {value}."
        return follow_up(rng.choice(TRAIN_PROMPTS), first=not turns)

    def rater(self, messages: list[dict[str, Any]], rng: random.Random, varied: bool) -> str:
        blocks = []
        for number, kind, rating, rationale in self._ratings(messages, rng):
            lines = [f"Type: {kind}"] if kind else []
            lines += [f"Rating: {rating}", f"Rationale: {rationale}"]
            blocks.append((f"#### Output for Text {number}", lines))
        if not self.config.messy_rater:
            return "\n\n".join(head + "\n" + "\n".join(lines) for head, lines in blocks)
        rng.shuffle(blocks)
        bold = [head + "\n\n" + "\n\n".join(re.sub(r"^(\w+):", r"**\1:**", ln) for ln in lines)
                for head, lines in blocks]
        return "Here is my evaluation of each text.\n\n" + "\n\n\n".join(bold)

    def _ratings(self, messages: list[dict[str, Any]], rng: random.Random) -> list[tuple[str, str, int, str]]:
        """(text number, type, rating, rationale) for every text shown to the rater."""
        texts = [message_text(m.get("content")) for m in messages]
        body = next(t for t in reversed(texts) if "<text 1>" in t.lower())
        aspect_match = re.search(r"^\s*aspect\s*:\s*\**\s*([a-z_ -]+)", "\n".join(texts), re.I | re.M)
        aspect = aspect_match.group(1).strip().lower().replace(" ", "_").replace("-", "_") if aspect_match else ""
        instruction = _section(body, "instruction") or body[: body.lower().index("<text 1>")]
        responses = re.findall(r"<text (\d+)>\s*(.*?)\s*</text \1>", body, re.I | re.S)
        fair = [self._rate(aspect, instruction, response) for _, response in responses]
        ratings = self._flawed([r for r, _, _ in fair], instruction, [t for _, t in responses], aspect)
        out = []
        for (number, _), rating, (_, rationale, kind) in zip(responses, ratings, fair, strict=True):
            if rng.random() < self.config.rater_noise:
                rating = rng.randint(1, 5)
            out.append((number, kind, rating, rationale))
        return out

    def structured(self, role: str, messages: list[dict[str, Any]], rng: random.Random, varied: bool,
                   schema: dict[str, Any]) -> str:
        """The JSON reply a json_schema response_format asks for (the rater's, or a judge's)."""
        if role == "rater":
            typed = "type" in schema["properties"]["ratings"]["items"]["properties"]
            entries = [{"text": int(number), **({"type": kind or "None"} if typed else {}), "rating": rating,
                        "rationale": rationale} for number, kind, rating, rationale in self._ratings(messages, rng)]
            if self.config.messy_rater:
                rng.shuffle(entries)
            return json.dumps({"ratings": entries})
        text = self.answer(role, messages, rng, varied)  # the judges' text verdicts, recast as JSON
        explanation = text.splitlines()[0]
        if role == "single_judge":
            return json.dumps({"explanation": explanation, "rating": int(re.findall(r"\[\[(\d+)\]\]", text)[-1])})
        return json.dumps({"explanation": explanation, "verdict": re.findall(r"\[\[([ABC])\]\]", text)[-1]})

    def _flawed(self, ratings: list[int], instruction: str, texts: list[str], aspect: str) -> list[int]:
        cfg = self.config
        if not (cfg.position_bias or cfg.length_bias or cfg.self_preference):
            return ratings
        problem = parse_problem(instruction)
        mine = own_answers(problem, cfg.error_rate, cfg.seed) if problem else set()
        return biased_ratings(ratings, texts, [t.strip() in mine for t in texts], cfg.position_bias,
                              cfg.length_bias, cfg.self_preference, (1, 10) if aspect == "overall" else (1, 5))

    def _rate(self, aspect: str, instruction: str, response: str) -> tuple[int, str, str]:
        types = ASPECT_TYPES.get(aspect)
        verdict = _verdict(instruction, response)
        if verdict is None:
            return 3, "The instruction is not a question I can check.", types[1] if types else ""
        if not re.search(r"\d", response):
            return 1, "The text does not give a result.", types[1] if types else ""
        if not verdict:
            rating = 2 if aspect == "instruction_following" else 1
            return rating, "The text answers the question but its result is wrong.", types[1] if types else ""
        rating = 4 if aspect == "helpfulness" and ("=" not in response or DISCLAIMER[:10] in response) else 5
        return rating, "The text gives the correct result.", types[0] if types else ""

    def single_judge(self, messages: list[dict[str, Any]], rng: random.Random, varied: bool) -> str:
        text = "\n".join(message_text(m.get("content")) for m in messages)
        verdict = _verdict(_section(text, "question"), _tagged(text, "answer") or "")
        if verdict is None:
            return "I cannot verify this answer.\nRating: [[5]]"
        if verdict:
            return f"The answer is correct and clearly stated.\nRating: [[{rng.randint(8, 10)}]]"
        return f"The answer is incorrect.\nRating: [[{rng.randint(1, 3)}]]"

    def pairwise_judge(self, messages: list[dict[str, Any]], rng: random.Random, varied: bool) -> str:
        text = "\n".join(message_text(m.get("content")) for m in messages)
        question = _section(text, "question")
        a = _verdict(question, _tagged(text, "answer a") or "")
        b = _verdict(question, _tagged(text, "answer b") or "")
        if a == b:
            return "Both assistants are equally good (or equally wrong).\n[[C]]"
        return f"Only assistant {'A' if a else 'B'} gives the correct result.\n[[{'A' if a else 'B'}]]"

    def self_instruct(self, messages: list[dict[str, Any]], rng: random.Random, varied: bool) -> str:
        text = "\n".join(message_text(m.get("content")) for m in messages)
        count_match = re.search(r"count\s*:\s*(\d+)", text, re.I)
        count = min(int(count_match.group(1)) if count_match else 8, 100)
        fresh = [p for p in TRAIN_PROMPTS if p not in text]
        return "\n".join(f"Task: {p}" for p in rng.sample(fresh, min(count, len(fresh))))

    def follow_on(self, messages: list[dict[str, Any]], rng: random.Random, varied: bool) -> str:
        """Self-prompting: a next toy question built on the answer (its result becomes the first number)."""
        text = "\n".join(message_text(m.get("content")) for m in messages)
        asked = parse_problem(_section(text, "instruction"))
        value = extract_answer(_section(text, "answer"))
        if value is not None and 0 <= value <= 9:
            pool = [p for p in TRAIN_PROMPTS if (q := parse_problem(p)) and q.a == value]
        elif value is not None:
            pool = [p for p in TRAIN_PROMPTS if (q := parse_problem(p)) and q.a == abs(value) % 10]
        else:
            pool = []
        pool = [p for p in pool if parse_problem(p) != asked] or TRAIN_PROMPTS
        return f"Instruction: {rng.choice(pool)}"

    def correction(self, messages: list[dict[str, Any]], rng: random.Random, varied: bool) -> str:
        text = "\n".join(message_text(m.get("content")) for m in messages)
        problem = parse_problem(_section(text, "question"))
        return format_answer(problem, problem.answer) if problem else GENERIC_REPLY
