"""Feedback against raters over real loopback HTTP: unusable replies re-asked until usable, a rerun that asks
anew (and the ledger that counts every paid reply), JSON-schema ratings, and auto's fallback to text."""

from __future__ import annotations

import json
import re
from collections import Counter
from pathlib import Path

import pytest
from loopback import LoopbackChat
from starlette.requests import Request
from starlette.responses import JSONResponse

from pipeline.core.recipe import load_recipe
from pipeline.core.store import RunStore
from pipeline.run.errors import StageFailed
from pipeline.run.runner import open_run, run_stage
from pipeline.stages.feedback.ratings import parse_json_ratings
from pipeline.tasks.toy.teacher_server import ToyTeacher, ToyTeacherApp, ToyTeacherConfig
from pipeline.teacher.ledger import SpendLedger

TEACHER = {"model": "toy-teacher", "api_key_env": None, "timeout_s": 10.0, "max_retries": 2, "backoff_base_s": 0.05,
           "backoff_max_s": 0.2, "max_concurrency": 8}
POOL = [{"name": "teacher-a", "backend": "openai", "model": "toy-teacher", "temperature": 0.0, "max_tokens": 64},
        {"name": "teacher-b", "backend": "openai", "model": "toy-teacher", "temperature": 1.0, "max_tokens": 64}]
ASPECTS = ["instruction_following", "helpfulness"]
N_PROMPTS = 10


class ToyRater(LoopbackChat):
    """The toy teacher's answers, except the rater's: `bad_first` makes the first rating request about each
    (aspect, instruction) unusable, `never` makes every one so. Every request body is kept."""

    def __init__(self, bad_first: bool = False, never: bool = False):
        toy = ToyTeacherApp(ToyTeacherConfig())
        seen: Counter[tuple[str, str]] = Counter()
        self.bodies: list[dict] = []

        async def chat(request: Request) -> JSONResponse:
            body = await request.json()
            self.bodies.append(body)
            answer = toy.answer(body)
            if answer.pop("_role") == "rater":
                text = body["messages"][-1]["content"]
                about = (re.search(r"^Aspect: (.*)$", text, re.M).group(1), text.split("## Answers")[0])
                seen[about] += 1
                if never or (bad_first and seen[about] == 1):
                    answer["choices"][0]["message"]["content"] = "All of these texts look fine to me."
            answer.pop("_request_key")
            return JSONResponse(answer)

        super().__init__(chat)

    def rating_bodies(self) -> list[dict]:
        return [b for b in self.bodies if "<text 1>" in b["messages"][-1]["content"]]


def _run(write_recipe, base_url: str, name: str, **teacher) -> tuple[object, RunStore]:
    recipe = load_recipe(write_recipe({
        "name": "structured", "teacher": {"base_url": base_url, **TEACHER, **teacher}, "task": "toy",
        "prompts": {"source": "task", "count": N_PROMPTS}, "sample": {"k": 2, "shard_size": 50, "pool": POOL},
        "feedback": {"aspects": ASPECTS, "max_parse_attempts": 2, "shard_size": 25},
    }, name=f"{name}.yaml"))
    store = open_run(recipe, name)
    assert run_stage("sample", recipe, store).status == "completed"
    return recipe, store


def _rater_charges(tmp_path: Path, run: str) -> list:
    ledger = SpendLedger.open(tmp_path / "runs" / run / "cache" / "teacher.sqlite")
    try:
        return [c for c in ledger.rows() if c.stage == "feedback" and c.role == "rater"]
    finally:
        ledger.close()


def _rated(store: RunStore) -> dict[str, set[str]]:
    rated: dict[str, set[str]] = {}
    for r in store.read_records("feedback", "ratings"):
        rated.setdefault(r["item_id"], set()).add(r["aspect"])
    return rated


def _canonical(body: dict) -> str:
    return json.dumps(body, sort_keys=True)


def test_a_rater_unusable_at_first_then_usable_gets_every_item_rated(write_recipe, tmp_path):
    with ToyRater(bad_first=True) as rater:
        recipe, store = _run(write_recipe, rater.base_url, "flaky")
        report = run_stage("feedback", recipe, store)
        bodies = rater.rating_bodies()
    assert report.status == "completed", report.message
    assert report.counts["failed"] == 0 and report.counts["input"] == N_PROMPTS
    assert _rated(store) == {f"pool:{p}": set(ASPECTS) for p in {r["prompt_id"] for r in
                                                              store.read_records("sample", "completions")}}
    assert {r["attempt"] for r in store.read_records("feedback", "ratings")} == {2}
    # each call: the first ask and one re-ask that differs (a reminder, a new seed, a sampling temperature)
    assert len(bodies) == 2 * N_PROMPTS * len(ASPECTS)
    reasks = [b for b in bodies if b.get("seed") is not None]
    assert len(reasks) == N_PROMPTS * len(ASPECTS)
    assert all(b["temperature"] > 0 and "previous reply could not be used" in b["messages"][-1]["content"]
               for b in reasks)
    assert len(_rater_charges(tmp_path, "flaky")) == len(bodies)  # the unusable replies were paid for too
    parsing = json.loads(Path(store.join("feedback", "report.json")).read_text())["parsing"]["rater"]
    assert (parsing["used"], parsing["calls"], parsing["first_attempt_rate"], parsing["parse_rate"]) == (
        "text", N_PROMPTS * len(ASPECTS), 0.0, 1.0)


