"""Review before DPO under Prefect, on a real server. In a real browser: a tiny toy run with `feedback.review:
{sample: 8}` pauses after feedback; killed while it waits and run again, it waits for the same pairs having paid
for nothing twice; the Resume form in the Prefect UI (the suite's Chromium, driven by Playwright) gets two swaps
and a drop; dpo trains on the pairs so changed and the review reports agreement 5/7; one more run asks nothing
and trains nothing. And the pause's timeout: the run fails, or goes on with the judge's pairs."""

from __future__ import annotations

import contextlib
import json
import math
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from uuid import UUID

import pytest
import yaml
from click.testing import CliRunner
from prefect import flow
from prefect_env import ROOT, PrefectEnv
from test_review import reviewed_run
from test_ui_browser import CHROMIUM, CHROMIUM_ARGS, TIMEOUT_MS, _ensure_chromium

from pipeline.cli import main
from pipeline.core.recipe import Recipe
from pipeline.core.store import RunStore
from pipeline.flows.review import review_before_dpo
from pipeline.review.answers import read_review
from pipeline.review.sample import draw
from pipeline.stages.dpo.stage import round_pairs
from pipeline.tasks.toy.teacher_server import ToyTeacher, ToyTeacherConfig

DISTILL = str(Path(sys.executable).parent / "distill")
TINY = ["prompts.count=24", "generate.max_rounds=1", "sft.args.num_train_epochs=3", "dpo.args.num_train_epochs=2",
        "dpo.args.per_device_train_batch_size=4", "evaluate.heldout_count=12", "feedback.review.sample=8"]
RUN = "rv"
FLIP = {"A": "B", "B": "A"}
LABEL = {"A": "A is better", "B": "B is better", "drop": "drop"}


def start_run(env: PrefectEnv, toy: ToyTeacher, runs: Path, log: Path, *more: str) -> subprocess.Popen:
    """`distill run` as a person starts it, its flow run on the test's Prefect server (`--no-prefect` in `more`:
    none)."""
    sets = [*TINY, f"storage.root={runs}", f"teacher.base_url={toy.base_url}"]
    cmd = [DISTILL, "run", str(ROOT / "configs" / "quickstart.yaml"), "--run-name", RUN, *more,
           *[f"--set={s}" for s in sets]]
    return subprocess.Popen(cmd, cwd=ROOT, env=env.env, stdout=log.open("ab"), stderr=subprocess.STDOUT)


def paused_run(env: PrefectEnv, proc: subprocess.Popen, log: Path, other_than: UUID | None = None,
               timeout: float = 1200):
    """The flow run that waits for the review (found on the server), once it is paused; `other_than`: a killed
    run's, which shows paused until the rerun cancels it."""
    from prefect import get_client

    deadline = time.monotonic() + timeout
    with env.client_settings(), get_client(sync_client=True) as client:
        while time.monotonic() < deadline:
            paused = [r for r in client.read_flow_runs()
                      if r.state and r.state.is_paused() and r.id != other_than]
            if paused:
                return paused[0]
            assert proc.poll() is None, f"distill run exited {proc.returncode}:\n{log.read_text()[-4000:]}"
            time.sleep(2)
    pytest.fail(f"no flow run paused within {timeout}s:\n{log.read_text()[-4000:]}")


def form_of(env: PrefectEnv, flow_run) -> dict:
    """The form the paused run shows: its schema (each pair's field describes its prompt and answers)."""
    from prefect.input.actions import read_flow_run_input

    with env.client_settings():
        keys = flow_run.state.state_details.run_input_keyset
        return {"schema": read_flow_run_input(keys["schema"], flow_run_id=flow_run.id),
                "description": read_flow_run_input(keys["description"], flow_run_id=flow_run.id)}


