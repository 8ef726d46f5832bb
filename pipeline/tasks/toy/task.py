"""Toy task: addition and subtraction of small numbers, phrased many ways, with a ground-truth checker."""

from __future__ import annotations

import hashlib
import random
import re
from dataclasses import dataclass
from typing import Literal

Op = Literal["+", "-"]
MAX_OPERAND = 9
HELDOUT_SHARE = 0.2

# Each template is (format string, op); parsing uses PATTERNS below, so every phrasing must match one.
TEMPLATES: tuple[tuple[str, Op], ...] = (
    ("What is {a} + {b}?", "+"),
    ("Compute {a} plus {b}.", "+"),
    ("If I have {a} apples and get {b} more, how many do I have?", "+"),
    ("Add {a} and {b}.", "+"),
    ("What is the sum of {a} and {b}?", "+"),
    ("Calculate {a} + {b}, please.", "+"),
    ("What is {a} - {b}?", "-"),
    ("Compute {a} minus {b}.", "-"),
    ("If I have {a} apples and give away {b}, how many are left?", "-"),
    ("Subtract {b} from {a}.", "-"),
    ("What is the difference between {a} and {b}?", "-"),
    ("Calculate {a} - {b}, please.", "-"),
)

# (regex, op, swapped): swapped means the first number is b ("subtract b from a").
PATTERNS: tuple[tuple[re.Pattern[str], Op, bool], ...] = tuple(
    (re.compile(rx, re.IGNORECASE), op, swapped)
    for rx, op, swapped in (
        (r"(\d+)\s*\+\s*(\d+)", "+", False),
        (r"(\d+)\s*-\s*(\d+)", "-", False),
        (r"(\d+)\s+plus\s+(\d+)", "+", False),
        (r"(\d+)\s+minus\s+(\d+)", "-", False),
        (r"have\s+(\d+)\s+apples\s+and\s+get\s+(\d+)\s+more", "+", False),
        (r"have\s+(\d+)\s+apples\s+and\s+give\s+away\s+(\d+)", "-", False),
        (r"\badd\s+(\d+)\s+and\s+(\d+)", "+", False),
        (r"sum\s+of\s+(\d+)\s+and\s+(\d+)", "+", False),
        (r"subtract\s+(\d+)\s+from\s+(\d+)", "-", True),
        (r"difference\s+between\s+(\d+)\s+and\s+(\d+)", "-", False),
    )
)

_INT = re.compile(r"(?:^|(?<=[\s=(:]))-\d+|\d+")
_ANSWER_IS = re.compile(r"answer\s+is\s*:?\s*\**\s*(-?\d+)", re.IGNORECASE)
_EQUALS = re.compile(r"=\s*(-?\d+)")


@dataclass(frozen=True)
class Problem:
    """One arithmetic fact: `a op b`."""

    a: int
    op: Op
    b: int

    @property
    def answer(self) -> int:
        return self.a + self.b if self.op == "+" else self.a - self.b

    @property
    def canonical(self) -> str:
        """The fact independent of phrasing, e.g. `3+5`."""
        return f"{self.a}{self.op}{self.b}"


def all_facts() -> list[Problem]:
    """Every fact of the task: a + b and a - b (a >= b) with operands in 0..MAX_OPERAND."""
    rng = range(MAX_OPERAND + 1)
    plus = [Problem(a, "+", b) for a in rng for b in rng]
    minus = [Problem(a, "-", b) for a in rng for b in rng if a >= b]
    return plus + minus


def render(problem: Problem, template: str) -> str:
    """Phrase a problem with one template."""
    return template.format(a=problem.a, b=problem.b)


