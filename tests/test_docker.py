"""The deployment files: the compose file parses and hands keys to every worker; the Kubernetes GPU template."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

DOCKER = Path(__file__).resolve().parents[1] / "docker"


def _compose_config() -> dict:
    """`docker compose config` (or Debian's `docker-compose config`): parses and resolves without a daemon."""
    if shutil.which("docker") and subprocess.run(["docker", "compose", "version"], capture_output=True).returncode == 0:
        cmd = ["docker", "compose"]
    elif shutil.which("docker-compose"):
        cmd = ["docker-compose"]
    else:
        pytest.skip("no docker compose CLI here (install docker-compose); the compose file was not parsed")
    res = subprocess.run([*cmd, "-f", str(DOCKER / "compose.yaml"), "config"], capture_output=True, text=True,
                         env={"PATH": "/usr/bin:/bin", "OPENAI_API_KEY": "sk-test-not-a-key"}, timeout=120)
    assert res.returncode == 0, res.stderr
    return yaml.safe_load(res.stdout)


def test_compose_file_parses_and_every_worker_gets_the_keys() -> None:
    config = _compose_config()
    services = config["services"]
    assert set(services) == {"postgres", "server", "cpu-worker", "gpu-worker"}
    for worker in ("cpu-worker", "gpu-worker"):  # both call endpoints: teacher, rater, judge, pool members
        env = services[worker]["environment"]
        assert env["OPENAI_API_KEY"] == "sk-test-not-a-key" and env["PREFECT_API_URL"] == "http://server:4200/api"
        assert {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_ENDPOINT_URL"} <= set(env)
    for name, service in services.items():  # every image pinned to a version
        image = service["image"]
        assert re.search(r":\d[\w.-]*$", image), f"{name}: image {image} is not pinned"
    assert "postgresql+asyncpg://" in services["server"]["environment"]["PREFECT_API_DATABASE_CONNECTION_URL"]
    devices = services["gpu-worker"]["deploy"]["resources"]["reservations"]["devices"]
    assert devices[0]["capabilities"] == ["gpu"]


def test_dockerfiles_pin_their_base_images_and_packages() -> None:
    for name in ("Dockerfile.cpu", "Dockerfile.gpu"):
        text = (DOCKER / name).read_text()
        base = re.search(r"^FROM (\S+)", text, re.M).group(1)
        assert re.search(r":\d", base) and "latest" not in base, base
        for spec in re.findall(r'"((?:vllm|deepspeed|torch)[^"]*)"', text):
            assert "==" in spec, f"{name}: {spec} is not pinned"


def test_kubernetes_gpu_template_requests_gpus_and_uses_every_variable() -> None:
    template = json.loads((DOCKER / "k8s" / "gpu-base-job-template.json").read_text())
    variables = set(template["variables"]["properties"])
    used = set(re.findall(r"\{\{\s*(\w+)\s*\}\}", json.dumps(template["job_configuration"])))
    assert used == variables, (used ^ variables)  # a variable not referenced would silently do nothing
    pod = template["job_configuration"]["job_manifest"]["spec"]["template"]["spec"]
    resources = pod["containers"][0]["resources"]
    assert resources["limits"]["nvidia.com/gpu"] == resources["requests"]["nvidia.com/gpu"] == "{{ gpus }}"
    assert pod["nodeSelector"] == "{{ node_selector }}" and pod["tolerations"] == "{{ tolerations }}"
    props = template["variables"]["properties"]
    assert props["tolerations"]["default"][0]["key"] == "nvidia.com/gpu"
