"""Register the deployments (parent on the cpu pool, GPU stages on the gpu pool), or serve them from one process."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from prefect import get_client
from prefect.client.schemas.actions import WorkPoolCreate
from prefect.exceptions import ObjectAlreadyExists

from pipeline.flows.distill import STAGE_FLOWS, distill
from pipeline.flows.gpus import ensure_gpu_limit
from pipeline.run.registry import STAGES

# the folder that holds flows/: the source tree, or pipeline/ in an install; the entrypoints are relative to it
PROJECT_DIR = Path(__file__).resolve().parents[1]
SERVING_STAGES = tuple(name for name, spec in STAGES.items() if spec.sends_requests)


def deployment_specs(cpu_pool: str = "cpu", gpu_pool: str = "gpu", cron: str | None = None,
                     series_recipe: str = "configs/quickstart.yaml") -> list[dict[str, Any]]:
    """What `distill deploy` registers; `prefect.yaml` declares the same for `prefect deploy --all`."""
    specs: list[dict[str, Any]] = [
        {"flow": distill, "entrypoint": "flows/distill.py:distill", "name": "distill", "pool": cpu_pool,
         "parameters": {}},
    ]
    if cron:
        specs.append({"flow": distill, "entrypoint": "flows/distill.py:distill", "name": "nightly",
                      "pool": cpu_pool, "cron": cron,
                      "parameters": {"request": {"recipe_path": series_recipe, "series": "nightly"}}})
    for stage, fl in STAGE_FLOWS.items():
        # A stage's deployment is named after its pool: the parent dispatches `<stage>/<gpu_pool>`. A stage
        # with endpoints goes there too when a teacher it uses is served by vllm, so it has both.
        pools = [gpu_pool] if STAGES[stage].gpu else [cpu_pool, gpu_pool] if stage in SERVING_STAGES else [cpu_pool]
        specs += [{"flow": fl, "entrypoint": f"flows/distill.py:{fl.fn.__name__}", "name": pool, "pool": pool,
                   "parameters": {}} for pool in pools]
    return specs


def ensure_pools_and_limits(cpu_pool: str, gpu_pool: str, gpus: int) -> None:
    """Create the two process work pools if they do not exist, and the GPU limit sized `gpus`."""
    with get_client(sync_client=True) as client:
        for pool in {cpu_pool, gpu_pool}:
            try:
                client.create_work_pool(WorkPoolCreate(name=pool, type="process"))
            except ObjectAlreadyExists:
                pass
    ensure_gpu_limit(gpus)


def deploy_all(cpu_pool: str = "cpu", gpu_pool: str = "gpu", cron: str | None = None, gpus: int = 1,
               project_dir: Path = PROJECT_DIR) -> list[str]:
    """Register every deployment for process workers that run from `project_dir`; returns their names."""
    ensure_pools_and_limits(cpu_pool, gpu_pool, gpus)
    names = []
    for spec in deployment_specs(cpu_pool, gpu_pool, cron):
        fl = spec["flow"].from_source(source=str(project_dir), entrypoint=spec["entrypoint"])
        kwargs: dict[str, Any] = {"name": spec["name"], "work_pool_name": spec["pool"],
                                  "parameters": spec["parameters"], "build": False, "push": False,
                                  "print_next_steps": False, "ignore_warnings": True}
        if spec.get("cron"):
            kwargs["cron"] = spec["cron"]
        fl.deploy(**kwargs)
        names.append(f"{spec['flow'].name}/{spec['name']}")
    return names


def serve_all(gpu_pool: str = "gpu", cron: str | None = None) -> None:
    """Serve every deployment from this process (one machine, no workers needed)."""
    from prefect import serve

    deployments = []
    for spec in deployment_specs("cpu", gpu_pool, cron):
        deployments.append(spec["flow"].to_deployment(name=spec["name"], parameters=spec["parameters"],
                                                      cron=spec.get("cron")))
    serve(*deployments)
