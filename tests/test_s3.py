"""The run store on S3 (a real S3-compatible server: moto): atomic shards and directories under SIGKILL, a whole
run that is killed and resumed, and multi-process training that uploads once."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import textwrap
import time
import uuid
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import yaml
from test_store import kill_mid_write

from pipeline.core.store import RunStore
from pipeline.train.models import TrainingError, local_model

REPO = Path(__file__).resolve().parents[1]
QUICKSTART = REPO / "configs" / "quickstart.yaml"

SHARD_WRITER = textwrap.dedent("""
    import random, sys
    from pipeline.core.store import RunStore
    store = RunStore(sys.argv[1], "run")
    w = store.shard_writer("generate", shard_size=3000)
    rng = random.Random(0)
    i = 0
    while True:  # incompressible rows: a shard is megabytes, its upload takes a while
        w.add({"prompt_id": f"id-{i}", "text": rng.randbytes(1500).hex(), "n": i})
        i += 1
        if i % 3000 == 0:  # that add filled the buffer and uploaded it
            print("published", flush=True)
""")

DIR_UPLOADER = textwrap.dedent("""
    import os, sys
    from pathlib import Path
    from pipeline.core.store import RunStore
    local = Path(sys.argv[2])
    store = RunStore(sys.argv[1], "run")
    print("ready", flush=True)
    store.upload_dir(local, "sft", "model")
    print("done", flush=True)
