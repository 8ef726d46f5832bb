"""Every environment variable zephyr-distill itself reads or sets, each with what it is for. (A recipe names the
others: an endpoint's `api_key_env`.)"""

from __future__ import annotations

import os
import re
from pathlib import Path

# Where the content-hash cache and the models converted from GGUF live (default ~/.cache/zephyr-distill).
CACHE_DIR = "ZEPHYR_DISTILL_CACHE"
# "1" in the processes `accelerate launch` starts for a multi-GPU stage: they train instead of launching again.
LAUNCHED = "DISTILL_LAUNCHED"
# The local copy of a remote store's stage directory that the launching process hands its ranks (they share it,
# and only the launcher uploads it).
STAGE_DIR = "DISTILL_STAGE_DIR"
# The gpu work pool's size in GPUs, for the GPU concurrency limit when no `distill deploy --gpus` created it.
GPUS = "ZEPHYR_DISTILL_GPUS"
# The project directory Prefect workers run the flows from (prefect.yaml's pull step, the Docker images).
HOME = "ZEPHYR_DISTILL_HOME"
# Process-local variables that a Prefect Secret block's value is exported into, when the recipe names a block
# but no `api_key_env`: the teacher's, and one per named endpoint.
TEACHER_KEY = "ZEPHYR_DISTILL_TEACHER_KEY"


def endpoint_key(name: str) -> str:
    """The variable for endpoint `name`'s Secret block value (see TEACHER_KEY)."""
    return "ZEPHYR_DISTILL_" + re.sub(r"[^A-Z0-9]", "_", name.upper()) + "_KEY"


def cache_root() -> Path:
    return Path(os.environ.get(CACHE_DIR) or Path.home() / ".cache" / "zephyr-distill")


def is_launched_rank() -> bool:
    """True inside a process started by `accelerate launch` for one rank of a multi-GPU stage."""
    return os.environ.get(LAUNCHED) == "1"


def gpu_pool_size() -> int:
    return int(os.environ.get(GPUS) or 1)
