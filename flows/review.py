"""Review before DPO in the Prefect UI (feedback.review): the flow run pauses with a form of the drawn pairs;
the answers are recorded in the run store through pipeline.review, so a rerun never asks twice."""

from __future__ import annotations

import time
from typing import Any, Literal
from uuid import UUID

import pydantic
from prefect import get_client, get_run_logger
from prefect.context import FlowRunContext
from prefect.exceptions import FlowPauseTimeout, ObjectNotFound
from prefect.flow_runs import pause_flow_run
from prefect.input import RunInput
from prefect.states import Cancelled, Running
from prefect.utilities.urls import url_for

from pipeline.core.recipe import Recipe, ReviewConfig
from pipeline.core.rounds import round_store, split_key
from pipeline.core.store import RunStore
from pipeline.flows.artifacts import publish_review
from pipeline.review.answers import ReviewTimedOut, read_review, record_timeout, review_path
from pipeline.review.gate import record_answers, review_command, reviewed_rounds
from pipeline.review.report import status_line, write_report
from pipeline.review.sample import ReviewItem, draw_review

CHOICES = {"A is better": "A", "B is better": "B", "drop": "drop"}
Choice = Literal["A is better", "B is better", "drop"]


def pair_markdown(item: ReviewItem) -> str:
    """The pair as its form field describes it: the prompt, then answer A (left) and answer B (right), as
    markdown, the way chat answers are written (the UI's renderer runs a blockquote on to the end)."""
    return f"**Prompt:** {item.prompt}\n\n**Answer A:** {item.a}\n\n**Answer B:** {item.b}"


def review_form(items: list[ReviewItem], view: RunStore, total: int) -> type[RunInput]:
    """A RunInput with a choice and a note per pair, which the UI draws as the Resume form."""
    fields: dict[str, Any] = {}
    for item in items:
        fields[f"pair_{item.number}"] = (Choice, pydantic.Field(title=f"Pair {item.number}",
                                                                description=pair_markdown(item)))
        fields[f"note_{item.number}"] = (str, pydantic.Field("", title=f"Note on pair {item.number}"))
    model = pydantic.create_model("PairReview", __base__=RunInput, **fields)
    intro = (f"## Review of round {view.round}'s pairs before DPO trains on them\n\n"
             f"{len(items)} of {total} preference pairs of run `{view.run_name}`, drawn at random. For each pair "
             "pick the better answer, or **drop** a pair that should not train at all; a note is optional. "
             "The judge's scores stay hidden until you submit; the review report shows them.")
    return model.with_initial_data(description=intro)


def review_before_dpo(key: str, recipe: Recipe, store: RunStore) -> None:
    """Before dpo (`key`: `dpo`, `dpo@2`): pause for the review of each round it trains on that has none yet."""
    cfg = recipe.feedback.review
    if cfg is None:
        return
    for q in reviewed_rounds(recipe, split_key(key)[1]):
        view = round_store(store, q)
        # recorded, or not reviewable yet (run_stage then says which input is missing)
        if read_review(view) is None and view.stage_state("feedback").status == "completed":
            ask(view, cfg)


def ask(view: RunStore, cfg: ReviewConfig) -> None:
    """Pause this flow run with the form until a person submits it (or timeout_s), then record the answers."""
    items, total = draw_review(view, cfg)
    flow_run_id = FlowRunContext.get().flow_run.id
    answers = wait_for_answers(view, cfg, items, total, flow_run_id) if items else {}
    if answers is None:  # nobody answered in time and the run goes on with the judge's pairs (recorded)
        return
    report = record_answers(view, items, answers, f"Prefect flow run {flow_run_id}", total, "the Prefect form")
    if view.fs.exists(review_path(view, "waiting.json")):
        view.fs.rm(review_path(view, "waiting.json"))
    publish_review(view, report)
    get_run_logger().info("%s", status_line(view))


def wait_for_answers(view: RunStore, cfg: ReviewConfig, items: list[ReviewItem], total: int,
                     flow_run_id: UUID) -> dict[int, tuple[str, str]] | None:
    """{pair number: (A | B | drop, note)} from the submitted form; None when nobody answered in time."""
    supersede(view, flow_run_id)
    where = url_for("flow-run", obj_id=flow_run_id) or f"flow run {flow_run_id} in the Prefect UI"
    get_run_logger().info("review: %d pairs of round %d wait for a person: open %s and press Resume (or stop the "
                          "run and answer in a file: %s)", len(items), view.round, where, review_command(view))
    try:
        answer = pause_flow_run(wait_for_input=review_form(items, view, total), timeout=cfg.timeout_s,
                                poll_interval=min(10, cfg.timeout_s), key=f"review-{view.round}")
    except FlowPauseTimeout:
        timed_out(view, cfg, items, total, flow_run_id)
        return None
    return {i.number: (CHOICES[getattr(answer, f"pair_{i.number}")], getattr(answer, f"note_{i.number}"))
            for i in items}


def supersede(view: RunStore, flow_run_id: UUID) -> None:
    """Note this flow run as the one waiting; cancel an earlier one still paused on the same review (its process
    was killed), so nobody answers a form that nothing reads."""
    path = review_path(view, "waiting.json")
    earlier = (view.read_json(path) or {}).get("flow_run_id")
    if earlier and earlier != str(flow_run_id):
        with get_client(sync_client=True) as client:
            try:
                run = client.read_flow_run(UUID(earlier))
            except ObjectNotFound:  # another server's run: nothing to cancel here
                run = None
            if run is not None and run.state is not None and run.state.is_paused():
                client.set_flow_run_state(run.id, Cancelled(message=f"superseded by flow run {flow_run_id}, "
                                                                    "which asks for the same review"), force=True)
    view.write_json(path, {"flow_run_id": str(flow_run_id), "since": time.time()})


def timed_out(view: RunStore, cfg: ReviewConfig, items: list[ReviewItem], total: int, flow_run_id: UUID) -> None:
    """Nobody answered in time: fail the run (on_timeout: fail), or record that and go on with the judge's pairs."""
    if cfg.on_timeout == "fail":
        raise ReviewTimedOut(f"nobody answered the review of round {view.round}'s {len(items)} pairs within "
                             f"feedback.review.timeout_s={cfg.timeout_s}: run the same command again to ask again "
                             f"(finished stages are kept), or answer in a file with `{review_command(view)}`")
    with get_client(sync_client=True) as client:  # the run is still Paused on the server: it goes on now
        client.set_flow_run_state(flow_run_id, Running(), force=True)
    review = record_timeout(view, items, f"Prefect flow run {flow_run_id}", total, cfg.timeout_s)
    publish_review(view, write_report(view, review))
    get_run_logger().warning("%s", status_line(view))
