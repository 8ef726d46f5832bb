"""On-policy rounds in the Prefect UI, in a real browser: the run's graph draws one group per round (a subflow
run named `round r`, holding that round's four stage tasks), and the rounds artifact shows the per-round table."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
from prefect_env import ROOT, PrefectEnv
from test_rounds import TINY
from test_ui_any_port import VIEW_AT, node_labels, see_run_graph
from test_ui_browser import CHROMIUM, CHROMIUM_ARGS, TIMEOUT_MS, _ensure_chromium

from pipeline.flows.artifacts import artifact_key

ROUNDS = str(ROOT / "configs" / "quickstart-rounds.yaml")


def subflow_tasks(env: PrefectEnv, flow_run_id: str) -> dict[str, list[str]]:
    """Each subflow run of the flow run (by name) with the names of its task runs."""
    from prefect import get_client
    from prefect.client.schemas.filters import (
        FlowRunFilter,
        FlowRunFilterParentFlowRunId,
        TaskRunFilter,
        TaskRunFilterFlowRunId,
    )

    with env.client_settings(), get_client(sync_client=True) as client:
        children = client.read_flow_runs(flow_run_filter=FlowRunFilter(
            parent_flow_run_id=FlowRunFilterParentFlowRunId(any_=[flow_run_id])))
        return {child.name: sorted(t.name for t in client.read_task_runs(task_run_filter=TaskRunFilter(
            flow_run_id=TaskRunFilterFlowRunId(any_=[child.id])))) for child in children}


def artifact_id(env: PrefectEnv, key: str) -> str:
    from prefect import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey

    with env.client_settings(), get_client(sync_client=True) as client:
        [artifact] = client.read_artifacts(artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=[key])))
        return str(artifact.id)


def artifact_page_text(url: str) -> str:
    from playwright.sync_api import expect, sync_playwright

    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS)
        page = browser.new_page(viewport={"width": 1400, "height": 1000})
        page.set_default_timeout(TIMEOUT_MS)
        try:
            page.goto(url, wait_until="domcontentloaded")
            expect(page.locator("body")).to_contain_text("On-policy rounds", timeout=TIMEOUT_MS)
            return page.locator("body").inner_text()
        finally:
            browser.close()


@pytest.mark.slow
def test_the_run_graph_draws_a_group_per_round_and_the_artifact_shows_the_rounds_table(tmp_path: Path) -> None:
    _ensure_chromium()
    env = PrefectEnv(tmp_path / "prefect")
    env.start_server()
    try:
        res = env.run(sys.executable, "-m", "pipeline.cli", "run", ROUNDS, "--run-name", "ui-rounds",
                      *[f"--set={s}" for s in [*TINY, f"storage.root={tmp_path / 'runs'}"]], timeout=1200)
        out = res.stdout + res.stderr
        assert res.returncode == 0, out[-3000:]
        link, flow_run_id = VIEW_AT.search(out).groups()
        graph = see_run_graph(link, flow_run_id, tmp_path / "rounds-graph.png")
        groups = subflow_tasks(env, flow_run_id)
        summary = artifact_id(env, artifact_key("ui-rounds", "rounds-summary"))
        text = artifact_page_text(f"{env.ui_url}/artifacts/artifact/{summary}")
    finally:
        env.stop()
    assert node_labels(graph) == ["generate", "sft", "round / round 1", "round / round 2"], graph
    assert groups == {"round 1": ["dpo", "evaluate", "feedback", "sample"],
                      "round 2": ["dpo@2", "evaluate@2", "feedback@2", "sample@2"]}
    assert "| round |" not in text and "accuracy" in text and "kept" in text  # drawn as a table, not as source