def answer_in_browser(env: PrefectEnv, flow_run_id: UUID, plan: dict[int, str], note: str, shot: Path) -> int:
    """Open the paused run, press Resume, pick `plan`'s answer for each pair, note the dropped one, submit; the
    number of pair choices the form showed."""
    from playwright.sync_api import expect, sync_playwright

    expect.set_options(timeout=TIMEOUT_MS)
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS)
        page = browser.new_page(viewport={"width": 1400, "height": 2400})
        page.set_default_timeout(TIMEOUT_MS)
        try:
            page.goto(f"{env.ui_url}/runs/flow-run/{flow_run_id}", wait_until="domcontentloaded")
            page.get_by_role("button", name="Resume").first.click()
            modal = page.locator(".p-modal")
            expect(modal).to_contain_text("Review of round 1's pairs before DPO trains on them")
            choices = modal.locator(".schema-form-property").filter(has=page.locator(".p-select"))
            expect(choices).to_have_count(len(plan))
            shown = choices.count()
            assert not [t for t in choices.all_inner_texts() if "score" in t.lower()]  # the judge's stay hidden
            for number, answer in plan.items():
                field = _field(page, modal, f"Pair {number}")
                expect(field).to_contain_text("Answer A:")
                field.locator(".p-select-button__control").focus()
                page.keyboard.press(" ")  # opens the choice list (a click toggles it shut again here)
                page.locator(".p-select-options[role=listbox] .p-select-option",
                             has_text=re.compile(f"^\\s*{LABEL[answer]}\\s*$")).click()
                expect(field.locator(".p-select-button__value")).to_have_text(LABEL[answer])
                if answer == "drop":
                    _field(page, modal, f"Note on pair {number}").locator("input, textarea").fill(note)
            page.screenshot(path=str(shot), full_page=True)
            modal.get_by_role("button", name="Submit").click()
            expect(modal).to_have_count(0)
        except Exception:
            with contextlib.suppress(Exception):
                page.screenshot(path=str(shot.with_name("failure.png")), full_page=True)
            raise
        finally:
            browser.close()
    return shown


def _field(page, modal, label: str):
    return modal.locator(".schema-form-property").filter(
        has=page.locator(".schema-form-property__label", has_text=re.compile(f"^\\s*{label}\\s*(\\(Optional\\))?$")))


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory):
    env = PrefectEnv(tmp_path_factory.mktemp("review-prefect"))
    env.start_server()
    try:
        yield env
    finally:
        env.stop()


@flow(name="review-in-a-round")
def round_like(recipe: dict, run_dir: str) -> None:
    """What the `round r` subflow does before its dpo, as a subflow of its own."""
    review_before_dpo("dpo", Recipe.model_validate(recipe), RunStore.open_existing(run_dir))


@flow(name="review-parent")
def parent(recipe: dict, run_dir: str) -> None:
    round_like(recipe, run_dir)


def test_nobody_answering_fails_the_run_or_goes_on_with_the_judges_pairs(server, tmp_path: Path) -> None:
    from prefect import get_client

    recipe, store = reviewed_run(tmp_path, "feedback.review.timeout_s=2")
    with server.client_settings():
        state = parent(recipe.snapshot(), store.url, return_state=True)
    assert state.is_failed() and read_review(store) is None
    with pytest.raises(Exception, match=r"nobody answered the review of round 1's 8 pairs within "
                                        r"feedback.review.timeout_s=2: run the same command again"):
        state.result()
    recipe, store = reviewed_run(tmp_path / "continue", "feedback.review.timeout_s=2",
                                 "feedback.review.on_timeout=continue")
    with server.client_settings():
        state = parent(recipe.snapshot(), store.url, return_state=True)
        assert state.is_completed(), state
        with get_client(sync_client=True) as client:
            child = next(r for r in client.read_flow_runs() if r.name and r.parent_task_run_id
                         and r.parameters.get("run_dir") == store.url)
            history = [s.type.value for s in client.read_flow_run_states(child.id)]
    assert "PAUSED" in history and history[-1] == "COMPLETED"  # the subflow paused, then went on
    review = read_review(store)
    assert review["status"] == "timed_out" and len(review["items"]) == 8
    total, keyed, failures, verdicts = round_pairs(recipe, store, 1)
    assert (total, len(keyed), failures, verdicts) == (12, 12, {}, {})  # the judge's pairs as they are
    assert "nobody answered 8 pairs in time" in CliRunner().invoke(main, ["status", store.url]).output