""")


@pytest.mark.parametrize("fraction", [0.5, 0.9])
def test_killed_shard_upload_leaves_no_partial_shard_on_s3(s3, fraction: float) -> None:
    root = s3.url(f"shards-{uuid.uuid4().hex[:8]}")
    kill_mid_write(SHARD_WRITER, root, writes=2, fraction=fraction)
    store = RunStore(root, "run")
    shards = store.shard_paths("generate")
    assert len(shards) >= 2, "every shard the writer reported must be visible"
    for path in shards:  # a PUT is visible whole or not at all
        with store.fs.open(path, "rb") as fh:
            assert pq.ParquetFile(fh).metadata.num_rows == 3000
    assert [r["n"] for r in store.read_records("generate")] == list(range(3000 * len(shards)))
    writer = store.shard_writer("generate", shard_size=3000)
    assert writer.done_ids() == {f"id-{i}" for i in range(3000 * len(shards))}


def test_killed_directory_upload_leaves_no_model_a_reader_would_take(s3, tmp_path: Path) -> None:
    model = tmp_path / "model"
    model.mkdir()
    for i in range(200):  # the weights first, config.json (what readers look for) last
        (model / f"weights-{i:03d}.bin").write_bytes(os.urandom(200_000))
    (model / "config.json").write_text("{}")
    root = s3.url(f"dirs-{uuid.uuid4().hex[:8]}")
    store = RunStore(root, "run")
    proc = subprocess.Popen([sys.executable, "-c", DIR_UPLOADER, root, str(model)], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "ready"
    while len(store.fs.find(store.join("sft", "model"))) < 10:  # kill it in the middle of the upload
        store.fs.invalidate_cache()
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    store.fs.invalidate_cache()
    uploaded = store.fs.find(store.join("sft", "model"))
    assert 10 <= len(uploaded) < 201, "the kill should fall inside the upload"
    assert not any(p.endswith("config.json") for p in uploaded)
    with pytest.raises(TrainingError, match="holds no model"):
        local_model(store, "sft")
    store.upload_dir(model, "sft", "model")  # the rerun's upload commits it
    assert sorted(p.name for p in Path(local_model(store, "sft")).iterdir()) == sorted(p.name for p in model.iterdir())


def _small_run_recipe(tmp_path: Path, root: str) -> Path:
    data = yaml.safe_load(QUICKSTART.read_text())
    data["storage"] = {"root": root, "cache_dir": str(tmp_path / "cache")}
    data["prompts"]["count"] = 48
    data["sft"]["args"].update(num_train_epochs=2)
    data["dpo"]["args"].update(num_train_epochs=1)
    data["evaluate"]["heldout_count"] = 16
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


@pytest.mark.slow
def test_a_whole_run_on_s3_survives_sigkill_and_resumes(s3, tmp_path: Path) -> None:
    root = s3.url(f"runs-{uuid.uuid4().hex[:8]}")
    recipe = _small_run_recipe(tmp_path, root)
    cmd = [sys.executable, "-m", "pipeline.cli", "run", str(recipe), "--no-prefect", "--run-name", "s3run"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    proc = subprocess.Popen(cmd, cwd=tmp_path, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    store = RunStore(root, "s3run", create=False)
    deadline = time.monotonic() + 600
    # kill inside sft: as soon as it is marked running (a fast machine trains this recipe in a few seconds)
    while time.monotonic() < deadline and store.stage_state("sft").status != "running":
        assert proc.poll() is None, proc.stderr.read()[-3000:]
        time.sleep(0.1)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    assert store.stage_state("generate").status == "completed" and store.stage_state("sft").status == "running"
    res = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900)
    assert res.returncode == 0, res.stderr[-4000:]
    manifest = store.read_manifest()
    assert {name: s["status"] for name, s in manifest["stages"].items()} == {
        name: "completed" for name in ("generate", "sft", "sample", "feedback", "dpo", "evaluate")}
    for path in ("sft/model/config.json", "dpo/model/config.json", "evaluate/report.json", "feedback/report.md"):
        assert store.fs.exists(store.join(path)), path
    assert "generate: completed earlier with the same fingerprint" in res.stderr  # not redone after the kill
    report = json.loads(store.fs.cat(store.join("evaluate", "report.json")))
    assert report["evaluation"]["models"]["dpo"]["accuracy"]["n"] == 16
    # the run's data sets export straight from the bucket
    out = tmp_path / "export"
    res = subprocess.run([sys.executable, "-m", "pipeline.cli", "export", "s3run", str(out), "--root", root],
                         cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    from datasets import load_from_disk

    splits = load_from_disk(str(out))
    assert set(splits) == {"train_sft", "test_sft", "train_gen", "test_gen", "train_prefs", "test_prefs"}
    assert len(splits["train_sft"]) + len(splits["test_sft"]) == store.count_records("generate")
    assert len(splits["train_prefs"]) + len(splits["test_prefs"]) == store.count_records("feedback", "pairs")
    assert (out / "README.md").exists()


@pytest.mark.slow
def test_multi_process_training_on_s3_uploads_once_from_the_parent(s3, tmp_path: Path) -> None:
    from test_train_toyworld import toy_recipe, write_dialogues

    from pipeline.run.runner import open_run, run_stage

    # torchrun's two processes (accelerate's MULTI_CPU launcher starts only one without mpirun); on this
    # machine without a GPU the ranks train on the CPU and join one gloo process group
    config = tmp_path / "two-ranks.yaml"
    config.write_text(yaml.safe_dump({"compute_environment": "LOCAL_MACHINE", "distributed_type": "MULTI_GPU",
                                      "mixed_precision": "no", "num_machines": 1, "num_processes": 2,
                                      "gpu_ids": "all", "main_training_function": "main"}))
    prefix = f"ranks-{uuid.uuid4().hex[:8]}"
    recipe = toy_recipe(tmp_path, prompts={"source": "task", "count": 16},
                        sft={"model": "builtin:tiny", "args": {"max_steps": 4, "save_steps": 2,
                                                               "per_device_train_batch_size": 4}},
                        compute={"num_gpus": 2, "accelerate_config": str(config)},
                        storage={"root": s3.url(prefix), "cache_dir": str(tmp_path / "cache")})
    store = open_run(recipe, "ranks")
    write_dialogues(store, recipe)
    run_stage("sft", recipe, store)
    metrics = json.loads(store.fs.cat(store.join("sft", "metrics.json")))
    assert metrics["launched"] is True and metrics["world_size"] == 2 and metrics["global_step"] == 4
    puts = re.findall(rf'"PUT /{s3.bucket}/{prefix}/ranks/sft/model/config\.json', s3.log_path.read_text())
    assert len(puts) == 1  # one upload of the model, by the launching process, not one per rank
    assert Path(local_model(store, "sft"), "config.json").is_file()


def test_reading_the_manifest_while_another_process_rewrites_it_never_fails(s3) -> None:
    """`distill status` (or a test) polls a run's manifest while its stage rewrites it: each read is one GET,
    which sees the old or the new object (a HEAD then a ranged GET tied to the old ETag fails with
    PreconditionFailed when the object is replaced in between)."""
    import threading

    store = RunStore(s3.url(f"poll-{uuid.uuid4().hex[:8]}"), "run")
    store.write_manifest({"stages": {}, "n": 0, "pad": "x" * 50_000})
    stop = threading.Event()

    def rewrite() -> None:
        writer = RunStore(store.root, "run", create=False)
        n = 0
        while not stop.is_set():
            n += 1
            writer.write_manifest({"stages": {}, "n": n, "pad": "x" * 50_000})

    thread = threading.Thread(target=rewrite)
    thread.start()
    try:
        seen = {store.read_manifest()["n"] for _ in range(150)}
    finally:
        stop.set()
        thread.join()
    assert len(seen) > 1  # the reads overlapped the rewrites
