"""The global concurrency limit that keeps runs off each other's GPUs, counted in GPUs."""

from __future__ import annotations

from prefect import get_client
from prefect.client.schemas.actions import GlobalConcurrencyLimitCreate, GlobalConcurrencyLimitUpdate
from prefect.exceptions import ObjectAlreadyExists, ObjectNotFound

from pipeline.core import environment
from pipeline.core.recipe import Recipe
from pipeline.run.registry import STAGES
from pipeline.teacher.serving import server_gpus

GPU_CONCURRENCY_LIMIT = "zephyr-distill-gpu"


def gpus_needed(recipe: Recipe) -> int:
    """The slots a GPU stage occupies: compute.num_gpus (one when it trains on a single device or the CPU)."""
    return max(1, recipe.compute.num_gpus)


def stage_gpus(stage: str, recipe: Recipe) -> int:
    """The GPUs a stage occupies on the gpu pool (0: it runs anywhere): its own work's, plus those of the vllm
    servers of the teachers it serves for itself (tensor_parallel_size each)."""
    own = gpus_needed(recipe) if STAGES[stage].gpu else 0
    return own + server_gpus(STAGES[stage].endpoints(recipe))


def ensure_gpu_limit(gpus: int | None = None) -> int:
    """Create the limit if it is missing (whichever path runs the flow: `distill deploy`, `prefect deploy`, a
    served deployment), sized `gpus`, else $ZEPHYR_DISTILL_GPUS, else 1; `gpus` given also resizes an existing
    one (`distill deploy --gpus N`). Returns the limit's size."""
    size = gpus or environment.gpu_pool_size()
    with get_client(sync_client=True) as client:
        try:
            current = client.read_global_concurrency_limit_by_name(GPU_CONCURRENCY_LIMIT).limit
        except ObjectNotFound:
            current = None
        if current is not None:
            if gpus is None or gpus == current:
                return current
            client.update_global_concurrency_limit(GPU_CONCURRENCY_LIMIT, GlobalConcurrencyLimitUpdate(limit=gpus))
            return gpus
        try:
            client.create_global_concurrency_limit(GlobalConcurrencyLimitCreate(name=GPU_CONCURRENCY_LIMIT,
                                                                                limit=size))
        except ObjectAlreadyExists:  # another flow created it in between
            return client.read_global_concurrency_limit_by_name(GPU_CONCURRENCY_LIMIT).limit
    return size


def check_fits(needed: int, size: int) -> None:
    """A stage that needs more GPUs than the limit has would wait forever: say so instead."""
    if needed > size:
        raise RuntimeError(f"this stage needs {needed} GPUs (compute.num_gpus) but the concurrency limit "
                           f"'{GPU_CONCURRENCY_LIMIT}' counts {size}; raise it (`distill deploy --gpus {needed}` or "
                           f"`prefect global-concurrency-limit update {GPU_CONCURRENCY_LIMIT} --limit {needed}`)")
