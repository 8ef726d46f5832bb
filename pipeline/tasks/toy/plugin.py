"""The arithmetic toy world as a task plugin: prompts, a held-out set, a checker, a built-in teacher, a corpus."""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from typing import Any

from pipeline.core.task import Task
from pipeline.tasks.toy.task import corpus, is_correct, make_prompts, prompt_pool
from pipeline.tasks.toy.teacher_roles import ToyTeacherConfig, ToyTeacherOptions, count_tokens


class ArithmeticTask(Task):
    """Addition and subtraction of small numbers, phrased many ways; held-out prompts are unseen phrasings."""

    name = "toy"
    teacher_options = ToyTeacherOptions

    def prompts(self, count: int, seed: int) -> list[str]:
        return make_prompts(count, seed=seed, split="train")

    def heldout(self, count: int, seed: int) -> list[dict[str, Any]]:
        count = min(count, len(prompt_pool("heldout")))  # the task has only so many
        return [{"category": "arithmetic", "turns": [p]} for p in make_prompts(count, seed=seed, split="heldout")]

    def check(self, item: Mapping[str, Any], answer: str) -> bool:
        return is_correct(item["turns"][-1], answer)

    def corpus(self, size: int, seed: int) -> list[str]:
        return corpus(size, seed)

    def count_teacher_tokens(self, text: str) -> int:
        return count_tokens(text)

    @contextmanager
    def serve_teacher(self, options: ToyTeacherOptions) -> Iterator[str]:
        from pipeline.tasks.toy.teacher_server import ToyTeacher

        with ToyTeacher(ToyTeacherConfig(**options.model_dump())) as server:
            yield server.base_url
