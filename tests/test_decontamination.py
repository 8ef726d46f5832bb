"""Decontamination against real benchmark formats: every prompt that reaches training (generate's seeds and
simulated user turns, sample's prompts and so feedback's pairs) is checked; the ledgers name file, item, n-gram."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from pipeline.core.decontam import Decontaminator, ngram_words
from pipeline.core.recipe import RecipeError, load_recipe
from pipeline.core.sources import prompt_id
from pipeline.run.runner import open_run, run_stage
from pipeline.tasks.toy.task import make_prompts
from pipeline.tasks.toy.teacher_server import ToyTeacher, ToyTeacherConfig

TEACHER = {"model": "toy-teacher", "api_key_env": None, "timeout_s": 5.0, "max_retries": 3, "backoff_base_s": 0.05,
           "backoff_max_s": 0.2, "max_concurrency": 16}
POOL = [{"name": "teacher-a", "backend": "openai", "model": "toy-teacher", "temperature": 0.0, "max_tokens": 64},
        {"name": "teacher-b", "backend": "openai", "model": "toy-teacher", "temperature": 1.0, "max_tokens": 64}]


def _mt_bench(path: Path, prompts: list[str]) -> Path:
    """MT-Bench question.jsonl: two turns per question; training prompts hidden in first and second turns."""
    rows = [{"question_id": 81, "category": "writing", "turns": [prompts[0], "Now rewrite it as a limerick."]},
            {"question_id": 82, "category": "math", "turns": ["Explain what a prime number is.", prompts[1]],
             "reference": ["A number with exactly two divisors.", "-"]},
            {"question_id": 83, "category": "reasoning", "turns": [f"Think carefully. {prompts[2]} Explain."]},
            {"question_id": 84, "category": "roleplay", "turns": ["Pretend you are a pirate and greet me."]}]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _alpaca_eval(path: Path, prompts: list[str]) -> Path:
    """AlpacaEval: a JSON array of {instruction, output, generator, dataset}."""
    rows = [{"instruction": p, "output": "An answer.", "generator": "gpt4_1106_preview", "dataset": "helpful_base"}
            for p in prompts] + [{"instruction": "Name three rivers in Africa.", "output": "Nile, Congo, Niger.",
                                  "generator": "gpt4_1106_preview", "dataset": "koala"}]
    path.write_text(json.dumps(rows, indent=1))
    return path


def test_mt_bench_and_alpaca_eval_prompts_never_reach_generate_sample_or_feedback(write_recipe, tmp_path):
    prompts = make_prompts(40, seed=0)
    mt = _mt_bench(tmp_path / "question.jsonl", prompts[:3])
    alpaca = _alpaca_eval(tmp_path / "alpaca_eval.json", prompts[3:6])
    leaked = {prompt_id(p): p for p in prompts[:6]}
    with ToyTeacher(ToyTeacherConfig()) as toy:
        rec = load_recipe(write_recipe({
            "name": "decon", "teacher": {"base_url": toy.base_url, **TEACHER}, "task": "toy",
            "prompts": {"source": "task", "count": 40},
            # toy prompts are four or five words: shorter than the default min_words of 5
            "decontamination": {"eval_files": [str(mt), str(alpaca)], "min_words": 4},
            "generate": {"min_rounds": 2, "max_rounds": 3}, "sample": {"k": 2, "pool": POOL},
            "feedback": {"aspects": ["helpfulness"]}}))
        assert rec.decontamination.ngram == 13  # the default, as in lm-evaluation-harness
        store = open_run(rec, "decon")
        for stage in ("generate", "sample", "feedback"):
            assert run_stage(stage, rec, store).status == "completed"

    generated = list(store.read_records("generate"))
    assert generated and not {r["prompt_id"] for r in generated} & set(leaked)
    user_turns = [m["content"] for r in generated for m in r["messages"] if m["role"] == "user"]
    assert not any(p in turn for p in leaked.values() for turn in user_turns)  # simulated turns are checked too
    answers = list(store.read_records("sample", "completions"))
    assert answers and not {r["prompt_id"] for r in answers} & set(leaked)
    pairs = list(store.read_records("feedback", "pairs"))
    assert pairs and not {r["prompt_id"] for r in pairs} & set(leaked)

    for stage in ("generate", "sample"):
        entries = {e.item_id: e for e in store.ledger(stage, "dropped").latest().values()}
        assert set(leaked) <= set(entries), stage
        for pid, text in leaked.items():
            entry = entries[pid]
            source = mt if pid in {prompt_id(p) for p in prompts[:3]} else alpaca
            assert entry.detail["eval_file"] == str(source) and source.name in entry.reason
            assert entry.detail["ngram"] in " ".join(ngram_words(text))
            assert entry.detail["eval_item"] and entry.detail["where"].startswith(str(source))
        mt_entry = entries[prompt_id(prompts[1])]  # a second turn of an MT-Bench question counts
        assert mt_entry.detail["eval_item"] == "82" and "line 2" in mt_entry.detail["where"]
        stats = json.loads(Path(store.join(stage, "stats.json")).read_text())
        assert stats["decontamination"]["prompts_by_file"] == {str(mt): 3, str(alpaca): 3}, stage

    feedback_dropped = store.ledger("feedback", "dropped").latest()
    assert {feedback_dropped[f"pool:{pid}"].reason for pid in leaked} == {"prompt_dropped_by_sample"}
    stats = json.loads(Path(store.join("feedback", "stats.json")).read_text())
    assert stats["counts"]["pending"] == 0 and stats["dropped_by_reason"]["prompt_dropped_by_sample"] == 6


def test_an_evaluation_file_of_unknown_shape_is_refused_naming_file_line_and_shapes(tmp_path):
    bad = tmp_path / "evals.jsonl"
    bad.write_text(json.dumps({"turns": ["What is 2 + 2?"]}) + "\n" + json.dumps({"question": "Hi?"}) + "\n")
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"task: toy\nteacher:\n  base_url: http://127.0.0.1:9/v1\ndecontamination:\n"
                      f"  eval_files: [{bad.name}]\n")
    res = subprocess.run([sys.executable, "-m", "pipeline.cli", "run", str(recipe), "--stages", "generate"],
                         cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert res.returncode == 2
    assert f"{bad} line 2" in res.stderr and "'turns' (MT-Bench question.jsonl)" in res.stderr, res.stderr
    assert "'instruction' (AlpacaEval)" in res.stderr and "found keys ['question']" in res.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["evals.jsonl", "r.yaml"]  # nothing written


def test_old_generate_decontamination_key_points_to_the_new_section(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text("generate:\n  decontamination:\n    eval_files: []\n")
    with pytest.raises(RecipeError, match="generate.decontamination moved to the top-level `decontamination`"):
        load_recipe(path)


def test_every_turn_is_indexed_and_short_texts_match_where_they_appear_whole(tmp_path):
    evals = tmp_path / "q.jsonl"
    long_turn = ("Write a persuasive essay about why every city should plant more trees along its busiest "
                 "streets and parks")
    evals.write_text(json.dumps({"question_id": 7, "turns": ["Hi there", long_turn, "What is 3 + 4?"]}) + "\n")
    decon = Decontaminator([str(evals)], n=13, min_words=3)
    copied = decon.match("Please write a persuasive essay about why every city should plant more trees along "
                         "its busiest streets, thanks")
    assert copied is not None and copied.eval_item == "7" and len(copied.ngram.split()) == 13
    assert decon.match("Thanks! Now, what is 3 + 4?").ngram == "what is 3 + 4"  # shorter than n: whole
    assert decon.match("What is 3 + 5?") is None
    assert decon.match("Hi there, how are you?") is None  # two words: too short to mean anything
    whole = decon.match("Hi there")  # ... unless it is the whole evaluation turn
    assert whole is not None and (whole.eval_item, whole.ngram) == ("7", "hi there")
    excerpt = decon.match("Why every city should plant more trees?")  # a short prompt inside a long turn
    assert excerpt is not None and excerpt.ngram == "why every city should plant more trees"
    assert decon.match("Tell me why every city should plant more trees along its quiet roads and rivers") is None