@pytest.fixture(scope="module")
def reviewed(server, tmp_path_factory: pytest.TempPathFactory):
    """The run, killed while it waits, run again, answered in the browser, and run once more."""
    _ensure_chromium()
    tmp = tmp_path_factory.mktemp("review-browser")
    env, runs, log = server, tmp / "runs", tmp / "distill.log"
    with ToyTeacher(ToyTeacherConfig(error_rate=0.3, disclaimer_rate=0.05, drift_rate=0.05)) as toy:
        out = {"tmp": tmp, "env": env, "runs": runs}
        first = start_run(env, toy, runs, log)
        out["first_pause"] = paused_run(env, first, log)
        out["paid_at_first_pause"] = toy.stats()
        first.send_signal(signal.SIGKILL)  # killed while it waits for a person
        first.wait(timeout=30)
        second = start_run(env, toy, runs, log)
        out["second_pause"] = paused = paused_run(env, second, log, other_than=out["first_pause"].id)
        out["paid_at_second_pause"] = toy.stats()
        out["forms"] = [form_of(env, out["first_pause"]), form_of(env, paused)]
        store = RunStore.open_existing(str(runs / RUN))
        items = draw(list(store.read_records("feedback", "pairs")), 8, 0)
        # pairs 1 and 2: the other side than the judge's; pair 3 dropped; the rest as the judge chose
        out["plan"] = plan = {i.number: FLIP[i.judge_pick] if i.number <= 2 else "drop" if i.number == 3
                              else i.judge_pick for i in items}
        out["items"] = items
        out["shown"] = answer_in_browser(env, paused.id, plan, "both answers are wrong", tmp / "review-form.png")
        assert second.wait(timeout=1200) == 0, log.read_text()[-4000:]
        out["paid_after_run"] = toy.stats()
        log.write_text("")
        again = start_run(env, toy, runs, log)
        assert again.wait(timeout=600) == 0, log.read_text()[-4000:]
        out["again_log"] = log.read_text()
        out["paid_after_again"] = toy.stats()
        shutil.copytree(runs / RUN, tmp / "answered" / RUN)  # the run as the browser's answers left it
        out["changed"] = change_the_review_in_a_file(env, toy, runs, log, store)
    return out


def change_the_review_in_a_file(env: PrefectEnv, toy: ToyTeacher, runs: Path, log: Path,
                                store: RunStore) -> dict:
    """`distill review` writes the form prefilled with the UI's answers; pair 4 becomes a drop; recorded, and a run
    without Prefect follows."""
    wrote = CliRunner().invoke(main, ["review", store.url])
    form = Path(store.join("feedback", "review", "form.yaml"))
    data = yaml.safe_load(form.read_text())
    prefilled = {e["pair"]: e["answer"] for e in data["pairs"]}
    data["pairs"][3].update(answer="drop", note="garbled")
    form.write_text(yaml.safe_dump(data, sort_keys=False))
    recorded = CliRunner().invoke(main, ["review", store.url])
    log.write_text("")
    code = start_run(env, toy, runs, log, "--no-prefect").wait(timeout=900)
    return {"wrote": wrote.output, "prefilled": prefilled, "recorded": recorded.output, "code": code,
            "log": log.read_text()}


@pytest.mark.slow
def test_a_run_killed_while_it_waits_waits_again_for_the_same_pairs_paying_nothing_twice(reviewed) -> None:
    first, second = reviewed["forms"]
    assert first == second and first["schema"]["required"] == [f"pair_{n}" for n in range(1, 9)]
    assert reviewed["paid_at_first_pause"]["requests"] > 0
    assert reviewed["paid_at_second_pause"]["requests"] == reviewed["paid_at_first_pause"]["requests"]
    from prefect import get_client

    with reviewed["env"].client_settings(), get_client(sync_client=True) as client:
        killed = client.read_flow_run(reviewed["first_pause"].id)
    assert killed.state.is_cancelled() and "superseded by flow run" in killed.state.message
    # every request of the whole run was answered once: nothing before the pause was asked again
    assert [k for k, n in reviewed["paid_after_run"]["ok_keys"].items() if n > 1] == []


