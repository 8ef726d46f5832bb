"""Review before DPO without a browser: the recipe section, the seeded draw, verdicts applied to the pairs dpo
trains on, the agreement statistics, dpo's fingerprint, and the file form of `distill review` on a run store
whose feedback pairs are written here (the toy run through Prefect is in test_review_browser.py)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner, Result

from pipeline.cli import main
from pipeline.core.recipe import RecipeError, load_recipe
from pipeline.core.rounds import round_store
from pipeline.core.store import RunStore, StageState
from pipeline.review.answers import ReviewError, ReviewPending, apply_review, read_review, review_path
from pipeline.review.gate import record_answers, review_inputs
from pipeline.review.report import review_report
from pipeline.review.sample import draw
from pipeline.run.registry import fingerprint
from pipeline.run.runner import open_run, plan, run_stage
from pipeline.stages.dpo.stage import round_pairs, training_pairs
from pipeline.stages.feedback.schema import pairs_schema

ROOT = Path(__file__).resolve().parents[1]
QUICKSTART = ROOT / "configs" / "quickstart.yaml"
ROUNDS = ROOT / "configs" / "quickstart-rounds.yaml"
ASPECTS = ["instruction_following", "helpfulness"]


def pair(i: int, source: str = "pool") -> dict:
    """A pair whose chosen answer is right and longer, its rejected one wrong and short."""
    prompt = [{"role": "user", "content": f"What is {i} + {i}?"}]
    chosen = [*prompt, {"role": "assistant", "content": f"{i} + {i} = {2 * i}."}]
    rejected = [*prompt, {"role": "assistant", "content": f"{2 * i + 1}"}]
    row = {"pair_id": f"p{i:03d}", "prompt": prompt[0]["content"], "prompt_id": f"q{i:03d}", "chosen": chosen,
           "rejected": rejected, "messages": chosen, "score_chosen": 4.5, "score_rejected": 2.0,
           "chosen_model": "teacher", "rejected_model": "base", "chosen_completion_id": f"c{i}",
           "rejected_completion_id": f"r{i}", "source": source, "strategy": "best_vs_random", "rated_answers": 4}
    return {**row, **{f"{side}_{a}": 4.0 if side == "chosen" else 2.0 for a in ASPECTS
                      for side in ("chosen", "rejected")}}


def write_pairs(store: RunStore, rows: list[dict]) -> None:
    with store.shard_writer("feedback", "pairs", id_key="pair_id", schema=pairs_schema(ASPECTS)) as writer:
        for row in rows:
            writer.add(row)


def reviewed_run(tmp_path: Path, *overrides: str, pairs: int = 12, path: Path = QUICKSTART):
    """A run whose sft and feedback are complete (fingerprints as the runner computes them) with `pairs` pairs."""
    recipe = load_recipe(path, [f"storage.root={tmp_path / 'runs'}", "feedback.review.sample=8", *overrides])
    store = open_run(recipe, "r")
    write_pairs(store, [pair(i, "correction" if i % 3 == 0 else "pool") for i in range(pairs)])
    for stage in ("generate", "sft", "sample", "feedback"):
        store.set_stage_state(stage, StageState(fingerprint=fingerprint(stage, recipe), status="completed"))
    return recipe, store


def answer(store: RunStore, swaps: int = 2, drops: int = 1, notes: str = "") -> dict:
    """Record a review: the first `swaps` pairs swapped, the next `drops` dropped, the rest agreed with."""
    items = draw(list(store.read_records("feedback", "pairs")), 8, 0)
    other = {"A": "B", "B": "A"}
    answers = {i.number: (other[i.judge_pick] if i.number <= swaps else "drop" if i.number <= swaps + drops
                          else i.judge_pick, notes) for i in items}
    record_answers(store, items, answers, "a test", 12, "test")
    return read_review(store)


def cli(*args: str) -> Result:
    """The `distill` command in this process (its imports are paid once)."""
    return CliRunner().invoke(main, list(args))


def test_the_review_section_is_off_by_default_and_its_errors_name_the_key() -> None:
    assert load_recipe(QUICKSTART).feedback.review is None
    on = load_recipe(QUICKSTART, ["feedback.review={sample: 8, on_timeout: continue}"]).feedback.review
    assert (on.sample, on.on_timeout, on.timeout_s, on.seed) == (8, "continue", 86400, 0)
    for override, message in [("feedback.review.sample=0", "feedback.review.sample: Input should be greater"),
                              ("feedback.review={sample: 8, on_timeout: later}", "feedback.review.on_timeout"),
                              ("feedback.review={sample: 8, samples: 3}", "feedback.review.samples: unknown key"),
                              ("feedback.review={timeout_s: 60}", "feedback.review.sample: Field required")]:
        with pytest.raises(RecipeError, match=message):
            load_recipe(QUICKSTART, [override])


def test_turning_the_review_on_moves_dpo_and_what_reads_it_only(tmp_path: Path) -> None:
    memo_off, memo_on = {}, {}
    off = {k: fingerprint(k, load_recipe(QUICKSTART), memo_off) for k in plan(load_recipe(QUICKSTART))}
    recipe = load_recipe(QUICKSTART, ["feedback.review.sample=8"])
    on = {k: fingerprint(k, recipe, memo_on) for k in plan(recipe)}
    assert {k for k in off if off[k] != on[k]} == {"dpo", "evaluate"}


def test_the_draw_is_seeded_on_which_pairs_exist_not_their_order() -> None:
    pairs = [pair(i) for i in range(30)]
    first = draw(pairs, 8, 0)
    assert len(first) == 8 and len({i.pair_id for i in first}) == 8
    assert draw(list(reversed(pairs)), 8, 0) == first  # feedback's finishing order does not matter
    assert [i.pair_id for i in draw(pairs, 8, 1)] != [i.pair_id for i in first]
    assert {i.judge_pick for i in draw(pairs, 30, 0)} == {"A", "B"}  # both sides shown left
    assert len(draw(pairs[:5], 8, 0)) == 5
    for item in first:  # the judge's chosen answer is on its side, the scores with it
        chosen = next(p for p in pairs if p["pair_id"] == item.pair_id)["chosen"][-1]["content"]
        assert (item.a if item.judge_pick == "A" else item.b) == chosen
        assert (item.score_a if item.judge_pick == "A" else item.score_b) == 4.5


def test_swapped_pairs_train_exchanged_and_dropped_ones_are_ledgered_with_the_note(tmp_path: Path) -> None:
    recipe, store = reviewed_run(tmp_path)
    review = answer(store, notes="both wrong")
    swapped = {i["pair_id"] for i in review["items"] if i["verdict"] == "swap"}
    [dropped] = [i["pair_id"] for i in review["items"] if i["verdict"] == "drop"]
    total, keyed, failures, verdicts = round_pairs(recipe, store, 1)
    trained = dict(keyed)
    assert total == 12 and len(trained) == 11 and dropped not in trained and len(swapped) == 2
    for i in range(12):
        original, got = pair(i), trained.get(f"p{i:03d}")
        if got is None:
            continue
        flip = original["pair_id"] in swapped
        assert got["chosen"] == (original["rejected"] if flip else original["chosen"])[-1:]
        assert got["rejected"] == (original["chosen"] if flip else original["rejected"])[-1:]
    assert failures == {dropped: "dpo: dropped in review (pair 3): both wrong"}
    assert sorted(verdicts.values()) == ["agree"] * 5 + ["drop", "swap", "swap"]


def test_agreement_is_five_of_seven_with_its_standard_error_overall_and_by_source(tmp_path: Path) -> None:
    _, store = reviewed_run(tmp_path)
    report = review_report(answer(store))
    assert report["agreement"] == {"k": 5, "n": 7, "share": round(5 / 7, 4),
                                   "stderr": round(math.sqrt(5 / 7 * 2 / 7 / 7), 4)}
    assert (report["agree"], report["swap"], report["drop"], report["reviewed"]) == (5, 2, 1, 8)
    by_source = report["agreement_by_source"]
    assert sum(s["n"] for s in by_source.values()) == 7 and sum(s["k"] for s in by_source.values()) == 5
    # every chosen answer here is the longer one: the judge always picks it, the person not in the two swaps
    assert report["length"]["judge_picks_longer"]["share"] == 1.0
    assert report["length"]["person_picks_longer"] == {**report["length"]["person_picks_longer"], "k": 5, "n": 7}
    kept = [i for i in read_review(store)["items"] if i["verdict"] != "drop"]
    assert report["position"]["person_picks_a"]["k"] == sum(i["answer"] == "A" for i in kept)
    assert report["position"]["judge_picks_a"]["k"] == sum(i["judge_pick"] == "A" for i in kept)


def test_dpos_fingerprint_follows_the_verdicts_not_the_notes(tmp_path: Path) -> None:
    recipe, store = reviewed_run(tmp_path)
    before = fingerprint("dpo", recipe, store=store)
    answer(store, notes="first")
    one = fingerprint("dpo", recipe, store=store)
    answer(store, notes="second thoughts")
    assert fingerprint("dpo", recipe, store=store) == one != before
    answer(store, swaps=3)
    assert fingerprint("dpo", recipe, store=store) not in (one, before)
    assert fingerprint("evaluate", recipe, store=store) != fingerprint("evaluate", recipe)


def test_without_prefect_dpo_waits_for_the_file_form_which_distill_review_records(tmp_path: Path) -> None:
    recipe, store = reviewed_run(tmp_path)
    with pytest.raises(ReviewPending, match=r"round 1's review is not in yet: fill in the form .*form.yaml \(8 "
                                            r"pairs.*`distill review .*/runs/r`"):
        run_stage("dpo", recipe, store)
    assert store.stage_state("dpo").status == "pending"  # the stage was not started
    form = Path(review_path(store, "form.yaml"))
    data = yaml.safe_load(form.read_text())
    assert [e["pair"] for e in data["pairs"]] == list(range(1, 9))
    assert "4.5" not in form.read_text()  # the judge's scores are not in the form
    assert f"review (round 1): waiting for answers in {form}" in cli("status", store.url).stdout
    res = cli("review", store.url)
    assert res.exit_code == 2 and f"{form}: pairs 1, 2, 3, 4, 5, 6, 7, 8 have no answer" in res.stderr
    items = {i.number: i for i in draw(list(store.read_records("feedback", "pairs")), 8, 0)}
    flip = {"A": "B", "B": "A"}
    for entry in data["pairs"]:
        pick = items[entry["pair"]].judge_pick
        entry["answer"] = flip[pick] if entry["pair"] <= 2 else "drop" if entry["pair"] == 3 else pick
    data["pairs"][0]["answer"] = "C"
    form.write_text(yaml.safe_dump(data))
    res = cli("review", store.url)
    assert res.exit_code == 2 and f"{form}: pair 1: answer 'C' is not one of A, B, drop" in res.stderr
    data["pairs"][0]["answer"] = flip[items[1].judge_pick] + " is better"  # the UI's label is taken too
    form.write_text(yaml.safe_dump(data))
    res = cli("review", store.url)
    assert res.exit_code == 0, res.output
    assert "judge–person agreement 5/7 = 0.71 ± 0.17, 2 swapped, 1 dropped" in res.stdout
    assert read_review(store)["by"] == f"file {form}"
    status = cli("status", store.url)
    assert "review (round 1): 8 pairs, judge–person agreement 5/7 = 0.71 ± 0.17" in status.stdout
    assert json.loads(cli("status", store.url, "--json").stdout)["reviews"]["1"]["agreement"]["k"] == 5
    assert "| agreement, pool pairs |" in Path(review_path(store, "report.md")).read_text()


def test_a_form_for_other_pairs_is_refused_naming_the_pair(tmp_path: Path) -> None:
    _, store = reviewed_run(tmp_path)
    res = cli("review", store.url, "--form", str(tmp_path / "form.yaml"))
    assert res.exit_code == 0 and "wrote the review form" in res.stdout
    data = yaml.safe_load((tmp_path / "form.yaml").read_text())
    data["pairs"][1]["id"] = "p999"
    (tmp_path / "form.yaml").write_text(yaml.safe_dump(data))
    res = cli("review", store.url, "--form", str(tmp_path / "form.yaml"))
    assert res.exit_code == 2 and "pair 2: id p999 is not the pair drawn for this review" in res.stderr
    assert read_review(store) is None


def test_a_later_rounds_review_lives_in_its_round_and_train_on_all_waits_for_every_round(tmp_path: Path) -> None:
    recipe, store = reviewed_run(tmp_path, "dpo.train_on=all", path=ROUNDS)
    two = round_store(store, 2)
    write_pairs(two, [pair(i) for i in range(20, 26)])
    two.set_stage_state("feedback", StageState(status="completed"))
    res = cli("review", store.url, "--round", "2")
    assert res.exit_code == 0, res.output
    form = Path(store.join("rounds", "2", "feedback", "review", "form.yaml"))
    assert f"wrote the review form {form} (6 pairs)" in res.stdout
    assert "--round 2" in form.read_text() and "p020" in form.read_text()
    assert review_inputs(recipe, store, 2) == {"1": None, "2": None}
    answer(store)
    assert review_inputs(recipe, store, 2)["1"] is not None and review_inputs(recipe, store, 2)["2"] is None
    with pytest.raises(ReviewError, match="names 8 pair"):  # round 1's answers do not fit round 2's pairs
        apply_review(two.read_records("feedback", "pairs"), read_review(store), "answers.json")


def test_dpo_of_a_later_round_trains_every_rounds_pairs_as_each_review_left_them(tmp_path: Path) -> None:
    recipe, store = reviewed_run(tmp_path, "dpo.train_on=all", path=ROUNDS)
    two = round_store(store, 2)
    write_pairs(two, [pair(i) for i in range(12)])  # the same prompts: the same pair ids as round 1's
    one_review, two_review = answer(store, swaps=2, drops=1), answer(two, swaps=0, drops=2)
    total, keyed, failures, verdicts = training_pairs(recipe, two)
    ids = [pid for pid, _ in keyed]
    assert total == 24 and len(ids) == len(set(ids)) == 21  # 1 + 2 dropped
    assert ids[:10] == sorted(ids[:10]) and all(pid.startswith("round1:") for pid in ids[10:])
    assert sorted(verdicts.values()).count("swap") == 2 and sorted(verdicts.values()).count("drop") == 3
    for review, prefix in ((one_review, "round1:"), (two_review, "")):
        for item in review["items"]:
            assert verdicts[prefix + item["pair_id"]] == item["verdict"]
            assert (prefix + item["pair_id"] in failures) == (item["verdict"] == "drop")
