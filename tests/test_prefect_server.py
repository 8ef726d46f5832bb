"""The Prefect server this project starts: concurrent submits never meet "database is locked"; PostgreSQL too."""

from __future__ import annotations

import sys
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from prefect_env import PrefectEnv, database_url

DISTILL = str(Path(sys.executable).parent / "distill")


@pytest.fixture(params=["sqlite", "postgres"])
def server(request, tmp_path):
    env = PrefectEnv(tmp_path / "prefect", database_url=database_url(request))
    env.start_server()
    try:
        res = env.run(DISTILL, "deploy")
        assert res.returncode == 0, res.stderr[-3000:]
        yield env
    finally:
        env.stop()


def test_forty_submits_twenty_at_a_time_all_succeed_without_client_retries(server):
    """The UI does not retry a 503, so the Python client's retries are turned off: every submit must be taken
    the first time (measured with `prefect server start` on SQLite: about half answered 503)."""
    from prefect.deployments import run_deployment
    from prefect.settings import PREFECT_API_URL, PREFECT_CLIENT_MAX_RETRIES, temporary_settings

    errors: list[str] = []
    runs = []

    def submit(i: int) -> None:
        try:
            with temporary_settings({PREFECT_API_URL: server.api_url, PREFECT_CLIENT_MAX_RETRIES: 0}):
                runs.append(run_deployment("distill/distill", timeout=0,
                                           parameters={"request": {"run_name": f"r{i}-{uuid.uuid4().hex[:6]}"}}))
        except Exception as exc:  # noqa: BLE001 - counted, and shown on failure
            errors.append(f"{type(exc).__name__}: {str(exc)[:300]}")

    with ThreadPoolExecutor(20) as pool:
        list(pool.map(submit, range(40)))
    assert errors == [], f"{len(errors)} of 40 submits failed: {errors[:3]}\n{server.logs()}"
    assert len({r.id for r in runs}) == 40


def test_distill_postgres_starts_a_cluster_and_prints_the_url():
    import shutil
    import subprocess

    from prefect_env import local_postgres

    pg = local_postgres()
    port = pg.port
    cmd = [DISTILL, "postgres", "start", "--dir", str(pg.data_dir), "--port", str(port)]
    try:
        res = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
        assert res.returncode == 0, res.stderr
        assert f"PREFECT_API_DATABASE_CONNECTION_URL=postgresql+asyncpg://prefect@127.0.0.1:{port}/prefect" \
            in res.stdout
        again = subprocess.run(cmd, capture_output=True, text=True, timeout=120)  # starting twice is fine
        assert again.returncode == 0, again.stderr
    finally:
        subprocess.run([DISTILL, "postgres", "stop", "--dir", str(pg.data_dir)], capture_output=True, timeout=120)
        shutil.rmtree(pg.data_dir.parent, ignore_errors=True)
