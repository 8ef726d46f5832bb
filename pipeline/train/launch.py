"""Multi-GPU training: run a stage under `accelerate launch` as a subprocess and report its failure clearly."""

from __future__ import annotations

import argparse
import collections
import json
import logging
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Callable
from importlib import resources
from pathlib import Path

from pipeline.core import environment, processes
from pipeline.core.recipe import ComputeConfig, Recipe, recipe_from_dict
from pipeline.core.store import RunStore
from pipeline.train.models import TrainingError, local_stage_dir

# configs/ in a source tree, pipeline/configs/ in an install: a file either way, as `accelerate launch` needs
ACCELERATE_CONFIGS = Path(str(resources.files("pipeline.configs") / "accelerate"))
SHIPPED = {"multi_gpu": "multi_gpu.yaml", "deepspeed_zero3": "deepspeed_zero3.yaml", "zero3": "deepspeed_zero3.yaml",
           "fsdp": "fsdp.yaml"}


def should_launch(compute: ComputeConfig) -> bool:
    """True in the parent process of a multi-GPU run; False on a launched rank or a single device."""
    return compute.num_gpus > 1 and not is_launched_rank()


def is_launched_rank() -> bool:
    """True inside a process started by `launch_stage` (one rank of a multi-GPU run)."""
    return environment.is_launched_rank()


def accelerate_config_path(compute: ComputeConfig) -> Path:
    """compute.accelerate_config as a file: a path, or a shipped name (multi_gpu, deepspeed_zero3, fsdp)."""
    name = compute.accelerate_config or "multi_gpu"
    path = ACCELERATE_CONFIGS / SHIPPED[name] if name in SHIPPED else Path(name).expanduser()
    if not path.is_file() and not path.is_absolute():
        path = ACCELERATE_CONFIGS.parents[1] / path  # `configs/accelerate/…` from anywhere, as recipes write it
    if not path.is_file():
        raise TrainingError(f"compute.accelerate_config: '{name}' is neither a file nor one of {sorted(SHIPPED)} "
                            f"(shipped in {ACCELERATE_CONFIGS})")
    return path.resolve()


def accelerate_command(entry: str, recipe_file: Path, run_dir: str, compute: ComputeConfig) -> list[str]:
    """`accelerate launch --config_file … --num_processes N -m ENTRY --recipe … --run …`, where ENTRY is the
    stage package whose `__main__` calls `rank_main`."""
    return [sys.executable, "-m", "accelerate.commands.launch",
            "--config_file", str(accelerate_config_path(compute)),
            "--num_processes", str(compute.num_gpus), "--num_machines", "1",
            "-m", entry, "--recipe", str(recipe_file), "--run", run_dir]


def launch_stage(stage: str, recipe: Recipe, store: RunStore, entry: str, tail_lines: int = 40) -> None:
    """Run the stage on compute.num_gpus GPUs, each rank `python -m ENTRY`; raises TrainingError with the log
    tail if it fails.

    With a remote store the ranks share one local stage dir, downloaded before and uploaded after by this
    (the parent) process alone."""
    with local_stage_dir(store, stage) as stage_dir:
        extra_env = {} if store.is_local else {environment.STAGE_DIR: str(stage_dir)}
        _launch(stage, recipe, store, entry, tail_lines, extra_env)


def rank_main(run: Callable[[Recipe, RunStore], object], argv: list[str] | None = None) -> None:
    """One rank of a multi-GPU stage: `python -m pipeline.stages.STAGE --recipe F --run DIR` runs `run`."""
    parser = argparse.ArgumentParser(description=rank_main.__doc__)
    parser.add_argument("--recipe", required=True, help="recipe snapshot (JSON) written by the launching stage")
    parser.add_argument("--run", required=True, help="run directory (path or fsspec URL)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    with open(args.recipe) as fh:
        recipe = recipe_from_dict(json.load(fh), origin=args.recipe)
    run(recipe, RunStore.open_existing(args.run))


def _launch(stage: str, recipe: Recipe, store: RunStore, entry: str, tail_lines: int,
            extra_env: dict[str, str]) -> None:
    workdir = Path(tempfile.mkdtemp(prefix=f"distill-launch-{stage}-"))
    recipe_file = workdir / "recipe.json"
    recipe_file.write_text(json.dumps(recipe.snapshot()))
    command = accelerate_command(entry, recipe_file, store.url, recipe.compute)
    log_path = workdir / "launch.log"
    tail: collections.deque[str] = collections.deque(maxlen=tail_lines)
    env = {**os.environ, environment.LAUNCHED: "1", **extra_env}
    with open(log_path, "w") as log_file, processes.start(
            command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) as proc:
        for line in proc.stdout:
            sys.stderr.write(line)
            log_file.write(line)
            tail.append(line)
    if proc.returncode != 0:
        raise TrainingError(
            f"stage '{stage}': `accelerate launch` on {recipe.compute.num_gpus} GPUs exited with code "
            f"{proc.returncode} (full log: {log_path}); last lines:\n{''.join(tail)}")
    shutil.rmtree(workdir, ignore_errors=True)
