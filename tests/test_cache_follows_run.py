"""The response cache and the spend ledger follow a run on S3, not the worker: generate killed on worker A
and finished on worker B (another HOME, another cache dir, only the S3 store shared) repeats no paid request
beyond those in flight at the kill, and B's ledger holds what A paid."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest
import yaml

from pipeline.core.sources import prompt_id
from pipeline.core.store import RunStore
from pipeline.tasks.toy.task import make_prompts
from pipeline.tasks.toy.teacher_server import ToyTeacher, ToyTeacherConfig
from pipeline.teacher.cache import open_cache
from pipeline.teacher.mirror import RemoteMirror

DISTILL = [sys.executable, "-m", "pipeline.cli"]
CONCURRENCY = 8
PROMPTS = 60


def _worker(tmp_path: Path, name: str, root: str, teacher_url: str,
            limit: dict[str, object]) -> tuple[list[str], dict[str, str]]:
    """A worker's command and environment: its own HOME and cache dir, the shared S3 run store."""
    home = tmp_path / name
    home.mkdir()
    recipe = {"name": "follow", "task": "toy", "prompts": {"source": "task", "count": PROMPTS},
              "teacher": {"base_url": teacher_url, "model": "toy-gen", "api_key_env": None, "timeout_s": 10.0,
                          "max_retries": 3, "backoff_base_s": 0.05, "backoff_max_s": 0.2,
                          **limit, "price_input_per_1k": 1.0, "price_output_per_1k": 2.0},
              "generate": {"max_rounds": 3, "shard_size": 10},
              "storage": {"root": root, "cache_dir": str(home / "cache")}}
    path = home / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    env = {**os.environ, "HOME": str(home), "HF_HUB_OFFLINE": "1"}
    return [*DISTILL, "stage", "generate", str(path), "--run-name", "follow"], env


# `auto` holds a request's slot until the store holds its answer too, under its moving limit (<= the ceiling)
@pytest.mark.parametrize("limit", [{"max_concurrency": CONCURRENCY},
                                   {"max_concurrency": "auto", "max_concurrency_ceiling": CONCURRENCY}],
                         ids=["fixed", "auto"])
def test_generate_killed_on_one_worker_finishes_on_another_without_paying_twice(s3, tmp_path: Path, limit) -> None:
    root = s3.url(f"follow-{uuid.uuid4().hex[:8]}")
    with ToyTeacher(ToyTeacherConfig(latency_ms=10)) as toy:
        cmd_a, env_a = _worker(tmp_path, "a", root, toy.base_url, limit)
        cmd_b, env_b = _worker(tmp_path, "b", root, toy.base_url, limit)
        toy.hold(after=120)  # 120 answered, then every request waits: the kill finds a full in-flight window
        proc = subprocess.Popen(cmd_a, env=env_a, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        deadline = time.monotonic() + 180
        while toy.stats()["outcomes"].get("ok", 0) < 120 and time.monotonic() < deadline:
            assert proc.poll() is None, proc.stderr.read()[-3000:]
            time.sleep(0.05)
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
        toy.release()
        answered_on_a = toy.stats()["outcomes"]["ok"]
        done = subprocess.run(cmd_b, env=env_b, capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stderr[-3000:]
        stats = toy.stats()
    repeated = sum(n - 1 for n in stats["ok_keys"].values())
    print(f"answered on A: {answered_on_a}, in all: {stats['outcomes']['ok']}, repeated on B: {repeated}")
    assert answered_on_a >= 120
    assert repeated <= CONCURRENCY, f"{repeated} paid requests repeated on worker B"
    store = RunStore(root, "follow", create=False)
    accounted = ({r["prompt_id"] for r in store.read_records("generate")} | set(store.ledger("generate").latest())
                 | set(store.ledger("generate", "dropped").latest()))
    assert accounted == {prompt_id(p) for p in make_prompts(PROMPTS, seed=0)}
    # B's ledger holds A's charges too: every answer the server gave, but those lost in flight at the kill
    cache = open_cache(store, str(tmp_path / "b" / "cache"))
    try:
        rows = cache.ledger.rows()
    finally:
        cache.close()
    assert stats["outcomes"]["ok"] - CONCURRENCY <= len(rows) <= stats["outcomes"]["ok"]
    assert len({r.charge_id for r in rows}) == len(rows)
    # a third machine asking for the run's spend sees the same total
    summary = json.loads(subprocess.run([*DISTILL, "status", store.url, "--json"], capture_output=True, text=True,
                                        env={**env_b, "HOME": str(tmp_path / "c")}, check=True).stdout)
    assert summary["stages"]["generate"]["requests"] == len(rows)


def test_mirror_group_commit_and_fold(s3, tmp_path: Path) -> None:
    import asyncio

    store = RunStore(s3.url(f"mirror-{uuid.uuid4().hex[:8]}"), "run")
    mirror = RemoteMirror(store)

    async def many() -> None:
        async def one(i: int) -> None:
            mirror.add({"key": f"k{i}", "value": "{}", "request": None, "charge": None, "at": 0.0})
            mine = mirror._added
            await mirror.flush()
            assert mirror._stored >= mine  # flush returns only once the entry's segment is stored

        await asyncio.gather(*(one(i) for i in range(50)))

    asyncio.run(many())
    names = mirror.segments()
    entries = [e for n in names for e in (mirror.read(n) or [])]
    assert sorted(e["key"] for e in entries) == sorted(f"k{i}" for i in range(50))
    assert len(names) < 50  # entries that waited on one PUT share its segment
    mirror.fold()
    assert len(mirror.segments()) == 1
    assert sorted(e["key"] for e in mirror.read(mirror.segments()[0]) or []) == sorted(f"k{i}" for i in range(50))
