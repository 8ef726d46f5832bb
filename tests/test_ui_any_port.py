"""The Prefect UI works wherever `distill` serves it: a real browser opens the "View at" link that `distill run`
prints, from a `distill server` on a port other than 4200 and from the temporary server of a run without
PREFECT_API_URL, and sees the flow run's graph; the run's output ends with its status table, no error after it.
"""

from __future__ import annotations

import asyncio
import io
import os
import re
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import httpx
import pytest
from loopback import LoopbackChat
from prefect_env import ROOT, PrefectEnv
from starlette.responses import JSONResponse
from test_ui_browser import CHROMIUM, CHROMIUM_ARGS, TIMEOUT_MS, _ensure_chromium

from pipeline.tasks.toy.teacher_server import ToyTeacher

DISTILL = [sys.executable, "-m", "pipeline.cli"]
QUICKSTART = str(ROOT / "configs" / "quickstart.yaml")
VIEW_AT = re.compile(r"View at (http://\S+/runs/flow-run/([0-9a-f-]{36}))")


def small_run(root: Path, *extra: str) -> list[str]:
    """`distill run` of generate alone on 8 toy prompts, one round each."""
    return [*DISTILL, "run", QUICKSTART, "--stages", "generate", "--run-name", "ui", "--set", f"storage.root={root}",
            "--set", "prompts.count=8", "--set", "generate.max_rounds=1", *extra]


def see_run_graph(link: str, flow_run_id: str, shot: Path) -> dict[str, Any]:
    """Open `link` in chromium; return the graph the page fetched, once its canvas has drawn the stage's node."""
    from playwright.sync_api import Error as PlaywrightError
    from playwright.sync_api import expect, sync_playwright

    failed: list[str] = []
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS)
        page = browser.new_page(viewport={"width": 1400, "height": 1000})
        page.set_default_timeout(TIMEOUT_MS)
        page.on("requestfailed", lambda req: failed.append(f"{req.method} {req.url}: {req.failure}"))
        try:
            with page.expect_response(lambda r: r.url.endswith(f"/flow_runs/{flow_run_id}/graph-v2")) as info:
                page.goto(link, wait_until="domcontentloaded")
            assert info.value.ok, f"graph: HTTP {info.value.status} from {info.value.url}"
            graph = info.value.json()
            canvas = page.locator(".flow-run-graph canvas")
            expect(canvas).to_be_visible()
            deadline = time.monotonic() + TIMEOUT_MS / 1000
            while state_pixels(canvas) < 100:
                assert time.monotonic() < deadline, "the graph's canvas shows no node"
                time.sleep(0.5)
            expect(page.locator("body")).not_to_contain_text("Can't connect to Server API")
            page.screenshot(path=str(shot))
        except PlaywrightError as exc:
            page.screenshot(path=str(shot))
            raise AssertionError(f"{link}: {exc.message.splitlines()[0]}; failed requests: {failed[:5]}") from None
        finally:
            browser.close()
    return graph


def state_pixels(canvas: Any) -> int:
    """Pixels of a state's colour (saturated: the graph's background, grid and labels are grey) above the state
    bar along the canvas' bottom edge: the run's nodes, drawn once the page reached the API. A screenshot, as
    the graph is drawn with WebGL, whose buffer a script cannot read back."""
    import numpy as np
    from PIL import Image

    pixels = np.asarray(Image.open(io.BytesIO(canvas.screenshot())).convert("RGB"), dtype=np.int16)[:-60]
    return int(((pixels.max(axis=2) - pixels.min(axis=2)) > 60).sum())


def node_labels(graph: dict[str, Any]) -> list[str]:
    return [node["label"] for _, node in graph["nodes"]]


@pytest.mark.slow
def test_the_link_a_run_prints_opens_its_graph_from_distill_server_on_another_port(tmp_path: Path) -> None:
    _ensure_chromium()
    env = PrefectEnv(tmp_path / "prefect")
    assert env.port != 4200
    api_url = env.env.pop("PREFECT_API_URL")  # started as from a new shell: nothing but its flags says its URL
    env.start_server()
    env.env["PREFECT_API_URL"] = api_url
    try:
        res = env.run(*small_run(tmp_path / "runs"))
        out = res.stdout + res.stderr
        assert res.returncode == 0, out[-3000:]
        link, flow_run_id = VIEW_AT.search(out).groups()
        assert link.startswith(f"{env.ui_url}/runs/flow-run/"), link
        graph = see_run_graph(link, flow_run_id, tmp_path / "run-page.png")
    finally:
        env.stop()
    assert node_labels(graph) == ["generate"], graph


