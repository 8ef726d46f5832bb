"""The Prefect UI in a real headless browser: the `distill` deployment's custom-run form, filled in and submitted.

Debian's chromium (installed by tests/ui/install_browser.sh) driven by Playwright's Python package; Playwright
never downloads a browser here. The form is drawn by the UI from the `request: DistillRequest` pydantic model.
"""

from __future__ import annotations

import contextlib
import os
import re
import subprocess
import sys
import time
import uuid
from pathlib import Path
from uuid import UUID

import pytest
from prefect_env import ROOT, PrefectEnv, database_url

from pipeline.core.store import RunStore

DISTILL = str(Path(sys.executable).parent / "distill")
CHROMIUM = "/usr/bin/chromium"
INSTALL_SCRIPT = ROOT / "tests" / "ui" / "install_browser.sh"
# The closed network refuses background connections: keep chromium from making any.
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--disable-dev-shm-usage"]
TIMEOUT_MS = 60_000
RUN_TIMEOUT_S = 300


def _ensure_chromium() -> None:
    """Run the (idempotent) install script; skip only when chromium still is not there afterwards."""
    if os.access(CHROMIUM, os.X_OK):
        return
    try:
        res = subprocess.run(["bash", str(INSTALL_SCRIPT)], capture_output=True, text=True, timeout=900)
        detail = (res.stdout + res.stderr)[-1500:]
    except (OSError, subprocess.TimeoutExpired) as exc:
        detail = str(exc)
    if not os.access(CHROMIUM, os.X_OK):
        pytest.skip(f"{CHROMIUM} is missing and tests/ui/install_browser.sh could not install it: {detail}")


@pytest.fixture(scope="module")
def prefect_ui(request, tmp_path_factory):
    """The server, its deployments and both workers, on the database the test names (SQLite or PostgreSQL)."""
    _ensure_chromium()
    env = PrefectEnv(tmp_path_factory.mktemp(f"prefect-ui-{request.param}"), database_url=database_url(request))
    # a "database is locked" 503 would fail the submit (the UI does not retry); log any in server.log
    env.env["PREFECT_API_LOG_RETRYABLE_ERRORS"] = "true"
    env.start_server()
    try:
        res = env.run(DISTILL, "deploy")
        assert res.returncode == 0, res.stderr[-3000:]
        env.start_worker("cpu")
        env.start_worker("gpu")
        yield env
    finally:
        env.stop()


def _prop(page, label: str):
    """The schema-form property whose own label starts with `label` (not the `request` object around it)."""
    return page.locator(
        "xpath=//div[contains(concat(' ', normalize-space(@class), ' '), ' schema-form-property ')]"
        "[./div[contains(@class, 'p-label__header')]//span[contains(@class, 'schema-form-property__label')"
        f" and starts-with(normalize-space(.), '{label}')]]")


def _submit(page, problems: list[str]) -> None:
    """Submit the form once and wait for the deployment page: the server must take the write the first time
    (SQLite under `distill server` queues writers; PostgreSQL has row locks)."""
    submit = page.locator("form button[type=submit]:enabled", has_text="Submit")
    with page.expect_response(lambda r: r.request.method == "POST"
                              and re.search(r"/api/deployments/[0-9a-f-]{36}/create_flow_run$", r.url)) as info:
        submit.click()
    res = info.value
    assert res.ok, f"submit: HTTP {res.status} {res.text()[:300]}; {problems}"
    page.wait_for_url(re.compile(r"/deployments/deployment/[0-9a-f-]{36}(\?|$)"))


def _run_link(page, name: str):
    """The deployment page's link to the new flow run: under "Next Run" while it is scheduled, in the runs list
    once it started. The page fetches both on its own schedule, so a run that leaves Scheduled between the two
    fetches shows in neither until the next one: reload rather than wait for it."""
    from playwright.sync_api import TimeoutError as PlaywrightTimeout
    from playwright.sync_api import expect

    link = page.locator("a[href^='/runs/flow-run/']", has_text=re.compile(f"^\\s*{re.escape(name)}\\s*$")).first
    deadline = time.monotonic() + TIMEOUT_MS / 1000
    while True:
        try:
            expect(link).to_be_visible(timeout=10_000)
            return link
        except AssertionError:
            if time.monotonic() > deadline:
                raise
        try:
            page.reload(wait_until="domcontentloaded")
        except PlaywrightTimeout:
            pass