def test_a_rerun_against_a_rater_that_never_answers_usably_sends_new_requests(write_recipe, tmp_path):
    with ToyRater(never=True) as rater:
        recipe, store = _run(write_recipe, rater.base_url, "hopeless")
        with pytest.raises(StageFailed):
            run_stage("feedback", recipe, store)
        asked_first = [_canonical(b) for b in rater.rating_bodies()]
        with pytest.raises(StageFailed) as second:
            run_stage("feedback", recipe, store)
        asked_all = [_canonical(b) for b in rater.rating_bodies()]
    assert f"{N_PROMPTS} of {N_PROMPTS} items failed" in str(second.value)
    assert "rerun to retry them" in str(second.value)
    rerun = asked_all[len(asked_first):]
    assert len(rerun) == len(asked_first) == 2 * N_PROMPTS * len(ASPECTS)  # 2 new attempts per call each time
    assert len(set(asked_all)) == len(asked_all)  # no request was sent twice: a rerun asks what no run asked
    assert len(_rater_charges(tmp_path, "hopeless")) == len(asked_all)  # every paid reply is in the ledger
    failures = store.ledger("feedback").latest()
    assert len(failures) == N_PROMPTS and all(f.attempts == 4 for f in failures.values())  # summed over reruns


def test_structured_ratings_carry_the_schema_and_give_the_text_modes_ratings(write_recipe, tmp_path):
    with ToyRater() as rater:
        recipe, text_store = _run(write_recipe, rater.base_url, "text")
        assert run_stage("feedback", recipe, text_store).status == "completed"
        recipe, store = _run(write_recipe, rater.base_url, "json", structured="json_schema")
        before = len(rater.bodies)
        report = run_stage("feedback", recipe, store)
        bodies = [b for b in rater.rating_bodies()[N_PROMPTS * len(ASPECTS):]]
        assert len(rater.bodies) > before
    assert report.status == "completed", report.message
    assert len(bodies) == N_PROMPTS * len(ASPECTS)
    for body in bodies:
        fmt = body["response_format"]
        shown = len(re.findall(r"^<text \d+>$", body["messages"][-1]["content"], re.M))
        ratings = fmt["json_schema"]["schema"]["properties"]["ratings"]
        assert fmt["type"] == "json_schema" and fmt["json_schema"]["strict"] is True
        assert ratings["minItems"] == ratings["maxItems"] == shown >= 2
        assert "Reply with one JSON object" in body["messages"][-1]["content"]
    ratings = {(r["completion_id"], r["aspect"]): r["rating"] for r in store.read_records("feedback", "ratings")}
    text_ratings = {(r["completion_id"], r["aspect"]): r["rating"]
                    for r in text_store.read_records("feedback", "ratings")}
    assert ratings == text_ratings and json.loads(next(iter(store.read_records("feedback", "ratings")))["raw"])
    parsing = json.loads(Path(store.join("feedback", "report.json")).read_text())["parsing"]["rater"]
    assert (parsing["used"], parsing["json_ok"], parsing["replies"], parsing["first_attempt_rate"]) == (
        "structured", N_PROMPTS * len(ASPECTS), N_PROMPTS * len(ASPECTS), 1.0)
    md = Path(store.join("feedback", "report.md")).read_text()
    assert "- rater: structured (asked: json_schema): 20 calls, 100.0% usable at the first attempt" in md


def test_auto_falls_back_to_text_after_one_refused_schema_and_the_report_says_so(write_recipe):
    with ToyTeacher(ToyTeacherConfig(structured_unsupported=True)) as toy:
        recipe, store = _run(write_recipe, toy.base_url, "auto", structured="auto")
        toy.reset_stats()
        report = run_stage("feedback", recipe, store)
        stats = toy.stats()
    assert report.status == "completed", report.message
    assert stats["outcomes"]["400_response_format"] == 1  # the first request alone: the others waited for it
    assert stats["roles_ok"]["rater"] == N_PROMPTS * len(ASPECTS)
    parsing = json.loads(Path(store.join("feedback", "report.json")).read_text())["parsing"]["rater"]
    assert parsing["used"] == "text after a fallback" and "HTTP 400" in parsing["fallback"]
    assert parsing["parse_rate"] == 1.0 and parsing["text_ok"] == N_PROMPTS * len(ASPECTS)
    assert "fell back to text: HTTP 400" in Path(store.join("feedback", "report.md")).read_text()


def test_json_ratings_are_read_by_text_number_and_bad_entries_are_problems():
    value = {"ratings": [{"text": 2, "rating": 4, "rationale": "ok"}, {"text": "Text 1", "rating": "5"},
                         {"text": 3, "rating": 9}]}
    parsed = parse_json_ratings(value, 4, "helpfulness")
    assert {i: r.value for i, r in parsed.ratings.items()} == {1: 5.0, 2: 4.0}
    assert parsed.problems == {3: "rating 9 is outside 1-5", 4: "no entry for this text"}
    assert parse_json_ratings({"ratings": [{"text": 1, "rating": "N/A"}]}, 1, "honesty").ratings[1].na
    assert parse_json_ratings("nonsense", 1, "honesty").problems


def test_a_bare_yaml_off_turns_structured_replies_off(write_recipe):
    from pipeline.core.recipe import load_recipe

    path = write_recipe({"task": "toy", "teacher": {"structured": "json_schema"}})
    assert load_recipe(path).teacher.structured == "json_schema"
    # `structured: off` in a file or `--set teacher.structured=off` is YAML's false, not the string
    assert load_recipe(path, ["teacher.structured=off"]).teacher.structured == "off"
    path.write_text(path.read_text().replace("structured: json_schema", "structured: off"))
    assert load_recipe(path).teacher.structured == "off"
