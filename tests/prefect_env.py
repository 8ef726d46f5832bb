"""A real Prefect server and process workers in subprocesses, for the orchestration tests."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
import uuid
from contextlib import contextmanager
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class PrefectEnv:
    """A Prefect server on loopback with its own home and database (SQLite, or a PostgreSQL database URL),
    plus workers on demand."""

    def __init__(self, home: Path, database_url: str | None = None):
        self.home = home
        self.port = free_port()
        self.api_url = f"http://127.0.0.1:{self.port}/api"
        self.ui_url = f"http://127.0.0.1:{self.port}"
        self.env = {
            **os.environ,
            "PREFECT_HOME": str(home),
            "PREFECT_API_URL": self.api_url,
            "PREFECT_API_DATABASE_CONNECTION_URL": database_url or f"sqlite+aiosqlite:///{home}/prefect.db",
            "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
            "PREFECT_WORKER_QUERY_SECONDS": "1",
            "PREFECT_WORKER_PREFETCH_SECONDS": "5",
            "PREFECT_LOCAL_STORAGE_PATH": str(home / "results"),
            "PREFECT_LOGGING_LEVEL": "INFO",
            "HF_HUB_OFFLINE": "1",
            "TQDM_DISABLE": "1",
            "ZEPHYR_DISTILL_GPUS": "2",  # what the GPU limit is sized when a flow has to create it
            "PATH": f"{BIN}:{os.environ.get('PATH', '')}",
        }
        self.procs: list[tuple[subprocess.Popen, object]] = []

    def _spawn(self, args: list[str], log_name: str) -> subprocess.Popen:
        log = open(self.home / log_name, "wb")  # noqa: SIM115 - closed in stop()
        proc = subprocess.Popen(args, cwd=ROOT, env=self.env, stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True)
        self.procs.append((proc, log))
        return proc

    def start_server(self, timeout: float = 120, command: str = "distill") -> None:
        """`distill server` (Prefect's app, writes serialised on SQLite), or plain `prefect server start`."""
        self.home.mkdir(parents=True, exist_ok=True)
        args = ([str(BIN / "distill"), "server"] if command == "distill" else [str(BIN / "prefect"), "server", "start"])
        self._spawn([*args, "--host", "127.0.0.1", "--port", str(self.port)], "server.log")
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                with urllib.request.urlopen(f"{self.api_url}/health", timeout=2) as r:
                    if r.status == 200:
                        return
            except OSError:
                time.sleep(0.5)
        raise RuntimeError(f"prefect server did not start: {(self.home / 'server.log').read_text()[-3000:]}")

    def start_worker(self, pool: str, timeout: float = 60) -> subprocess.Popen:
        """Start a process worker and wait until it polls (workers started together lock SQLite)."""
        log = self.home / f"worker-{pool}.log"
        proc = self._spawn([str(BIN / "prefect"), "worker", "start", "--pool", pool, "--type", "process",
                            "--limit", "4"], log.name)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and "started" not in log.read_text(errors="replace"):
            if proc.poll() is not None:
                raise RuntimeError(f"worker for pool {pool} exited: {log.read_text()[-3000:]}")
            time.sleep(0.3)
        return proc

    def run(self, *args: str, timeout: float = 300) -> subprocess.CompletedProcess:
        return subprocess.run(list(args), cwd=ROOT, env=self.env, capture_output=True, text=True, timeout=timeout)

    def stop(self) -> None:
        if "prefect" in sys.modules:  # this process talked to the server: send what it still holds first
            from pipeline.cli.server import flush_to_api

            flush_to_api()
        for proc, log in reversed(self.procs):
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGTERM)
                try:
                    proc.wait(timeout=20)
                except subprocess.TimeoutExpired:
                    os.killpg(proc.pid, signal.SIGKILL)
                    proc.wait(timeout=10)
            log.close()
        self.procs.clear()

    def logs(self) -> str:
        return "\n".join(f"--- {p.name}\n{p.read_text(errors='replace')[-4000:]}" for p in self.home.glob("*.log"))

    @contextmanager
    def client_settings(self):
        """Point this process's Prefect client at the server."""
        from prefect.settings import PREFECT_API_URL, temporary_settings

        from pipeline.cli.server import flush_to_api

        with temporary_settings({PREFECT_API_URL: self.api_url}):
            try:
                yield
            finally:
                flush_to_api()  # the logs and events of what ran here, sent while the server is up


def chromium_path() -> str | None:
    return shutil.which("chromium") or shutil.which("chromium-browser")


def local_postgres():
    """A PostgreSQL cluster for the tests (Debian's packages; `make test` installs them) on a free port, in a
    new directory under the system temp dir: pytest's own tmp dirs are private (0700), and as root the cluster
    runs as the `postgres` user, who must be able to enter its directory."""
    import tempfile

    from pipeline.cli.postgres import LocalPostgres

    root = Path(tempfile.mkdtemp(prefix="distill-pg-"))
    root.chmod(0o755)
    return LocalPostgres(root / "cluster", free_port())


def database_url(request) -> str | None:
    """None for SQLite; for PostgreSQL a fresh database in the session's cluster."""
    if request.param != "postgres":
        return None
    cluster = request.getfixturevalue("postgres_cluster")
    name = f"prefect_{uuid.uuid4().hex[:10]}"
    cluster.create_database(name)
    return cluster.url(name)