def _wait_for_final(env: PrefectEnv, flow_run_id: UUID, timeout: float = RUN_TIMEOUT_S):
    from prefect import get_client

    deadline = time.monotonic() + timeout
    with env.client_settings(), get_client(sync_client=True) as client:
        while True:
            run = client.read_flow_run(flow_run_id)
            if run.state and run.state.is_final():
                return run
            if time.monotonic() > deadline:
                raise AssertionError(f"flow run {flow_run_id} not final after {timeout}s: {run.state}\n{env.logs()}")
            time.sleep(1)


@pytest.mark.parametrize("prefect_ui", ["sqlite", "postgres"], indirect=True)
def test_custom_run_form_submits_a_typed_request(prefect_ui, tmp_path):
    from playwright.sync_api import expect, sync_playwright

    expect.set_options(timeout=TIMEOUT_MS)
    name = f"ui-{uuid.uuid4().hex[:8]}"
    runs_root = tmp_path / "runs"
    overrides = [f"storage.root={runs_root}", "prompts.count=20", "generate.max_rounds=1"]
    shot = tmp_path / "custom-run-form.png"
    problems: list[str] = []

    with sync_playwright() as pw:
        browser = pw.chromium.launch_persistent_context(
            str(tmp_path / "chromium-profile"), executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS,
            viewport={"width": 1400, "height": 1800}, timeout=TIMEOUT_MS)
        page = browser.pages[0] if browser.pages else browser.new_page()
        page.set_default_timeout(TIMEOUT_MS)
        try:
            page.on("pageerror", lambda exc: problems.append(f"page error: {exc}"))
            page.on("console", lambda msg: msg.type == "error" and problems.append(f"console: {msg.text}"))
            page.on("requestfailed", lambda req: problems.append(f"failed: {req.method} {req.url} {req.failure}"))
            page.on("response", lambda res: res.status >= 400
                    and problems.append(f"HTTP {res.status}: {res.request.method} {res.url}"))

            # Deployments list -> the `distill` deployment of flow `distill`.
            page.goto(f"{prefect_ui.ui_url}/deployments", wait_until="domcontentloaded")
            row = page.locator("a[href^='/deployments/deployment/']", has_text=re.compile(r"^\s*distill\s*$"))
            expect(row).to_have_count(1)
            row.click()
            page.wait_for_url(re.compile(r"/deployments/deployment/[0-9a-f-]{36}"))
            expect(page.locator("a[href^='/flows/flow/']", has_text="distill").first).to_be_visible()

            # Run -> Custom run: the parameter form.
            page.get_by_role("button", name="Run", exact=True).click()
            page.get_by_text("Custom run", exact=True).click()
            page.wait_for_url(re.compile(r"/deployments/deployment/[0-9a-f-]{36}/run(\?|$)"))

            # The typed fields of DistillRequest, each with its description from the model.
            request = _prop(page, "request")
            expect(request).to_have_count(1)
            for label, description in [("Recipe Path", "Recipe YAML on the worker"),
                                       ("Recipe Yaml", "A whole recipe inline"),
                                       ("Run Name", "Run directory name"),
                                       ("Stages", "Stages to run, in pipeline order"),
                                       ("Overrides", "Recipe overrides KEY.PATH=VALUE"),
                                       ("Series", "Recurring series"),
                                       ("Force", "Redo the chosen stages")]:
                field = _prop(page, label)
                expect(field, f"form field {label}").to_have_count(1)
                expect(field).to_contain_text(description)
            expect(_prop(page, "Recipe Path").locator("textarea, input")).to_have_value("configs/quickstart.yaml")
            stages = _prop(page, "Stages")
            expect(stages.locator(".p-tag")).to_have_text(["generate", "sft", "sample", "feedback", "dpo",
                                                           "evaluate"])
            expect(_prop(page, "Force").get_by_role("switch")).to_have_attribute("aria-checked", "false")

            # A small, fast run: generate only, 20 toy prompts, one round, into tmp_path.
            page.locator(".flow-run-name-input input").fill(name)
            run_name = _prop(page, "Run Name")
            run_name.get_by_role("button", name="str", exact=True).click()
            run_name.locator("input, textarea").fill(name)
            for stage in ("sft", "sample", "feedback", "dpo", "evaluate"):
                stages.locator(".p-tag", has_text=re.compile(f"^\\s*{stage}\\s*$")).locator(".p-tag__dismiss").click()
            expect(stages.locator(".p-tag")).to_have_text(["generate"])
            overrides_field = _prop(page, "Overrides")
            for i, item in enumerate(overrides):
                overrides_field.get_by_role("button", name="Add item").click()
                box = overrides_field.locator("input, textarea").nth(i)
                box.fill(item)
                expect(box).to_have_value(item)
            expect(run_name.locator("input, textarea")).to_have_value(name)

            page.screenshot(path=str(shot), full_page=True)

            # Submit: the UI creates the flow run and goes back to the deployment, which links to the run.
            _submit(page, problems)
            link = _run_link(page, name)
            href = link.get_attribute("href") or ""
            flow_run_id = UUID(re.fullmatch(r"/runs/flow-run/([0-9a-f-]{36})", href).group(1))
            link.click()
            page.wait_for_url(re.compile(f"/runs/flow-run/{flow_run_id}"))
            expect(page.locator("body")).to_contain_text(name)
        except Exception:
            with contextlib.suppress(Exception):
                page.screenshot(path=str(tmp_path / "failure.png"), full_page=True)
            print(f"UI failure at {page.url}; screenshot {tmp_path / 'failure.png'}; {problems}")
            raise
        finally:
            browser.close()

    assert shot.is_file() and shot.stat().st_size > 10_000, shot
    assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    run = _wait_for_final(prefect_ui, flow_run_id)
    assert run.name == name
    assert run.parameters["request"] == {**run.parameters["request"], "run_name": name, "stages": ["generate"],
                                         "overrides": overrides}, run.parameters
    assert run.state.is_completed(), f"{run.state}: {run.state.message}\n{problems}\n{prefect_ui.logs()}"

    store = RunStore.open_existing(str(runs_root / name))
    assert store.stage_state("generate").status == "completed"
    records = list(store.read_records("generate"))
    assert 0 < len(records) <= 20
    assert not store.shard_paths("sft")


