"""The toy arithmetic task: splits, parsing, answer extraction and the teacher's systematic errors."""

from __future__ import annotations

import pytest

from pipeline.tasks.toy.task import (
    TEMPLATES,
    all_facts,
    corpus,
    extract_answer,
    format_answer,
    is_correct,
    make_prompts,
    parse_problem,
    prompt_pool,
    render,
    teacher_answer,
)


def test_heldout_prompts_never_equal_train_prompts() -> None:
    train, heldout = prompt_pool("train"), prompt_pool("heldout")
    assert set(train).isdisjoint(heldout)
    for seed in range(5):
        assert set(make_prompts(len(train), seed, "train")).isdisjoint(make_prompts(len(heldout), seed, "heldout"))
    # Every fact and every phrasing still appears in train; heldout only recombines them.
    train_facts = {parse_problem(p) for p in train}
    assert train_facts == set(all_facts())
    train_set = set(train)
    used = {t for t, op in TEMPLATES for p in all_facts() if p.op == op and render(p, t) in train_set}
    assert used == {t for t, _ in TEMPLATES}


def test_make_prompts_is_distinct_seeded_and_bounded() -> None:
    prompts = make_prompts(200, seed=1)
    assert len(set(prompts)) == 200
    assert make_prompts(200, seed=1) == prompts
    assert make_prompts(200, seed=2) != prompts
    with pytest.raises(ValueError, match="only"):
        make_prompts(10_000)
    with pytest.raises(ValueError, match="split"):
        make_prompts(3, split="test")


@pytest.mark.parametrize(("template", "op"), TEMPLATES)
def test_every_phrasing_parses_back_to_its_problem(template: str, op: str) -> None:
    for problem in all_facts():
        if problem.op != op:
            continue
        text = render(problem, template)
        assert parse_problem(text) == problem
        assert parse_problem(f"Hello there.\n{text}\nThanks a lot!") == problem
        assert is_correct(text, format_answer(problem, problem.answer))
        assert not is_correct(text, format_answer(problem, problem.answer + 1))


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("The answer is 8.", 8),
        ("8", 8),
        ("= 8", 8),
        ("3 + 5 = 8. The answer is 8.", 8),
        ("I think 3 + 5 = 9, so the answer is: **8**", 8),
        ("7 - 4 = 3", 3),
        ("It is -2.", -2),
        ("I have no idea.", None),
    ],
)
def test_extract_answer_finds_the_committed_number(text: str, expected: int | None) -> None:
    assert extract_answer(text) == expected


def test_parse_problem_rejects_text_without_a_problem() -> None:
    assert parse_problem("Tell me a story about dragons.") is None
    with pytest.raises(ValueError, match="no toy problem"):
        is_correct("Tell me a story.", "8")


def test_teacher_errors_are_systematic_per_fact() -> None:
    facts = all_facts()
    for problem in facts:
        phrasings = [render(problem, t) for t, op in TEMPLATES if op == problem.op]
        answers = {teacher_answer(parse_problem(p), 0.3, seed=0) for p in phrasings}  # type: ignore[arg-type]
        assert len(answers) == 1
    for rate in (0.1, 0.3, 0.5):
        wrong = [p for p in facts if teacher_answer(p, rate, seed=0) != p.answer]
        assert abs(len(wrong) / len(facts) - rate) < 0.08
        assert all(teacher_answer(p, rate, seed=0) >= 0 for p in wrong)
    assert all(teacher_answer(p, 0.0, seed=0) == p.answer for p in facts)
    assert all(teacher_answer(p, 1.0, seed=0) != p.answer for p in facts)
    # Another seed makes the teacher wrong on other facts.
    wrong_0 = {p for p in facts if teacher_answer(p, 0.3, seed=0) != p.answer}
    wrong_1 = {p for p in facts if teacher_answer(p, 0.3, seed=1) != p.answer}
    assert wrong_0 != wrong_1


def test_corpus_holds_prompts_answers_and_follow_ups() -> None:
    texts = corpus(50, seed=0)
    assert any(t.startswith("Thanks! Now") for t in texts)
    assert any("The answer is" in t for t in texts)
    assert sum(parse_problem(t) is not None for t in texts) >= 100