def _unit(*parts: object) -> float:
    """A deterministic number in [0, 1) from the parts (stable across processes, unlike hash())."""
    digest = hashlib.sha256(":".join(map(str, parts)).encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


def split_of(problem: Problem, template: str) -> str:
    """`heldout` for a fixed ~20% of (fact, template) pairs, else `train`.

    Every fact and every template appears in train; heldout pairs are new combinations of them.
    """
    return "heldout" if _unit("split", problem.canonical, template) < HELDOUT_SHARE else "train"


def prompt_pool(split: str = "train") -> list[str]:
    """All prompts of one split, in a fixed order."""
    if split not in ("train", "heldout"):
        raise ValueError(f"split must be 'train' or 'heldout', got {split!r}")
    return [
        render(p, t)
        for p in all_facts()
        for t, op in TEMPLATES
        if op == p.op and split_of(p, t) == split
    ]


def make_prompts(n: int, seed: int = 0, split: str = "train") -> list[str]:
    """`n` distinct prompts of a split, drawn with `seed`.

    The split is by (fact, phrasing) pair, independent of seed: a heldout prompt never equals a train one.
    """
    pool = prompt_pool(split)
    if n > len(pool):
        raise ValueError(f"asked for {n} {split} prompts but the toy task has only {len(pool)}")
    return random.Random(f"{split}:{seed}").sample(pool, n)


def parse_problem(text: str) -> Problem | None:
    """The first problem stated in `text` (any phrasing, also inside a longer message), or None."""
    best: tuple[int, Problem] | None = None
    for pattern, op, swapped in PATTERNS:
        match = pattern.search(text)
        if match and (best is None or match.start() < best[0]):
            x, y = int(match.group(1)), int(match.group(2))
            best = (match.start(), Problem(y, op, x) if swapped else Problem(x, op, y))
    return best[1] if best else None


def extract_answer(text: str) -> int | None:
    """The number an answer commits to: the last `answer is N`, else the last `= N`, else the last integer."""
    for pattern in (_ANSWER_IS, _EQUALS):
        found = pattern.findall(text)
        if found:
            return int(found[-1])
    numbers = _INT.findall(text)
    return int(numbers[-1]) if numbers else None


def is_correct(prompt: str, answer_text: str) -> bool:
    """Whether `answer_text` commits to the right result for the problem in `prompt`."""
    problem = parse_problem(prompt)
    if problem is None:
        raise ValueError(f"no toy problem found in prompt {prompt[:80]!r}")
    return extract_answer(answer_text) == problem.answer


def teacher_answer(problem: Problem, error_rate: float, seed: int) -> int:
    """The toy teacher's answer: wrong on a fixed set of facts (share `error_rate`), the same way every time."""
    if _unit("error", seed, problem.canonical) >= error_rate:
        return problem.answer
    offset = (1, 2, -1, -2)[int(_unit("offset", seed, problem.canonical) * 4)]
    # Keep wrong answers non-negative so they look plausible; the offset stays nonzero.
    return problem.answer + (abs(offset) if problem.answer + offset < 0 else offset)


def format_answer(problem: Problem, value: int, style: int = 0) -> str:
    """Phrase an answer committing to `value`; `style` picks one of a few short phrasings."""
    word = "plus" if problem.op == "+" else "minus"
    styles = (
        f"{problem.a} {problem.op} {problem.b} = {value}. The answer is {value}.",
        f"The answer is {value}.",
        f"{problem.a} {word} {problem.b} equals {value}. The answer is {value}.",
    )
    return styles[style % len(styles)]


def follow_up(prompt: str, first: bool = False) -> str:
    """A user's next question built from a toy prompt."""
    if first:
        return prompt
    return f"Thanks! Now, {prompt[0].lower()}{prompt[1:]}"


DISCLAIMER = "As an AI, I don't have personal experiences, but "
GENERIC_REPLY = "I can help with adding and subtracting small numbers. Ask me, for example, what 3 + 4 is."


def corpus(n: int, seed: int) -> list[str]:
    """Texts for training the student's tokenizer: prompts of both splits, answers and follow-ups."""
    rng = random.Random(f"corpus:{seed}")
    prompts = prompt_pool("train") + prompt_pool("heldout")
    texts: list[str] = [GENERIC_REPLY, DISCLAIMER]
    for i in range(n):
        prompt = rng.choice(prompts)
        problem = parse_problem(prompt)
        assert problem is not None  # every template parses (tested)
        texts += [prompt, format_answer(problem, problem.answer, style=i), follow_up(rng.choice(prompts))]
    return texts
