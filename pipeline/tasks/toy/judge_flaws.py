"""A real judge's flaws for the toy rater, all off by default: position bias, length bias and self-preference.

The rater shows every answer of a prompt in one request (`<text 1>` … `<text n>`, UltraFeedback), so
"position" is the place an answer is shown in that request: the first shown gains `position_bias`. An answer
gains `length_bias` per word it has beyond the mean of the answers shown with it, and an answer the teacher
itself would write gains `self_preference`. The flaws are pure functions of the request, so the same recipe and
seed give the same ratings; rating noise (`rater_noise`) is drawn from the request's own seeded RNG.
"""

from __future__ import annotations

import math

from pipeline.tasks.toy.task import DISCLAIMER, Problem, format_answer, teacher_answer

STYLES = 3  # format_answer's phrasings


def words(text: str) -> int:
    return len(text.split())


def own_answers(problem: Problem, error_rate: float, seed: int) -> set[str]:
    """Every text the toy teacher writes for this problem: its answers (any style, with or without the
    disclaimer) and its corrections."""
    texts = set()
    for value in {teacher_answer(problem, error_rate, seed), problem.answer}:
        for style in range(STYLES):
            reply = format_answer(problem, value, style)
            texts |= {reply, DISCLAIMER + reply[0].lower() + reply[1:]}
    return texts


def biased_ratings(ratings: list[int], texts: list[str], own: list[bool], position_bias: float,
                   length_bias: float, self_preference: float, scale: tuple[int, int] = (1, 5)) -> list[int]:
    """The fair ratings of texts shown in this order, shifted by the judge's biases, rounded and kept on the scale."""
    if not texts:
        return ratings
    lengths = [words(t) for t in texts]
    mean_length = sum(lengths) / len(lengths)
    out = []
    for place, (rating, length, mine) in enumerate(zip(ratings, lengths, own, strict=True)):
        shifted = rating + (position_bias if place == 0 else 0.0) + length_bias * (length - mean_length) \
            + (self_preference if mine else 0.0)
        out.append(min(scale[1], max(scale[0], math.floor(shifted + 0.5))))
    return out
