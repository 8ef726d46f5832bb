"""The role-drift filter judges a simulated user turn by its structure, across domains, on a labelled set."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest

from pipeline.stages.generate.role_drift import role_drift
from pipeline.tasks.toy.task import follow_up, prompt_pool

DATA = Path(__file__).parent / "data"


def _load(name: str) -> list[dict]:
    return [json.loads(line) for line in (DATA / name).read_text().splitlines() if line.strip()]


def test_role_drift_on_labelled_turns_across_domains_keeps_false_positives_low_and_recall_high():
    # the rules were tuned on role_drift_turns.jsonl; role_drift_heldout.jsonl (10 other domains) checks that
    # they carry over to topics they were not tuned on
    rows = _load("role_drift_turns.jsonl") + _load("role_drift_heldout.jsonl")
    assert len(rows) >= 150 and len({r["domain"] for r in rows}) >= 10
    flagged = [(r, role_drift(r["text"])) for r in rows]
    users = [r for r, kind in flagged if not r["drift"]]
    drifts = [r for r, kind in flagged if r["drift"]]
    false_pos = [(r["text"], kind) for r, kind in flagged if not r["drift"] and kind]
    missed = [r["text"] for r, kind in flagged if r["drift"] and not kind]
    fp_rate, recall = len(false_pos) / len(users), 1 - len(missed) / len(drifts)
    print(f"\nrole drift on {len(rows)} turns in {len({r['domain'] for r in rows})} domains: "
          f"false positives {len(false_pos)}/{len(users)} ({fp_rate:.1%}), recall {recall:.1%} "
          f"({len(drifts) - len(missed)}/{len(drifts)}); kinds {dict(Counter(k for _, k in flagged if k))}")
    for name in ("role_drift_turns.jsonl", "role_drift_heldout.jsonl"):
        part = _load(name)
        fp = sum(bool(role_drift(r["text"])) for r in part if not r["drift"])
        hit = sum(bool(role_drift(r["text"])) for r in part if r["drift"])
        print(f"  {name}: false positives {fp}/{sum(not r['drift'] for r in part)}, "
              f"recall {hit}/{sum(r['drift'] for r in part)}")
    assert fp_rate <= 0.02, false_pos
    assert recall >= 0.90, missed


@pytest.mark.parametrize("turn", [
    "Got it. Next, spell out the number 84.", "Thanks, that makes sense.", "Okay.", "Why?",
    "Now do the same in French.", "My code still doesn't work.", "Hmm, that's not what I asked for.",
])
def test_ordinary_user_turns_outside_arithmetic_are_not_drift(turn):
    assert role_drift(turn) is None


@pytest.mark.parametrize(("turn", "kind"), [
    ("Assistant: Paris is the capital of France.", "role_label"),
    ("As an AI language model, I cannot browse the internet.", "speaks_as_ai"),
    ("I hope this helps! Let me know if you have other questions.", "assistant_formula"),
    ("In my previous answer I used the wrong formula.", "refers_to_own_answer"),
    ("Why is ice slippery? Because a thin layer of water forms on its surface.", "answers_own_question"),
    ("The answer is 7.", "answers_instead_of_asking"),
    ("Sure! Here's a short poem about autumn leaves falling in the park at dusk.", "delivers_answer"),
])
def test_drift_is_named_by_its_structure(turn, kind):
    assert role_drift(turn) == kind


def test_the_toy_simulators_follow_up_questions_are_user_turns():
    assert not [p for p in prompt_pool("train") if role_drift(follow_up(p))]