class GatedTeacher(LoopbackChat):
    """The toy teacher behind a gate: requests wait until `open()`, so the run (and its temporary server) lasts
    until the browser has looked."""

    def __init__(self, teacher: ToyTeacher) -> None:
        self.gate = threading.Event()

        async def handler(request):
            await asyncio.to_thread(self.gate.wait)
            async with httpx.AsyncClient(timeout=60) as client:
                answer = await client.post(f"{teacher.base_url}/chat/completions", content=await request.body(),
                                           headers={"content-type": "application/json"})
            return JSONResponse(answer.json(), status_code=answer.status_code)

        super().__init__(handler)

    def open(self) -> None:
        self.gate.set()


def follow(proc: subprocess.Popen, lines: list[str], pattern: re.Pattern[str]) -> threading.Event:
    """Read the process' output into `lines`; the event is set at the first line matching `pattern`."""
    seen = threading.Event()

    def read() -> None:
        for line in io.TextIOWrapper(proc.stdout, errors="replace"):
            lines.append(line)
            if pattern.search(line):
                seen.set()
        seen.set()  # the output ended: do not wait for a link that will not come

    threading.Thread(target=read, daemon=True).start()
    return seen


@pytest.mark.slow
def test_a_run_without_prefect_api_url_links_its_temporary_server_and_ends_with_its_status(tmp_path: Path) -> None:
    _ensure_chromium()
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    env.update(PREFECT_HOME=str(tmp_path / "prefect"), PYTHONPATH=str(ROOT), HF_HUB_OFFLINE="1")
    runs = tmp_path / "runs"
    lines: list[str] = []
    with ToyTeacher() as toy, GatedTeacher(toy) as teacher:
        proc = subprocess.Popen(small_run(runs, "--set", f"teacher.base_url={teacher.base_url}",
                                          "--set", "teacher.timeout_s=600"),
                                cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        try:
            assert follow(proc, lines, VIEW_AT).wait(300), "".join(lines)[-3000:]
            found = VIEW_AT.search("".join(lines))
            assert found, "".join(lines)[-3000:]
            graph = see_run_graph(*found.groups(), tmp_path / "run-page.png")
            teacher.open()
            assert proc.wait(timeout=300) == 0, "".join(lines)[-3000:]
        finally:
            teacher.open()
            if proc.poll() is None:
                proc.kill()
    assert node_labels(graph) == ["generate"], graph
    status = subprocess.run([*DISTILL, "status", str(runs / "ui")], cwd=ROOT, env=env, capture_output=True,
                            text=True, timeout=120)
    table = status.stdout.strip().splitlines()
    output = "".join(lines)
    assert status.returncode == 0 and table[-1].startswith("spent $"), status.stdout + status.stderr
    assert output.strip().splitlines()[-len(table):] == table, output[-3000:]
    for noise in ("Error logging to API", "Logging error", "Traceback"):
        assert noise not in output, output[-3000:]


def test_the_ui_is_told_a_relative_api_url_unless_a_public_url_or_prefect_ui_api_url_says_otherwise() -> None:
    from prefect.settings import PREFECT_API_URL, PREFECT_UI_API_URL, temporary_settings

    from pipeline.cli.server import ui_api_url

    # PREFECT_API_URL is the client's; Prefect's UI took it as its own API (the bug on any other port)
    with temporary_settings({PREFECT_API_URL: "http://127.0.0.1:4200/api"}):
        assert ui_api_url(None) == "/api"
        assert ui_api_url("https://example.org/prefect/") == "https://example.org/prefect/api"
    with temporary_settings({PREFECT_UI_API_URL: "https://proxy.example/api"}):
        assert ui_api_url(None) == "https://proxy.example/api"
        assert ui_api_url("https://example.org") == "https://example.org/api"


INNER_TEST = '''
from prefect_env import PrefectEnv


def test_a_flow_that_logs_and_creates_artifacts_in_this_process(tmp_path):
    from prefect import flow, get_run_logger
    from prefect.artifacts import create_markdown_artifact

    @flow(name="inner")
    def inner() -> None:
        for i in range(3):
            get_run_logger().info("artifact %s", i)
            create_markdown_artifact(f"# {i}", key=f"inner-{i}")

    env = PrefectEnv(tmp_path / "prefect")
    env.start_server()
    try:
        with env.client_settings():
            inner()
    finally:
        env.stop()
'''


@pytest.mark.slow
def test_a_pytest_run_that_ran_a_flow_in_process_ends_without_logging_errors(tmp_path: Path) -> None:
    """What `make test` printed at its end: Prefect's log and event workers flushing, at interpreter exit, to a
    server the fixture had stopped, and logging that to pytest's closed capture stream."""
    (tmp_path / "test_inner.py").write_text(INNER_TEST)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), str(ROOT / "tests")])}
    res = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "test_inner.py"],
                         cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    out = res.stdout + res.stderr
    assert res.returncode == 0 and "1 passed" in out, out[-3000:]
    for noise in ("Logging error", "Error logging to API", "Still processing items"):
        assert noise not in out, out[-3000:]
