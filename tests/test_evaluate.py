"""The evaluate stage on a tiny toy run: real HTTP judges, tiny transformers models, the promotion gate.

The models are wired by hand so that their ground truth is known exactly: an untrained student (`base`)
and two "bigram" students that answer every prompt with one fixed sentence, `The answer is N.`; the one
whose N is the commonest answer of the evaluation prompts is the better model.
"""

from __future__ import annotations

import json
import re
import shutil
import statistics
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
import torch
from loopback import LoopbackChat, completion
from starlette.requests import Request
from starlette.responses import JSONResponse

from pipeline.core.recipe import Recipe, load_recipe, recipe_from_dict
from pipeline.core.sources import prompt_id
from pipeline.core.store import RunStore, StageState
from pipeline.run.registry import fingerprint
from pipeline.run.runner import open_run, run_stage
from pipeline.series.promotion import decide, promotion_for_run, with_current_baseline
from pipeline.stages.evaluate import records
from pipeline.stages.evaluate import stage as evaluate
from pipeline.tasks.toy.task import corpus, make_prompts, parse_problem
from pipeline.tasks.toy.teacher_server import ToyTeacher, ToyTeacherConfig
from pipeline.teacher.serving import serving_at
from pipeline.train.student import build_student

QUICKSTART = Path(__file__).resolve().parents[1] / "configs" / "quickstart.yaml"
N_ITEMS = 40


# -- fixtures: models with known answers, a run whose sft and dpo stages are done ------------------
def heldout_answers(n: int = N_ITEMS) -> list[int]:
    """The true results of the evaluation prompts (the toy heldout set, toy_seed 0)."""
    return [parse_problem(p).answer for p in make_prompts(n, 0, split="heldout")]


