"""Shared fixtures: offline Hugging Face, a repo-root path, recipes written to tmp dirs."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import yaml

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

ROOT = Path(__file__).resolve().parents[1]


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

