"""No process the pipeline starts outlives its starter, however the starter dies (SIGKILL included)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

from pipeline.core import processes

ROOT = Path(__file__).resolve().parents[1]
QUICKSTART = ROOT / "configs" / "quickstart.yaml"
SMALL = ["prompts.count=40", "generate.max_rounds=1", "storage.root={root}"]


def marked(mark: str, needle: str = "") -> list[int]:
    """The live processes whose environment carries `mark` (and whose command line holds `needle`)."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            env = (entry / "environ").read_bytes()
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            state = (entry / "stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        if f"MARK={mark}".encode() in env and needle in cmdline and state != "Z":
            found.append(int(entry.name))
    return found


def wait_for(check, timeout_s: float, what: str):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        result = check()
        if result:
            return result
        time.sleep(0.1)
    raise AssertionError(f"{what} within {timeout_s} s")


def test_a_started_command_dies_with_its_sigkilled_starter():
    mark = uuid.uuid4().hex
    starter = ("import sys, time; sys.path.insert(0, sys.argv[1]); from pipeline.core import processes; "
               "processes.start(['sleep', '300']); time.sleep(300)")
    proc = subprocess.Popen([sys.executable, "-c", starter, str(ROOT)], env={**os.environ, "MARK": mark})
    wait_for(lambda: marked(mark, "sleep 300"), 20, "the command did not start")
    proc.kill()
    proc.wait()
    wait_for(lambda: not marked(mark), 10, f"left running after the starter's SIGKILL: {marked(mark)}")


def test_stop_ends_the_command_and_reports_its_exit_code():
    child = processes.start([sys.executable, "-c", "import sys; sys.exit(3)"])
    assert child.wait(timeout=30) == 3
    child = processes.start(["sleep", "300"])
    time.sleep(0.3)
    child.stop()
    assert child.returncode == 128 + signal.SIGTERM


def _distill_run(tmp_path: Path, mark: str, run_name: str) -> subprocess.Popen:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_API_")}
    env |= {"MARK": mark, "PREFECT_HOME": str(tmp_path / "prefect"), "PYTHONPATH": str(ROOT),
            "PREFECT_SERVER_ANALYTICS_ENABLED": "false"}
    sets = [f"--set={s.format(root=tmp_path / 'runs')}" for s in SMALL]
    return subprocess.Popen([sys.executable, "-m", "pipeline.cli", "run", str(QUICKSTART), "--stages", "generate",
                             "--run-name", run_name, *sets], env=env, cwd=tmp_path,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


@pytest.mark.parametrize("kill_while", ["pipeline.cli server", "pipeline.tasks.toy.teacher_server"],
                         ids=["temporary-prefect-server", "loopback-teacher"])
def test_a_sigkilled_distill_run_leaves_no_server_and_the_next_run_completes(tmp_path, kill_while):
    mark = uuid.uuid4().hex
    run = _distill_run(tmp_path, mark, "killed")
    wait_for(lambda: marked(mark, kill_while) or run.poll() is not None, 240, f"no `{kill_while}` came up")
    assert run.poll() is None, run.stdout.read()[-3000:]
    run.kill()
    run.wait()
    wait_for(lambda: not marked(mark), 10, f"left running after `distill run` was SIGKILLed: {marked(mark)}")
    rerun = _distill_run(tmp_path, mark, "killed")
    out, _ = rerun.communicate(timeout=400)
    assert rerun.returncode == 0, out[-3000:]
    assert "generate: " in out
    wait_for(lambda: not marked(mark), 10, "left running after the run ended")