@pytest.mark.parametrize("prefect_ui", ["sqlite"], indirect=True)
def test_the_run_summary_shows_the_report_plots_in_the_ui(prefect_ui, tmp_path):
    """The summary artifact embeds report.md; its plots are data: URIs, which the UI draws (a link to a PNG
    next to the report, as report.md has it, has nothing to point at in the UI)."""
    from playwright.sync_api import expect, sync_playwright
    from prefect import flow, get_client
    from test_report import finished_run

    from pipeline.flows.artifacts import publish_run_summary
    from pipeline.stages.evaluate.report import write_report

    store = finished_run(tmp_path / "runs")
    plots = write_report(store)["plots"]
    assert len(plots) >= 5

    @flow(name="publish-summary")
    def publish() -> None:
        publish_run_summary(store)

    with prefect_ui.client_settings():
        publish()
        with get_client(sync_client=True) as client:
            artifact = next(a for a in client.read_artifacts() if a.key == "done-summary")
    shot = tmp_path / "summary-artifact.png"
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS)
        page = browser.new_page(viewport={"width": 1400, "height": 1800})
        page.set_default_timeout(TIMEOUT_MS)
        try:
            page.goto(f"{prefect_ui.ui_url}/artifacts/artifact/{artifact.id}", wait_until="domcontentloaded")
            images = page.locator("img[src^='data:image/png;base64,']")
            expect(images).to_have_count(len(plots), timeout=TIMEOUT_MS)
            page.wait_for_function("Array.from(document.images).every(i => i.complete)")
            drawn = page.evaluate("Array.from(document.images).filter(i => i.src.startsWith('data:image/png'))"
                                  ".map(i => [i.alt, i.naturalWidth, i.naturalHeight])")
            expect(page.locator("body")).to_contain_text("Cost and time per stage")
            page.screenshot(path=str(shot), full_page=True)
        finally:
            browser.close()
    assert sorted(alt for alt, _, _ in drawn) == sorted(plots)
    assert all(w > 100 and h > 100 for _, w, h in drawn), drawn
