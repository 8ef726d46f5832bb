"""Mitigations of a biased rater on small hand-made ratings (what each keeps and drops), and the feedback
report recovering an injected position bias from the toy teacher over real HTTP."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest

from pipeline.core.recipe import FeedbackConfig, RecipeError, load_recipe
from pipeline.run.runner import open_run, run_stage
from pipeline.stages.feedback.debias import (
    LENGTH_ONLY,
    ORDER_FLIP,
    PANEL_SPLIT,
    mitigation_effects,
    pair_filter,
    shown_order,
)
from pipeline.stages.feedback.pairs import binarize, correction_pair
from pipeline.stages.feedback.rate import AspectVerdict, JudgeCall, score_answers
from pipeline.stages.feedback.ratings import ParsedRatings, Rating
from pipeline.tasks.toy.teacher_server import ToyTeacher, ToyTeacherConfig

TEACHER = {"model": "toy-teacher", "api_key_env": None, "timeout_s": 5.0, "max_retries": 3, "backoff_base_s": 0.05,
           "backoff_max_s": 0.2, "max_concurrency": 16}
POOL = [{"name": f"teacher-{i}", "backend": "openai", "model": "toy-teacher", "temperature": 1.0, "max_tokens": 64}
        for i in range(4)]


def _call(order: list[int], shown_ratings: list[float]) -> JudgeCall:
    """A judge reply rating the texts shown in `order` (text p + 1 is answer order[p])."""
    parsed = ParsedRatings({p + 1: Rating(p + 1, v) for p, v in enumerate(shown_ratings)})
    return JudgeCall(order, parsed, "", 1)


def test_orders_rotate_so_each_answer_is_shown_first_once_and_averaging_cancels_a_first_position_bonus():
    orders = [shown_order(0, "pool:x", "helpfulness", 1, 4, j, 4) for j in range(4)]
    assert sorted(o[0] for o in orders) == [0, 1, 2, 3]  # every answer first exactly once
    assert all(sorted(o) == [0, 1, 2, 3] for o in orders)
    assert shown_order(0, "pool:x", "helpfulness", 1, 4, 0, 1) == orders[0]  # order 0 is the single-order shuffle
    fair = [3.0, 3.0, 3.0, 1.0]  # three equal answers and one bad one; the judge adds 1 to the first shown
    calls = [_call(o, [fair[i] + (p == 0) for p, i in enumerate(o)]) for o in orders]
    verdict = {"helpfulness": AspectVerdict("helpfulness", calls)}
    one_order = score_answers({"helpfulness": AspectVerdict("helpfulness", calls[:1])}, 4)
    averaged = score_answers(verdict, 4)
    assert max(one_order) == 4.0 and one_order.count(4.0) == 1  # one order alone crowns whichever came first
    assert averaged == [3.25, 3.25, 3.25, 1.25]  # averaged: the three equal answers tie again
    assert binarize(averaged, "best_vs_worst", 0.5, random.Random(0)) in [(0, 3), (1, 3), (2, 3)]


def test_drop_order_flips_keeps_pairs_preferred_in_every_order_and_drops_the_rest():
    order_scores = [[5.0, 4.0, 1.0], [4.0, 5.0, 1.0]]  # answers 0 and 1 swap places with the order
    scores = [4.5, 4.5, 1.0]
    why_not = pair_filter(order_scores, [4, 4, 4], scores, True, 0.0, 0.0)
    assert why_not(0, 1) == ORDER_FLIP and why_not(1, 0) == ORDER_FLIP
    assert why_not(0, 2) is None and why_not(1, 2) is None
    for seed in range(10):  # the flipping answer is never drawn as rejected
        assert binarize([5.0, 4.4, 1.0], "best_vs_random", 0.0, random.Random(seed), why_not)[1] == 2
    only_flips = pair_filter([[5.0, 4.0], [4.0, 5.0]], [4, 4], [4.6, 4.4], True, 0.0, 0.0)
    assert binarize([4.6, 4.4], "best_vs_random", 0.0, random.Random(0), only_flips) == ORDER_FLIP
    assert correction_pair([4.4, 4.6], 0.0, pair_filter([[4.0, 5.0], [5.0, 4.0]], [4, 4], [4.4, 4.6], True, 0, 0)) \
        == ORDER_FLIP  # the rewrite loses in one order: no correction pair
    with pytest.raises(ValueError, match="drop_order_flips needs orders >= 2"):
        FeedbackConfig(drop_order_flips=True)


def test_length_margin_drops_a_chosen_answer_that_leads_by_no_more_than_its_extra_length():
    lengths, scores = [14, 4, 4, 20], [4.5, 4.0, 1.0, 1.2]
    why_not = pair_filter([scores], lengths, scores, False, 0.0, 0.15)  # 10 extra words must buy more than 1.5
    assert why_not(0, 1) == LENGTH_ONLY  # leads by 0.5, 10 words longer: length alone
    assert why_not(0, 2) is None  # leads by 3.5: more than its length explains
    assert why_not(1, 3) is None  # a shorter chosen answer owes only the plain margin
    assert binarize(scores, "best_vs_random", 0.0, random.Random(0), why_not) in [(0, 2), (0, 3)]
    long_best = pair_filter([[4.0, 3.5]], [30, 4], [4.0, 3.5], False, 0.0, 0.15)
    assert binarize([4.0, 3.5], "best_vs_worst", 0.0, random.Random(0), long_best) == LENGTH_ONLY
    assert pair_filter([scores], lengths, scores, False, 0.0, 0.0) is None  # off: nothing filtered


def test_each_mitigation_in_use_writes_a_line_of_what_it_changed():
    user = {"role": "user", "content": "q"}
    pair = {"pair_id": "pool:p", "chosen_completion_id": "a", "rejected_completion_id": "b", "source": "pool",
            "chosen": [user, {"role": "assistant", "content": "one two three"}],
            "rejected": [user, {"role": "assistant", "content": "one"}]}
    ratings = [{"item_id": "pool:p", "completion_id": c, "aspect": "helpfulness", "order": o, "rating": v}
               for c, o, v in (("a", 0, 3.0), ("b", 0, 4.0), ("a", 1, 5.0), ("b", 1, 2.0))]
    cfg = FeedbackConfig(orders=2, drop_order_flips=True, pairs={"length_margin_per_word": 0.1})
    lines = mitigation_effects(cfg, [pair], ratings, {ORDER_FLIP: 3, LENGTH_ONLY: 2})
    assert "would have tied or reversed 1 of 1 pairs" in lines["orders"]
    assert lines["drop_order_flips"].startswith("3 items dropped")
    assert lines["length_margin_per_word"].startswith("2 items dropped") and "chosen has more words in 1 of 1" in \
        lines["length_margin_per_word"]
    assert set(mitigation_effects(FeedbackConfig(), [pair], ratings, {})) == {"none"}


def _feedback_run(write_recipe, tmp_path: Path, name: str, toy: ToyTeacherConfig, feedback: dict) -> dict:
    with ToyTeacher(toy) as server:
        recipe = load_recipe(write_recipe({
            "name": name, "teacher": {"base_url": server.base_url, **TEACHER}, "task": "toy",
            "prompts": {"source": "task", "count": 60}, "sample": {"k": 4, "shard_size": 50, "pool": POOL},
            "feedback": {"aspects": ["instruction_following", "helpfulness"], **feedback}}))
        store = open_run(recipe, name)
        run_stage("sample", recipe, store)
        run_stage("feedback", recipe, store)
    report = json.loads(Path(store.join("feedback", "report.json")).read_text())
    report["stats"] = json.loads(Path(store.join("feedback", "stats.json")).read_text())
    report["md"] = Path(store.join("feedback", "report.md")).read_text()
    return report


def test_report_recovers_an_injected_first_position_bias_and_orders_with_flip_drop_remove_it(write_recipe,
                                                                                              tmp_path):
    # every teacher answer wrong (error_rate 1): instruction following 2, helpfulness 1, room for +1 on both
    biased = ToyTeacherConfig(error_rate=1.0, position_bias=1.0)
    fair = _feedback_run(write_recipe, tmp_path, "fair", ToyTeacherConfig(error_rate=1.0), {})
    plain = _feedback_run(write_recipe, tmp_path, "plain", biased, {})
    assert fair["first_position_advantage"]["all"] == 0.0 and fair["pairs"] == 0  # equal answers: no pairs
    assert 0.9 <= plain["first_position_advantage"]["all"] <= 1.1  # the injected 1, recovered
    assert plain["first_position_advantage"]["helpfulness"] > 0.9
    assert plain["pairs"] > 30  # the bias alone made pairs out of equally wrong answers
    assert "First-position advantage" in plain["md"] and "`none`" in plain["md"]
    mitigated = _feedback_run(write_recipe, tmp_path, "mitigated", biased, {"orders": 4, "drop_order_flips": True})
    assert mitigated["pairs"] == 0  # every answer first once: the bonus averages out, ties and flips are dropped
    assert mitigated["stats"]["ratings"] == 4 * plain["stats"]["ratings"]
    assert "## Mitigations" in mitigated["md"] and "`orders`: every aspect rated in 4 orders" in mitigated["md"]
    assert set(mitigated["stats"]["dropped_by_reason"]) <= {"tie", ORDER_FLIP, "below_min_margin"}


def test_a_recipe_asking_for_flip_drops_with_one_order_names_the_key(write_recipe):
    path = write_recipe({"name": "x", "task": "toy", "feedback": {"drop_order_flips": True}})
    with pytest.raises(RecipeError, match="feedback.*drop_order_flips needs orders >= 2"):
        load_recipe(path)


def test_majority_panel_keeps_pairs_most_raters_prefer_and_drops_split_ones():
    three = [[5.0, 1.0, 3.0], [4.0, 2.0, 4.5], [1.0, 5.0, 3.0]]  # two of three prefer answer 0 over 1
    why_not = pair_filter([[3.3, 2.7, 3.5]], [4, 4, 4], [3.3, 2.7, 3.5], False, 0.0, 0.0, three)
    assert why_not(0, 1) is None
    assert why_not(2, 1) is None  # 3 > 1, 4.5 > 2; 3 < 5: still two of three
    assert why_not(0, 2) == PANEL_SPLIT  # 5 > 3, but 4 < 4.5 and 1 < 3: one of three
    two = [[5.0, 1.0], [1.0, 5.0]]
    assert pair_filter([[3.0, 3.0]], [4, 4], [3.0, 3.0], False, 0.0, 0.0, two)(0, 1) == PANEL_SPLIT  # 1 of 2


def test_a_panel_naming_an_unknown_endpoint_names_the_key_and_the_endpoints(write_recipe):
    path = write_recipe({"name": "x", "task": "toy", "endpoints": {"critic": {"base_url": "http://x/v1"}},
                         "feedback": {"panel": ["teacher", "nope"]}})
    with pytest.raises(RecipeError, match=r"feedback.panel\[1\]: unknown endpoint 'nope'; the endpoints are: "
                                          r"teacher, critic"):
        load_recipe(path)


def test_a_panel_outvotes_its_biased_rater_and_each_rater_is_ledgered_by_its_endpoint(write_recipe, tmp_path):
    from pipeline.teacher.spend import spend_summary

    fast = {k: v for k, v in TEACHER.items() if k != "model"}
    with ToyTeacher(ToyTeacherConfig(error_rate=1.0)) as fair_a, ToyTeacher(ToyTeacherConfig(error_rate=1.0)) as \
            fair_b, ToyTeacher(ToyTeacherConfig(error_rate=1.0, position_bias=2.0)) as biased:
        data = {"name": "panel", "teacher": {"base_url": fair_a.base_url, **TEACHER}, "task": "toy",
                "endpoints": {"fair-b": {"base_url": fair_b.base_url, "model": "toy-b", **fast},
                              "biased": {"base_url": biased.base_url, "model": "toy-biased", **fast}},
                "prompts": {"source": "task", "count": 30}, "sample": {"k": 4, "shard_size": 50, "pool": POOL},
                "feedback": {"aspects": ["helpfulness"], "panel": ["teacher", "fair-b", "biased"],
                             "aggregate": "majority"}}
        recipe = load_recipe(write_recipe(data))
        store = open_run(recipe, "panel")
        run_stage("sample", recipe, store)
        run_stage("feedback", recipe, store)
        alone = load_recipe(write_recipe({**data, "name": "alone", "roles": {"rater": "biased"},
                                          "feedback": {"aspects": ["helpfulness"]}}))
        alone_store = open_run(alone, "alone")
        run_stage("sample", alone, alone_store)
        run_stage("feedback", alone, alone_store)
    biased_pairs = len(list(alone_store.read_records("feedback", "pairs")))
    assert biased_pairs > 15  # alone, the biased rater makes pairs out of equally wrong answers
    assert list(store.read_records("feedback", "pairs")) == []  # the two fair raters outvote it
    stats = json.loads(Path(store.join("feedback", "stats.json")).read_text())
    assert stats["dropped_by_reason"].get(PANEL_SPLIT, 0) > 15
    ratings = list(store.read_records("feedback", "ratings"))
    assert {r["judge_model"] for r in ratings} == {"teacher/toy-teacher", "fair-b/toy-b", "biased/toy-biased"}
    spend = spend_summary(store)["stages"]["feedback"]["endpoints"]
    assert spend["teacher"]["requests"] == spend["fair-b"]["requests"] == spend["biased"]["requests"] == 30
    report = Path(store.join("feedback", "report.md")).read_text()
    assert "`panel`: 3 raters (teacher, fair-b, biased), majority" in report