def constant_answer_model(base: Path, out: Path, text: str) -> Path:
    """The student rewired as a bigram model that answers every prompt with `text`: its layers add nothing
    to the residual stream, and its (untied) output head maps each token of the answer to the next."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(base)
    model = AutoModelForCausalLM.from_pretrained(base)
    prompt = tok.apply_chat_template([{"role": "user", "content": "x"}], tokenize=False, add_generation_prompt=True)
    chain = [tok(prompt, add_special_tokens=False)["input_ids"][-1],
             *tok(text, add_special_tokens=False)["input_ids"], tok.eos_token_id]
    assert len(set(chain)) == len(chain), f"'{text}' repeats a token; a bigram model cannot say it"
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.o_proj.weight.zero_()
            layer.mlp.down_proj.weight.zero_()
        emb = model.model.embed_tokens.weight
        head = torch.zeros_like(emb)
        for cur, nxt in zip(chain, chain[1:], strict=False):
            head[nxt] += 50 * emb[cur] / emb[cur].norm()
    model.config.tie_word_embeddings = False
    model.lm_head.weight = torch.nn.Parameter(head)
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def students(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    return build_students(tmp_path_factory.mktemp("models"))


def build_students(root: Path) -> dict[str, Any]:
    """The untrained base and the two constant-answer students (`sft` worse, `dpo` better on the held-out set)."""
    base = build_student(root / "base", corpus(300, 0))
    common = [(v, c) for v, c in Counter(heldout_answers()).most_common() if len(set(str(v))) == len(str(v))]
    best, best_count = common[0]
    worse = next(v for v, c in common if 0 < c < best_count)
    return {"base": base, "best": best, "worse": worse,
            "sft": constant_answer_model(base, root / "worse", f"The answer is {worse}."),
            "dpo": constant_answer_model(base, root / "best", f"The answer is {best}.")}


def toy_run(root: Path, students: dict[str, Any], teacher: dict[str, Any] | None = None,
            **evaluate_section: Any) -> tuple[Recipe, RunStore]:
    """A toy run whose sft and dpo stages are recorded as done, with the given models in their place."""
    recipe = recipe_from_dict({
        "name": "evaltest", "task": "toy", "prompts": {"source": "task"}, "sft": {"model": str(students["base"])},
        "teacher": {"api_key_env": None, "max_retries": 1, "backoff_base_s": 0.01, **(teacher or {})},
        "evaluate": {"heldout_count": N_ITEMS, "max_tokens": 12, "batch_size": 64, **evaluate_section},
        "storage": {"root": str(root / "runs")},
    })
    store = open_run(recipe, "evaltest")
    for stage in ("sft", "dpo"):
        shutil.copytree(students[stage], store.join(stage, "model"))
        store.set_stage_state(stage, StageState(fingerprint=fingerprint(stage, recipe), status="completed",
                                                counts={"output": 1}, seconds=1.0))
    return recipe, store


def live(recipe: Recipe, url: str) -> Recipe:
    """The recipe with its judge at `url` (a built-in teacher is sent there by `serving_at`, keeping its identity)."""
    if recipe.teacher.is_builtin:
        return recipe
    return recipe.model_copy(update={"teacher": recipe.teacher.model_copy(update={"base_url": url})})


def read(store: RunStore, name: str) -> list[dict[str, Any]]:
    return list(store.read_records("evaluate", name))


# -- the toy world ---------------------------------------------------------------------------------
def test_toy_report_matches_ground_truth_and_the_judge_agrees(tmp_path: Path, students: dict[str, Any]) -> None:
    recipe, store = toy_run(tmp_path, students)
    with ToyTeacher(ToyTeacherConfig()) as toy, serving_at(recipe.teacher, toy.base_url):
        result = run_stage("evaluate", live(recipe, toy.base_url), store)
    assert result.status == "completed", result.message
    assert result.counts == {"input": 3 * N_ITEMS, "items": N_ITEMS, "models": 3, "output": 3 * N_ITEMS,
                             "judgments": 3 * N_ITEMS + 2 * N_ITEMS, "failed": 0, "pending": 0}
    ev = json.loads(Path(store.join("evaluate", "report.json")).read_text())["evaluation"]
    assert (ev["eval_set"], ev["items"], ev["baseline"], ev["candidate"]) == ("toy-heldout", N_ITEMS, "sft", "dpo")

    truth = heldout_answers()
    hits = {"sft": truth.count(students["worse"]), "dpo": truth.count(students["best"])}
    for label, k in hits.items():
        p = k / N_ITEMS
        assert ev["models"][label]["accuracy"] == pytest.approx(
            {"mean": p, "stderr": (p * (1 - p) / (N_ITEMS - 1)) ** 0.5, "n": N_ITEMS, "correct": k})

    # single grading: the toy judge rates right answers 8-10 and wrong ones 1-3; no rating is a default
    correct = {(a["item_id"], a["model"]): a["correct"] for a in read(store, "answers")}
    singles = read(store, "single")
    assert len(singles) == 3 * N_ITEMS
    for s in singles:
        assert (8 <= s["rating"] <= 10) if correct[(s["item_id"], s["model"])] else (1 <= s["rating"] <= 3)
    judge = {label: m["judge"]["mean"] for label, m in ev["models"].items()}
    accuracy = {label: m["accuracy"]["mean"] for label, m in ev["models"].items()}
    for a in judge:
        for b in judge:
            if accuracy[a] > accuracy[b]:
                assert judge[a] > judge[b], (a, b, judge, accuracy)
    assert ev["judge_vs_truth"]["agree"] is True

    # pairwise, both orders: dpo and sft are never both right, so win rate = 0.5 + (acc_dpo - acc_sft) / 2
    vs = ev["models"]["dpo"]["vs_baseline"]
    scores = [1.0] * hits["dpo"] + [0.0] * hits["sft"] + [0.5] * (N_ITEMS - hits["dpo"] - hits["sft"])
    assert (vs["wins"], vs["losses"], vs["ties"], vs["n"]) == (hits["dpo"], hits["sft"], len(scores) - sum(
        hits.values()), N_ITEMS)
    assert vs["win_rate"] == pytest.approx(0.5 + (accuracy["dpo"] - accuracy["sft"]) / 2)
    assert vs["stderr"] == pytest.approx(statistics.stdev(scores) / N_ITEMS ** 0.5)
    assert vs["disagreements"] == 0  # the toy judge has no position bias

    report = json.loads(Path(store.join("evaluate", "report.json")).read_text())
    lower = vs["win_rate"] - 2 * vs["stderr"]
    assert report["promotion"]["lower_bound"] == pytest.approx(lower) and report["promotion"]["candidate"] == "dpo"
    assert report["promotion"]["promote"] is (lower > 0.5)
    assert f"accuracy {accuracy['dpo']:.2f} ± {ev['models']['dpo']['accuracy']['stderr']:.2f}" in result.message
    for png in ("scores.png", "win_rate.png", "cost_time.png"):
        assert Path(store.join("evaluate", png)).read_bytes().startswith(b"\x89PNG")
    md = Path(store.join("evaluate", "report.md")).read_text()
    assert "| dpo |" in md
    # written while the stage runs, the cost table shows how it ends, not "running"
    assert "| evaluate | completed |" in md and "| evaluate | running |" not in md


def test_rerun_reuses_answers_and_pays_for_no_judge_call_twice(tmp_path: Path, students: dict[str, Any]) -> None:
    recipe, store = toy_run(tmp_path, students, models=["sft", "dpo"])
    with ToyTeacher(ToyTeacherConfig()) as toy, serving_at(recipe.teacher, toy.base_url):
        first = evaluate.run(live(recipe, toy.base_url), store)
        served = toy.stats()["requests"]
        answers = {p: Path(p).stat().st_mtime_ns for p in store.shard_paths("evaluate", "answers")}
        for path in store.shard_paths("evaluate", "pairwise"):  # as if killed before the verdicts were saved
            Path(path).unlink()
        again = evaluate.run(live(recipe, toy.base_url), store)
        assert toy.stats()["requests"] == served  # every verdict came from the response cache
    assert {p: Path(p).stat().st_mtime_ns for p in store.shard_paths("evaluate", "answers")} == answers
    assert again.counts == first.counts and again.status == "completed"
    assert again.cost["cached"] == N_ITEMS * 2 and again.cost["requests"] == 0


# -- failures: a judge that answers without a usable verdict ---------------------------------------
class ScriptedJudge(LoopbackChat):
    """A loopback judge: no rating / conflicting verdicts for questions holding '+', well-formed otherwise."""

    def __init__(self) -> None:
        self.requests: list[str] = []
        self.bodies: list[dict[str, Any]] = []

        async def chat(request: Request) -> JSONResponse:
            body = await request.json()
            text = "\n".join(m["content"] for m in body["messages"])
            self.requests.append(text)
            self.bodies.append(body)
            question = text.split("## Question", 1)[1]
            question = re.split(r"<answer", question, maxsplit=1)[0]
            malformed = "+" in question
            if "[[rating]]" in text:
                reply = "A fine answer, I would say." if malformed else "Clear enough.\nRating: [[6]]"
            else:
                reply = "[[A]] is better; no, [[B]]." if malformed else "Equally good.\n[[C]]"
            return JSONResponse(completion(reply, body["model"]))

        super().__init__(chat)


def test_malformed_verdicts_are_ledgered_never_scored(tmp_path: Path, students: dict[str, Any]) -> None:
    recipe, store = toy_run(tmp_path, students, teacher={"base_url": "http://unused", "model": "judge"},
                            models=["sft", "dpo"], max_failure_rate=0.0)
    prompts = make_prompts(N_ITEMS, 0, split="heldout")
    bad = {prompt_id(p) for p in prompts if "+" in p}
    assert 0 < len(bad) < N_ITEMS
    with ScriptedJudge() as judge:
        strict = evaluate.run(live(recipe, judge.base_url), store)
        asked = len(judge.requests)
        relaxed = live(recipe.model_copy(update={"evaluate": recipe.evaluate.model_copy(
            update={"max_failure_rate": 0.5})}), judge.base_url)
        result = evaluate.run(relaxed, store)
        bodies = [json.dumps(b, sort_keys=True) for b in judge.bodies]
    # 3 judgments per item (sft and dpo graded, dpo vs sft compared); all 3 of each bad item fail
    assert strict.status == "failed" and "evaluate.max_failure_rate" in strict.message
    assert "rerun to retry them" in strict.message
    assert result.status == "completed" and result.counts["failed"] == 3 * len(bad)
    assert result.counts["judgments"] == 3 * N_ITEMS - 3 * len(bad) and result.counts["pending"] == 0
    # each single grading was asked judge_attempts (2) times, each pairwise order too
    assert asked == 4 * N_ITEMS + 4 * len(bad)
    # the malformed replies were marked unusable: the rerun asked the bad items' judgments again (2 more
    # attempts each), with requests no run had sent before, and paid for each
    assert len(bodies) == asked + 8 * len(bad) and len(set(bodies)) == len(bodies)
    assert result.cost["requests"] == 8 * len(bad) and result.cost["cached"] == 0

    ledger = store.ledger("evaluate").latest()
    singles, pairs = read(store, "single"), read(store, "pairwise")
    assert {s["item_id"] for s in singles} == {p["item_id"] for p in pairs} == {prompt_id(p)
                                                                              for p in prompts} - bad
    reasons = Counter(f.reason.split(":")[0] for f in ledger.values())
    assert reasons == {"single judgment": 2 * len(bad), "pairwise judgment": len(bad)}
    assert all("after 2 attempts" in f.reason for f in ledger.values())
    assert all(f.attempts == 4 for f in ledger.values())  # summed over the two runs
    assert any("no rating" in f.reason for f in ledger.values())
    assert any("conflicting verdicts" in f.reason for f in ledger.values())

    ev = json.loads(Path(store.join("evaluate", "report.json")).read_text())["evaluation"]
    for label in ("sft", "dpo"):
        assert ev["models"][label]["judge"]["mean"] == 6.0  # only the parsed ratings, no default for the rest
        assert (ev["models"][label]["judge"]["n"], ev["models"][label]["judge"]["failed"]) == (
            N_ITEMS - len(bad), len(bad))
    vs = ev["models"]["dpo"]["vs_baseline"]
    assert (vs["n"], vs["ties"], vs["failed"], vs["win_rate"]) == (N_ITEMS - len(bad), N_ITEMS - len(bad),
                                                                   len(bad), 0.5)


def test_a_judge_reask_differs_from_its_first_ask(tmp_path: Path, students: dict[str, Any]) -> None:
    recipe, store = toy_run(tmp_path, students, teacher={"base_url": "http://unused", "model": "judge"},
                            models=["sft", "dpo"], max_failure_rate=1.0)
    with ScriptedJudge() as judge:
        evaluate.run(live(recipe, judge.base_url), store)
    by_question: dict[str, list[dict[str, Any]]] = {}
    for body in judge.bodies:
        if body.get("seed") is None:
            by_question.setdefault(body["messages"][-1]["content"], [])
    reasks = [b for b in judge.bodies if b.get("seed") is not None]
    assert reasks and len(reasks) == len(judge.bodies) - len(by_question)
    for body in reasks:
        text = body["messages"][-1]["content"]
        assert body["temperature"] > 0 and body["seed"] == 2 and body["messages"][-1]["content"] not in by_question
        problem = "no rating" if "[[rating]]" in text else "conflicting verdicts"  # what ScriptedJudge replied
        assert f"Note: your previous reply could not be used ({problem}" in text


def test_structured_verdicts_carry_schemas_and_give_the_text_modes_report(tmp_path: Path,
                                                                          students: dict[str, Any]) -> None:
    reports = {}
    for mode in ("off", "json_schema"):
        recipe, store = toy_run(tmp_path / mode, students, models=["sft", "dpo"], teacher={"structured": mode})
        with ToyTeacher(ToyTeacherConfig()) as toy, serving_at(recipe.teacher, toy.base_url):
            result = evaluate.run(live(recipe, toy.base_url), store)
        assert result.status == "completed", result.message
        reports[mode] = json.loads(Path(store.join("evaluate", "report.json")).read_text())
    judge = reports["json_schema"]["parsing"]["evaluate: judge"]
    assert (judge["used"], judge["calls"], judge["json_ok"], judge["first_attempt_rate"]) == (
        "structured", 4 * N_ITEMS, 4 * N_ITEMS, 1.0)
    assert reports["off"]["parsing"]["evaluate: judge"]["text_ok"] == 4 * N_ITEMS
    # the toy judge draws a grade from 8-10 (right) or 1-3 (wrong): the same sides, the same verdicts
    vs = [reports[m]["evaluation"]["models"]["dpo"]["vs_baseline"] for m in ("off", "json_schema")]
    assert [(v["wins"], v["ties"], v["losses"]) for v in vs] == [(vs[0]["wins"], vs[0]["ties"], vs[0]["losses"])] * 2
    correct = {(a["item_id"], a["model"]): a["correct"] for a in read(store, "answers")}
    for s in read(store, "single"):
        assert json.loads(s["explanation"])["rating"] == s["rating"]
        assert (8 <= s["rating"] <= 10) if correct[(s["item_id"], s["model"])] else (1 <= s["rating"] <= 3)
    md = Path(store.join("evaluate", "report.md")).read_text()
    assert "- evaluate: judge: structured (asked: json_schema): 160 calls, 100.0% usable at the first attempt" in md


# -- evaluation sets from a file: multi-turn items and references ----------------------------------
def test_second_turn_is_judged_with_the_models_first_answer(tmp_path: Path, students: dict[str, Any]) -> None:
    items = tmp_path / "eval.jsonl"
    items.write_text(json.dumps({"id": "m-1", "category": "math", "turns": ["Solve 2x = 14.", "Now 3x = x plus 14."],
                                 "reference": "7"}) + "\n" + json.dumps({"prompt": "Name a colour."}) + "\n")
    recipe, store = toy_run(tmp_path, students, teacher={"base_url": "http://unused", "model": "judge"},
                            models=["dpo"], prompts=str(items))
    with ScriptedJudge() as judge:
        result = evaluate.run(live(recipe, judge.base_url), store)
    assert result.status == "completed", result.message
    answer, baseline = f"The answer is {students['best']}.", f"The answer is {students['worse']}."
    rows = {(r["item_id"], r["model"]): r for r in read(store, "answers")}
    assert rows[("m-1", "dpo")]["answers"] == [answer, answer]
    assert rows[("m-1", "sft")]["answers"] == [baseline, baseline]
    single = [t for t in judge.requests if "[[rating]]" in t]
    turn_two = [t for t in single if "Now 3x = x plus 14." in t.split("## Question")[1]]
    assert len(single) == 2 * 3 and len(turn_two) == 2  # 3 turns, answered by dpo and by the baseline sft

    def shown(request: str) -> tuple[str, str]:
        """(the first answer in the conversation so far, the graded answer) of a turn-two request."""
        first = re.findall(r"Assistant: (.*)", request.split("## Question")[0])
        graded = re.findall(r"<answer>\n(.*)\n</answer>", request)
        assert len(first) == 1 and len(graded) == 1, request
        return first[0], graded[0]

    # each model's second turn is judged after that model's own first answer, not another model's
    assert sorted(shown(t) for t in turn_two) == sorted([(answer, answer), (baseline, baseline)])
    assert all("Reference answer" not in t for t in turn_two)
    assert sum("Reference answer, for the judge only: 7" in t for t in single) == 2
    ev = json.loads(Path(store.join("evaluate", "report.json")).read_text())["evaluation"]
    assert ev["ground_truth"] is False and ev["models"]["dpo"]["accuracy"] is None
    assert ev["models"]["dpo"]["judge"]["by_turn"] == {"1": 6.0, "2": 6.0}


def test_shipped_set_loads_and_bad_files_name_the_line(tmp_path: Path) -> None:
    recipe = recipe_from_dict({"teacher": {"base_url": "http://127.0.0.1:9/v1"},
                               "prompts": {"source": str(_jsonl(tmp_path / "p.jsonl", [{"prompt": "hi"}]))}})
    eval_set = records.load_eval_set(recipe)
    name, items = eval_set.name, eval_set.items
    assert name == "eval_set.jsonl" and len({it.category for it in items}) == 8 and eval_set.checker is None
    assert any(len(it.turns) == 2 for it in items) and any(it.reference for it in items)
    dup = _jsonl(tmp_path / "dup.jsonl", [{"id": "a", "prompt": "x"}, {"id": "a", "prompt": "y"}])
    with pytest.raises(records.EvaluateError, match="line 2: id 'a' appears twice"):
        records.parse_items(str(dup))
    empty_turns = _jsonl(tmp_path / "f.jsonl", [{"turns": []}])
    with pytest.raises(records.EvaluateError, match="f.jsonl line 1: the user turns must be non-empty strings"):
        records.parse_items(str(empty_turns))
    odd = _jsonl(tmp_path / "odd.jsonl", [{"question": "x"}])
    with pytest.raises(records.EvaluateError, match=r"odd.jsonl line 1: expected one of 'turns' \(MT-Bench"):
        records.parse_items(str(odd))


def _jsonl(path: Path, rows: list[dict[str, Any]]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


# -- the promotion gate ----------------------------------------------------------------------------
def _evaluation(win: float | None, n: int = 50, baseline_spec: str = "/series/run-1/dpo/model",
                stderr: float = 0.05) -> dict[str, Any]:
    vs = None if win is None else {"baseline": "run-1/dpo", "win_rate": win, "stderr": stderr, "n": n,
                                   "wins": 20, "ties": 10, "losses": 20}
    return {"candidate": "dpo", "baseline": "run-1/dpo", "baseline_spec": baseline_spec, "promote_min_win_rate": 0.55,
            "models": {"dpo": {"path": "/series/run-2/dpo/model", "vs_baseline": vs}}}


# A point win rate at the threshold can be a tie: the lower bound, win rate - k x standard error, must be above it.
@pytest.mark.parametrize(("win", "stderr", "threshold", "k", "promote"), [
    (0.7, 0.05, 0.5, 2.0, True),    # 0.60 > 0.5
    (0.6, 0.05, 0.5, 2.0, False),   # 0.50 is not above 0.5
    (0.6, 0.05, 0.5, 1.0, True),    # k is configurable
    (0.5, 0.0, 0.5, 2.0, False),    # a tie on every prompt never promotes
    (0.54, 0.0, 0.5, 2.0, True),
    (0.7, 0.05, 0.65, 2.0, False),  # the threshold still applies
])
def test_promotion_needs_the_win_rate_lower_bound_above_the_threshold(win: float, stderr: float, threshold: float,
                                                                      k: float, promote: bool) -> None:
    decision = decide(_evaluation(win, stderr=stderr), threshold, k=k)
    assert decision["promote"] is promote
    assert (decision["win_rate"], decision["min_win_rate"], decision["candidate"]) == (win, threshold, "dpo")
    assert decision["lower_bound"] == pytest.approx(win - k * stderr) and decision["k"] == k
    assert decision["candidate_path"] == "/series/run-2/dpo/model" and "lower bound" in decision["reason"]


def test_a_single_comparison_gives_no_standard_error_and_never_promotes() -> None:
    decision = decide(_evaluation(1.0, n=1, stderr=0.0), 0.5)
    assert decision["promote"] is False and "at least 2" in decision["reason"]


def test_no_promotion_without_a_comparison() -> None:
    assert decide(_evaluation(None), 0.5)["promote"] is False
    assert decide(_evaluation(0.9), 0.5, candidate="sft")["reason"] == "the candidate 'sft' was not evaluated"


def test_promotion_for_run_checks_the_baseline_is_the_current_model(tmp_path: Path) -> None:
    store = RunStore(tmp_path, "run-2")
    assert promotion_for_run(store, None)["promote"] is True  # the first model of a series
    store.write_json(store.join("evaluate", "report.json"), {"evaluation": _evaluation(0.7)})
    assert "evaluate stage of run-2 is pending" in promotion_for_run(store, "/series/run-1/dpo/model")["reason"]
    store.set_stage_state("evaluate", StageState(fingerprint="f", status="completed"))
    ok = promotion_for_run(store, "/series/run-1/dpo/model")
    assert ok["promote"] is True and ok["min_win_rate"] == 0.55  # evaluate.promote_min_win_rate by default
    assert ok["lower_bound"] == pytest.approx(0.7 - 2 * 0.05)
    other = promotion_for_run(store, "/series/run-0/dpo/model")
    assert other["promote"] is False and "not the current model" in other["reason"]
    plain = load_recipe(QUICKSTART)
    recipe = with_current_baseline(plain, "/series/run-1/dpo/model")
    assert recipe.evaluate.baseline == "/series/run-1/dpo/model"
    assert fingerprint("evaluate", recipe) != fingerprint("evaluate", plain)
    assert records.model_label(recipe.evaluate.baseline) == "run-1/dpo"
