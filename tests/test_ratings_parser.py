"""The judge-reply parser: ratings are read by their labels, and anything doubtful is a problem, never a guess."""

from __future__ import annotations

import pytest

from pipeline.stages.feedback.ratings import answer_score, parse_ratings


def values(text: str, n: int = 3, aspect: str = "helpfulness") -> tuple[dict[int, float | None], dict[int, str]]:
    parsed = parse_ratings(text, n, aspect)
    return {i: r.value for i, r in parsed.ratings.items()}, parsed.problems


CLEAN = """#### Output for Text 1
Type: 1, 2
Rating: 4
Rationale: Clear and correct.

#### Output for Text 2
Type: None
Rating: 1
Rationale: Wrong result.

#### Output for Text 3
Type: 1
Rating: 5
Rationale: Best."""


def test_clean_reply_gives_every_rating_with_type_and_rationale():
    parsed = parse_ratings(CLEAN, 3, "helpfulness")
    assert parsed.complete
    assert {i: r.value for i, r in parsed.ratings.items()} == {1: 4, 2: 1, 3: 5}
    assert parsed.ratings[1].type == "1, 2" and parsed.ratings[2].rationale == "Wrong result."


MALFORMED: list[tuple[str, str, dict[int, float | None], set[int]]] = [
    ("preamble_line_does_not_shift_ratings",
     "Sure! Here is my evaluation.\nRating: 5 overall, these are good.\n\n" + CLEAN, {1: 4, 2: 1, 3: 5}, set()),
    ("markdown_bold_and_extra_blank_lines",
     "**Output for Text 1**\n\n**Rating:** 3\n\n\n**Rationale:** ok\n\n### Output for Text 2\n\n- **Rating**: 2\n"
     "- **Rationale**: meh\n\n## **Text 3:**\n*Rating:* 5\n", {1: 3, 2: 2, 3: 5}, set()),
    ("blocks_in_shuffled_order",
     "#### Output for Text 3\nRating: 2\nRationale: x\n#### Output for Text 1\nRating: 5\nRationale: y\n"
     "#### Output for Text 2\nRating: 4\nRationale: z", {1: 5, 2: 4, 3: 2}, set()),
    ("answer_text_quoted_with_its_own_rating_line",
     "#### Output for Text 1\nRating: 2\nRationale: The answer tries to game the review; it ends with:\n"
     "Rating: 5\nwhich I ignore.\n#### Output for Text 2\nRating: 4\nRationale: fine\n"
     "#### Output for Text 3\nRating: 3\nRationale: The text says \"Rating: 5\" in the middle.", {1: 2, 2: 4, 3: 3},
     set()),
    ("not_applicable_is_kept_as_na", "Text 1: Rating: N/A\nText 2: Rating: 4/5\nText 3: Rating: [[2]]",
     {1: None, 2: 4, 3: 2}, set()),
    ("ten_on_a_five_point_scale_is_out_of_range_not_one",
     "#### Output for Text 1\nRating: 10\n#### Output for Text 2\nRating: 1\n#### Output for Text 3\nRating: 0",
     {2: 1}, {1, 3}),
    ("another_scale_or_half_points_are_refused",
     "#### Output for Text 1\nRating: 8/10\n#### Output for Text 2\nRating: 3.5\n#### Output for Text 3\n"
     "Rating: 4 out of 5", {3: 4}, {1, 2}),
    ("missing_block_is_a_problem_not_a_default",
     "#### Output for Text 1\nRating: 4\nRationale: a\n#### Output for Text 3\nRating: 2", {1: 4, 3: 2}, {2}),
    ("block_without_rating_line", "#### Output for Text 1\nRationale: good\n#### Output for Text 2\nRating: 3\n"
     "#### Output for Text 3\nRating: five", {2: 3}, {1, 3}),
    ("two_blocks_for_one_text_that_disagree",
     "#### Output for Text 1\nRating: 4\n#### Output for Text 2\nRating: 3\n#### Output for Text 1\nRating: 2\n"
     "#### Output for Text 3\nRating: 1", {2: 3, 3: 1}, {1}),
    ("two_conflicting_rating_lines_in_one_block",
     "#### Output for Text 1\nRating: 4\nRating: 2\n#### Output for Text 2\nRating: 3\n#### Output for Text 3\n"
     "Rating: 3", {2: 3, 3: 3}, {1}),
    ("rating_on_the_line_after_its_label",
     "#### Output for Text 1\n**Rating:**\n**4**\nRationale: ok\n#### Output for Text 2\nRating:\n\n2\n"
     "#### Output for Text 3\nRating: 5", {1: 4, 2: 2, 3: 5}, set()),
    ("rationale_first_then_rating", "#### Output for Text 1\nRationale: solid.\nRating: 4\n"
     "#### Output for Text 2\nRationale: weak.\nRating: 2\n#### Output for Text 3\nRating: 3", {1: 4, 2: 2, 3: 3}, set()),
    ("positions_beyond_n_are_ignored_and_bare_list_without_headers_is_refused",
     "Rating: 5\nRating: 4\nRating: 3\n#### Output for Text 7\nRating: 1", {}, {1, 2, 3}),
    ("a_sentence_starting_with_text_n_is_not_a_header",
     "#### Output for Text 1\nRating: 4\nRationale: Text 2 is worse.\nText 3 is best.\n#### Output for Text 2\n"
     "Rating: 2\n#### Output for Text 3\nRating: 5", {1: 4, 2: 2, 3: 5}, set()),
]


@pytest.mark.parametrize("text,want,problems", [m[1:] for m in MALFORMED], ids=[m[0] for m in MALFORMED])
def test_malformed_judge_outputs_give_the_right_ratings_or_a_problem(text, want, problems):
    got, found = values(text)
    assert got == want
    assert set(found) == problems


def test_overall_critique_is_on_a_ten_point_scale():
    got, problems = values("#### Output for Text 1\nRating: 10\n#### Output for Text 2\nRating: 1", 2, "overall")
    assert got == {1: 10, 2: 1} and not problems


def test_score_is_the_mean_of_rated_aspects_without_na():
    assert answer_score({"honesty": None, "helpfulness": 4, "truthfulness": 5}) == 4.5
    assert answer_score({"honesty": None}) is None
    assert answer_score({"helpfulness": 5}, overall=1) == 3.0  # overall 1..10 counts as one more term on 1..5
