"""Shared fixtures: offline Hugging Face, a repo-root path, recipes written to tmp dirs."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import yaml

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
if os.environ.get("PYTEST_XDIST_WORKER"):  # `make test` runs two workers side by side (pytest-xdist)
    import tempfile

    # a Prefect home of its own: a `distill run` without a server starts one on the profile's database
    _home = Path(tempfile.gettempdir()) / f"distill-tests-{os.getpid()}-{os.environ['PYTEST_XDIST_WORKER']}"
    os.environ.setdefault("PREFECT_HOME", str(_home / "prefect"))
    # one compute thread each (the subprocesses inherit it): two workers on 2 cores, neither oversubscribed
    os.environ.setdefault("OMP_NUM_THREADS", "1")

ROOT = Path(__file__).resolve().parents[1]
# what marks a module's tests, read from its source, so a new module is sorted without a list to keep
_MODULE_MARKS = {"browser": ("sync_playwright", "_ensure_chromium("), "prefect": ("PrefectEnv(", "prefect_test_harness")}
_MEASURED_SLOW = Path(__file__).parent / "data" / "slow_tests.txt"


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """`browser` on the tests of a module that drives Chromium, `prefect` on those of one that starts a Prefect
    server, `slow` on those measured slow (tests/data/slow_tests.txt: a test, or a module whose shared fixture
    is): what `make test-quick` leaves out."""
    measured = {line.strip() for line in _MEASURED_SLOW.read_text().splitlines()
                if line.strip() and not line.startswith("#")}
    sources: dict[Path, str] = {}
    for item in items:
        if item.nodeid in measured or item.nodeid.split("::")[0] in measured:
            item.add_marker("slow")
        path = Path(str(item.fspath))
        if path not in sources:
            sources[path] = path.read_text() if path.suffix == ".py" else ""
        for mark, needles in _MODULE_MARKS.items():
            if any(needle in sources[path] for needle in needles):
                item.add_marker(mark)


@pytest.fixture
def repo_root() -> Path:
    return ROOT


@pytest.fixture
def write_recipe(tmp_path: Path):
    """Write a recipe dict to a YAML file (storage.root defaults to tmp_path/runs)."""

    def _write(data: dict, name: str = "recipe.yaml") -> Path:
        data = dict(data)
        data.setdefault("storage", {"root": str(tmp_path / "runs")})
        path = tmp_path / name
        path.write_text(yaml.safe_dump(data, sort_keys=False))
        return path

    return _write


@pytest.fixture(scope="session")
def postgres_cluster(tmp_path_factory):
    """One PostgreSQL cluster for the session; each Prefect server gets a database of its own."""
    import shutil

    from prefect_env import local_postgres

    pg = local_postgres()
    pg.start()
    try:
        yield pg
    finally:
        pg.stop()
        shutil.rmtree(pg.data_dir.parent, ignore_errors=True)



@pytest.fixture(scope="session")
def s3(tmp_path_factory):
    """A moto S3 server for the session; this process and the subprocesses it starts talk to it (the
    endpoint and dummy keys are in the environment, as a worker on another machine would have them)."""
    from s3_env import MotoS3

    server = MotoS3(tmp_path_factory.mktemp("s3")).start()
    saved = {k: os.environ.get(k) for k in server.env}
    os.environ.update(server.env)
    try:
        yield server
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
        server.stop()
