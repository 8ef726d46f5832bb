"""Evaluation sets in the field's formats (MT-Bench question.jsonl, AlpacaEval), per-category scores, the
length-controlled win rate and the judge's own biases, with the toy judge over real HTTP and real tiny models."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pytest
from test_evaluate import ScriptedJudge, build_students, live, read, toy_run

from pipeline.run.runner import run_stage
from pipeline.stages.evaluate import records
from pipeline.stages.evaluate import stage as evaluate
from pipeline.stages.evaluate.judge import win_rate
from pipeline.stages.evaluate.stats import judge_bias, length_controlled
from pipeline.tasks.toy.teacher_server import ToyTeacher, ToyTeacherConfig

CATEGORIES = ("math", "reasoning", "coding", "writing")


@pytest.fixture(scope="module")
def students(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    return build_students(tmp_path_factory.mktemp("models"))

PHRASES = ("What is {a} + {b}?", "Calculate {a} + {b}, please.", "Add {a} and {b}.", "What is the sum of {a} and {b}?",
           "Compute {a} plus {b}.", "If I have {a} apples and get {b} more, how many do I have?")


def _sum_for(total: int, k: int) -> str:
    """`a + b` with single-digit operands adding up to `total`, phrased differently for different k."""
    a = max(total - 9, min(9, total - k % 3), 0)
    return f"{a} + {total - a}"


def _near(value: int) -> int:
    """Another result written with as many digits."""
    return value - 1 if len(str(value - 1)) == len(str(value)) and value > 0 else value + 1


def mt_bench_file(path: Path, right: int, wrong: int) -> Path:
    """8 MT-Bench rows (question_id, category, two turns, a reference per turn for math/reasoning/coding):
    every math turn's result is `right`, every writing turn's `wrong`, the others mix them."""
    rows = []
    for i in range(8):
        category = CATEGORIES[i // 2]
        results = {"math": (right, right), "writing": (wrong, wrong)}.get(category, (right, wrong))
        turns = [f"What is {_sum_for(results[0], i)}?", f"Now, what is {_sum_for(results[1], i + 1)}?"]
        row: dict[str, Any] = {"question_id": 81 + i, "category": category, "turns": turns}
        if category != "writing":
            row["reference"] = [f"The answer is {r}." for r in results]
        rows.append(row)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def alpaca_eval_file(path: Path, right: int, n: int = 12) -> Path:
    """AlpacaEval's JSON array (instruction, output, generator, dataset): the reference outputs are right and
    short on half the items, wrong and long-winded on the other half."""
    rows = []
    for i in range(n):
        truth = right if i % 2 == 0 else _near(right)  # the model that always says `right` is wrong on odd items
        a, b = (int(x) for x in _sum_for(truth, i // 4).split(" + "))
        question = PHRASES[(i // 2) % len(PHRASES)].format(a=a, b=b)
        output = (f"The answer is {truth}." if i % 3 else
                  f"Let me work through this carefully, step by step, before I commit. The answer is {truth + 2}.")
        rows.append({"instruction": question, "output": output, "generator": "gpt4_turbo",
                     "dataset": ("helpful_base", "koala")[i % 2]})
    path.write_text(json.dumps(rows, indent=1))
    return path


def _report(store: Any) -> tuple[dict[str, Any], str]:
    saved = json.loads(Path(store.join("evaluate", "report.json")).read_text())
    return saved, Path(store.join("evaluate", "report.md")).read_text()


def test_an_mt_bench_file_gets_per_category_scores_lc_win_rate_and_judge_bias(tmp_path: Path, students) -> None:
    path = mt_bench_file(tmp_path / "question.jsonl", students["best"], students["worse"])
    recipe, store = toy_run(tmp_path, students, models=["sft", "dpo"], prompts=str(path))
    with ToyTeacher(ToyTeacherConfig()) as toy:
        result = run_stage("evaluate", live(recipe, toy.base_url), store)
    assert result.status == "completed", result.message
    saved, md = _report(store)
    ev = saved["evaluation"]
    assert ev["items"] == 8 and ev["turns"] == 16 and set(ev["categories"]) == set(CATEGORIES)
    assert {it.item_id for it in records.parse_items(str(path))} == {str(81 + i) for i in range(8)}

    # two items of two turns each per category: four gradings per model; dpo always says `best`, sft `worse`
    cats = ev["categories"]
    for cat in CATEGORIES:
        assert cats[cat]["items"] == 2 and all(cats[cat]["models"][m]["judge"]["n"] == 4 for m in ("sft", "dpo"))
    assert cats["math"]["models"]["dpo"]["judge"]["mean"] >= 8 >= 3 >= cats["math"]["models"]["sft"]["judge"]["mean"]
    assert cats["writing"]["models"]["sft"]["judge"]["mean"] >= 8 >= 3 >= cats["writing"]["models"]["dpo"]["judge"]["mean"]
    assert cats["math"]["models"]["dpo"]["win_rate"]["mean"] == 1.0 and cats["writing"]["models"]["dpo"]["win_rate"]["mean"] == 0.0
    assert ev["models"]["dpo"]["judge"]["by_turn"].keys() == {"1", "2"}  # the second turn is graded too

    vs = ev["models"]["dpo"]["vs_baseline"]
    lc = vs["length_controlled"]
    assert lc["n"] == vs["n"] == 8
    if len(str(students["best"])) == len(str(students["worse"])):  # equal lengths: nothing to control for
        assert lc["win_rate"] == pytest.approx(vs["win_rate"]) and lc["stderr"] == pytest.approx(vs["stderr"])
    bias = ev["judge_bias"]
    assert bias["pairs"] == 8 and bias["flip_share"] == 0.0 and bias["first_shown_win_share"] == 0.5
    assert "### Per category" in md and "| math | 2 |" in md and "length-controlled" in md
    assert "flip when the order of the answers is swapped" in md
    assert Path(store.join("evaluate", "categories.png")).read_bytes().startswith(b"\x89PNG")


def test_the_judge_sees_each_turns_reference_only_for_reference_categories(tmp_path: Path, students) -> None:
    path = tmp_path / "question.jsonl"
    rows = [{"question_id": 1, "category": "math", "turns": ["Solve 2x = 14.", "And 3x = 9?"],
             "reference": ["x = 7", "x = 3"]},
            {"question_id": 2, "category": "writing", "turns": ["Write a haiku.", "Shorter."],
             "reference": ["old pond", "pond"]}]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    recipe, store = toy_run(tmp_path, students, teacher={"base_url": "http://unused", "model": "judge"},
                            models=["dpo"], prompts=str(path))
    with ScriptedJudge() as judge:
        result = evaluate.run(live(recipe, judge.base_url), store)
    assert result.status == "completed", result.message
    single = [t for t in judge.requests if "[[rating]]" in t]
    graded = {t.split("## Question", 1)[1].split("<answer>", 1)[0].strip(): t for t in single}
    assert "(Reference answer, for the judge only: x = 7)" in graded["Solve 2x = 14.\n\n(Reference answer, for the "
                                                                   "judge only: x = 7)"]
    turn_two = [t for q, t in graded.items() if q.startswith("And 3x = 9?")]
    assert turn_two and all("Reference answer, for the judge only: x = 3" in t for t in turn_two)
    assert all("## Conversation so far" in t and "User: Solve 2x = 14." in t for t in turn_two)
    assert all("old pond" not in t and "Reference" not in t.split("## Question", 1)[1]
               for q, t in graded.items() if q.startswith(("Write a haiku", "Shorter")))
    pairwise = [t for t in judge.requests if "[[A]]" in t and "Solve 2x" in t]
    assert pairwise and all("turn 1: x = 7; turn 2: x = 3" in t for t in pairwise)
    saved, _ = _report(store)
    assert saved["evaluation"]["references_hidden"] == 1
    assert any("reference answers the judge did not see" in n for n in saved["notes"])


def test_alpaca_eval_outputs_are_the_baseline_and_length_is_controlled(tmp_path: Path, students) -> None:
    path = alpaca_eval_file(tmp_path / "alpaca_eval.json", students["best"])
    recipe, store = toy_run(tmp_path, students, models=["dpo"], baseline="outputs", prompts=str(path))
    with ToyTeacher(ToyTeacherConfig()) as toy:
        result = run_stage("evaluate", live(recipe, toy.base_url), store)
    assert result.status == "completed", result.message
    saved, md = _report(store)
    ev = saved["evaluation"]
    assert (ev["baseline"], ev["baseline_spec"], ev["outputs_generator"]) == ("outputs", "outputs", "gpt4_turbo")
    assert set(ev["categories"]) == {"helpful_base", "koala"}
    shipped = {r["item_id"]: r for r in read(store, "answers") if r["model"] == "outputs"}
    rows = json.loads(path.read_text())
    assert sorted(r["answers"][0] for r in shipped.values()) == sorted(r["output"] for r in rows)

    # the toy judge prefers the right result; the long reference outputs are the wrong ones
    vs = ev["models"]["dpo"]["vs_baseline"]
    pairs = read(store, "pairwise")
    assert vs["n"] == len(rows) and vs["win_rate"] == pytest.approx(win_rate([p["score"] for p in pairs])[0])
    bias = ev["judge_bias"]
    assert bias["longer_win_share"] == 0.0 and bias["decided_with_length_difference"] > 0
    lc = vs["length_controlled"]
    assert lc["length_coef"] < 0 and lc["win_rate"] != pytest.approx(vs["win_rate"])
    assert 0 < lc["win_rate"] < 1 and lc["stderr"] > 0
    assert "the set's outputs, by gpt4_turbo" in md


def test_outputs_as_baseline_needs_a_set_that_ships_them(tmp_path: Path, students) -> None:
    path = tmp_path / "plain.jsonl"
    path.write_text(json.dumps({"prompt": "What is 2 + 2?"}) + "\n")
    recipe, store = toy_run(tmp_path, students, models=["dpo"], baseline="outputs", prompts=str(path))
    with pytest.raises(records.EvaluateError, match="plain.jsonl has none"):
        evaluate.run(recipe, store)


# -- the statistics on their own -------------------------------------------------------------------
def test_length_controlled_win_rate_equals_the_raw_one_when_lengths_are_equal() -> None:
    scores = [1.0, 0.5, 0.0, 1.0, 1.0, 0.5, 0.0, 1.0, 1.0, 0.5]
    raw, se = win_rate(scores)
    lc = length_controlled(scores, [0.0] * len(scores))
    assert lc["win_rate"] == pytest.approx(raw) and lc["stderr"] == pytest.approx(se) and lc["length_coef"] == 0.0


def test_length_controlled_win_rate_removes_a_win_rate_that_length_explains() -> None:
    # the candidate mostly wins when it is the longer answer (12 of 14), mostly loses when shorter (5 of 6), and
    # is longer more often than not: at equal length the logit is midway, log(12/2) and log(1/5): about 0.52
    diffs = [40.0] * 14 + [-40.0] * 6
    scores = [1.0] * 12 + [0.0] * 2 + [1.0] + [0.0] * 5
    raw, _ = win_rate(scores)
    lc = length_controlled(scores, diffs)
    assert raw == 0.65 and lc["length_coef"] > 0
    assert lc["win_rate"] == pytest.approx(1 / (1 + math.exp(-(math.log(6) + math.log(1 / 5)) / 2)), abs=0.01)
    # length that says nothing about the outcome leaves it where it was
    balanced = length_controlled([1.0, 0.0] * 10 + [1.0] * 4, [10.0, 10.0, -10.0, -10.0] * 6)
    assert balanced["win_rate"] == pytest.approx(14 / 24, abs=0.02)
    assert all(math.isfinite(v) for v in (lc["win_rate"], lc["stderr"], balanced["stderr"]))


def test_judge_bias_counts_flips_first_position_wins_and_longer_answer_wins() -> None:
    def pair(item: str, first: str, second: str, score: float) -> dict[str, Any]:
        return {"item_id": item, "model": "dpo", "baseline": "sft", "verdict_first": first,
                "verdict_second": second, "score": score, "identical": False}

    pairs = [pair("1", "A", "B", 1.0),   # consistent: the candidate wins in both orders
             pair("2", "A", "A", 0.5),   # flips: whichever is shown first wins
             pair("3", "B", "A", 0.0),   # consistent: the baseline wins
             pair("4", "C", "C", 0.5)]   # consistent tie
    lengths = {("1", "dpo"): 30, ("1", "sft"): 10, ("3", "dpo"): 30, ("3", "sft"): 10, ("2", "dpo"): 5,
               ("2", "sft"): 5, ("4", "dpo"): 1, ("4", "sft"): 2}
    bias = judge_bias(pairs, lengths)
    assert (bias["pairs"], bias["flipped"], bias["flip_share"]) == (4, 1, 0.25)
    assert bias["decisive_verdicts"] == 6 and bias["first_shown_win_share"] == pytest.approx(4 / 6)
    assert bias["decided_with_length_difference"] == 2 and bias["longer_win_share"] == 0.5