@pytest.mark.slow
def test_the_form_shows_eight_pairs_and_dpo_trains_on_the_two_swapped_without_the_dropped(reviewed) -> None:
    assert reviewed["shown"] == 8
    store = RunStore.open_existing(str(reviewed["tmp"] / "answered" / RUN))
    pairs = {p["pair_id"]: p for p in store.read_records("feedback", "pairs")}
    verdict = {i.pair_id: ("drop" if reviewed["plan"][i.number] == "drop" else
                           "agree" if reviewed["plan"][i.number] == i.judge_pick else "swap")
               for i in reviewed["items"]}
    assert sorted(verdict.values()) == ["agree"] * 5 + ["drop", "swap", "swap"]
    trained = [json.loads(line) for line in Path(store.join("dpo", "train_pairs.jsonl")).read_text().splitlines()]
    by_id = {t["pair_id"]: t for t in trained}
    [dropped] = [pid for pid, v in verdict.items() if v == "drop"]
    assert len(trained) == len(pairs) - 1 and dropped not in by_id
    for pid, pair in pairs.items():
        if pid == dropped:
            continue
        flip = verdict.get(pid) == "swap"
        assert by_id[pid]["chosen"] == (pair["rejected"] if flip else pair["chosen"])[-1:], pid
        assert by_id[pid]["rejected"] == (pair["chosen"] if flip else pair["rejected"])[-1:], pid
        assert by_id[pid]["review"] == verdict.get(pid)
    failures = [json.loads(line) for line in Path(store.join("dpo", "failures.jsonl")).read_text().splitlines()]
    assert any(f["item_id"] == dropped and "dropped in review" in f["reason"] and "both answers are wrong"
               in f["reason"] for f in failures), failures
    state = store.stage_state("dpo")
    assert state.status == "completed" and state.counts["swapped"] == 2 and state.counts["dropped_in_review"] == 1
    metrics = json.loads(Path(store.join("dpo", "metrics.json")).read_text())
    assert metrics["pairs"] == len(pairs) - 1


@pytest.mark.slow
def test_the_review_reports_agreement_five_of_seven_in_a_file_an_artifact_and_status(reviewed) -> None:
    store = RunStore.open_existing(str(reviewed["tmp"] / "answered" / RUN))
    report = json.loads(Path(store.join("feedback", "review", "report.json")).read_text())
    assert report["agreement"] == {"k": 5, "n": 7, "share": round(5 / 7, 4),
                                   "stderr": round(math.sqrt(5 / 7 * 2 / 7 / 7), 4)}
    assert report["by"] == f"Prefect flow run {reviewed['second_pause'].id}"
    assert set(report["agreement_by_source"]) <= {"pool", "correction"} and report["length"]["judge_picks_longer"]
    from prefect import get_client

    with reviewed["env"].client_settings(), get_client(sync_client=True) as client:
        artifact = next(a for a in client.read_artifacts() if a.key == f"{RUN}-review-round-1")
    assert "5/7 = 0.71 ± 0.17" in artifact.data and "both answers are wrong" in artifact.data
    status = CliRunner().invoke(main, ["status", store.url])
    assert "review (round 1): 8 pairs, judge–person agreement 5/7 = 0.71 ± 0.17, 2 swapped, 1 dropped" \
        in status.output


@pytest.mark.slow
def test_a_run_with_the_review_recorded_asks_nothing_and_trains_nothing(reviewed) -> None:
    log = reviewed["again_log"]
    assert "Pausing flow" not in log and "dpo: skipped: already completed" in log
    assert reviewed["paid_after_again"]["requests"] == reviewed["paid_after_run"]["requests"]


@pytest.mark.slow
def test_a_different_review_in_the_file_form_retrains_dpo_without_prefect(reviewed) -> None:
    changed = reviewed["changed"]
    assert "wrote the review form" in changed["wrote"] and changed["prefilled"] == reviewed["plan"]
    assert "judge–person agreement 4/6 = 0.67 ± 0.19, 2 swapped, 2 dropped" in changed["recorded"]
    assert changed["code"] == 0, changed["log"][-3000:]
    assert "dpo: skipped" not in changed["log"] and "evaluate: skipped" not in changed["log"]
    store = RunStore.open_existing(str(reviewed["runs"] / RUN))
    trained = {json.loads(line)["pair_id"] for line in
               Path(store.join("dpo", "train_pairs.jsonl")).read_text().splitlines()}
    gone = {i.pair_id for i in reviewed["items"] if i.number in (3, 4)}
    assert not trained & gone and len(trained) == len(list(store.read_records("feedback", "pairs"))) - 2
