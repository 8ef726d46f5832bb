"""Endpoints whose server a stage starts for itself on loopback: the task's built-in teacher, and a local model
named by `serve:` (`transformers serve` on CPU, `vllm serve` on a GPU worker), stopped when the stage ends.

Where such a server listens is known only while it runs, so it is never on the recipe: `endpoint_url(cfg)` looks
it up among the servers this process runs now (keyed by what they serve; `serving_endpoints` adds and removes
them), and the client asks it for the URL of every endpoint.
"""

from __future__ import annotations

import json
import logging
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any

from pipeline.core import processes
from pipeline.core.gguf import hf_model_dir
from pipeline.core.recipe import Recipe, TeacherConfig
from pipeline.core.recipe.serve import ServeConfig
from pipeline.core.task import load_task

log = logging.getLogger("pipeline")
HOST = "127.0.0.1"

_LIVE: dict[str, str] = {}  # server key -> base URL of a server this process runs now
_LOCK = threading.Lock()


class ServeError(RuntimeError):
    """A served model's server did not come up; the message holds the end of its log."""


def server_key(cfg: TeacherConfig) -> str:
    """What a server started for `cfg` serves: endpoints with the same key share one server."""
    what = {"builtin": cfg.builtin} if cfg.is_builtin else {"serve": cfg.serve.model_dump(mode="json"),
                                                              "as": cfg.model}
    return json.dumps(what, sort_keys=True)


def endpoint_url(cfg: TeacherConfig) -> str:
    """The base URL requests to this endpoint go to: its `base_url`, or its running server's."""
    if not cfg.needs_server:
        return cfg.base_url
    with _LOCK:
        url = _LIVE.get(server_key(cfg))
    if url is None:
        what = "the built-in teacher" if cfg.is_builtin else f"the served model {cfg.serve.model}"
        raise RuntimeError(f"{what} is not running: a stage starts it (pipeline.teacher.serving.serving_endpoints)")
    return url


@contextmanager
def serving_endpoints(recipe: Recipe, endpoints: dict[str, TeacherConfig]) -> Iterator[None]:
    """Start a server for each of `endpoints` that needs one and has none yet; stop those on exit, however
    it is reached (and, through `processes`, when this process dies)."""
    with ExitStack() as stack:
        for name, cfg in endpoints.items():
            if not cfg.needs_server:
                continue
            key = server_key(cfg)
            with _LOCK:
                if key in _LIVE:
                    continue
            if cfg.is_builtin:
                task = load_task(recipe.task)
                url = stack.enter_context(task.serve_teacher(task.teacher_options.model_validate(cfg.builtin)))
                log.info("task %s: built-in teacher listening at %s", task.name, url)
            else:
                url = stack.enter_context(served_model(cfg.serve, cfg.model))
                log.info("endpoint %s: %s serving %s at %s", name, cfg.serve.server, cfg.serve.model, url)
            with _LOCK:
                _LIVE[key] = url
            stack.callback(_forget, key)
        yield


def _forget(key: str) -> None:
    with _LOCK:
        _LIVE.pop(key, None)


def server_gpus(endpoints: dict[str, TeacherConfig]) -> int:
    """GPUs the servers of these endpoints take (vllm: tensor_parallel_size each; 0 when none needs one)."""
    seen = {server_key(c): c.serve for c in endpoints.values() if c.serve is not None and c.serve.needs_gpu}
    return sum(s.tensor_parallel_size for s in seen.values())


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind((HOST, 0))
        return sock.getsockname()[1]


def option_flags(args: dict[str, Any]) -> list[str]:
    """`{dtype: bfloat16, enforce_eager: true, x: [1, 2]}` as `--dtype bfloat16 --enforce-eager --x 1 2`."""
    flags: list[str] = []
    for key, value in args.items():
        flag = "--" + str(key).replace("_", "-")
        if value is True:
            flags.append(flag)
        elif value is False:
            flags.append("--no-" + flag[2:])
        elif isinstance(value, list | tuple):
            flags += [flag, *map(str, value)]
        elif isinstance(value, dict):
            flags += [flag, json.dumps(value)]
        elif value is not None:
            flags += [flag, str(value)]
    return flags


def transformers_command(model_dir: str, port: int, serve: ServeConfig, alias: str) -> list[str]:
    """transformers' own server (`transformers serve`) through our launcher, which adds json_schema replies."""
    args = {"device": "auto", **serve.args}
    return [sys.executable, "-m", "pipeline.teacher.transformers_server", model_dir, "--alias", alias,
            "--host", HOST, "--port", str(port), *option_flags(args)]


def vllm_command(model_dir: str, port: int, serve: ServeConfig, alias: str) -> list[str]:
    """`vllm serve MODEL` with its parallelism and memory settings; requests name the model by `alias`."""
    found = Path(sys.executable).with_name("vllm")
    cmd = [str(found) if found.exists() else (shutil.which("vllm") or "vllm"), "serve", model_dir,
           "--host", HOST, "--port", str(port), "--served-model-name", alias,
           "--tensor-parallel-size", str(serve.tensor_parallel_size),
           "--gpu-memory-utilization", str(serve.gpu_memory_utilization)]
    if serve.max_model_len is not None:
        cmd += ["--max-model-len", str(serve.max_model_len)]
    return cmd + option_flags(serve.args)


@contextmanager
def served_model(serve: ServeConfig, alias: str) -> Iterator[str]:
    """Serve `serve.model` on loopback until exit; yields the base URL (`http://127.0.0.1:P/v1`)."""
    model_dir = hf_model_dir(serve.model)  # a GGUF file becomes a model directory once (cached)
    port = free_port() if serve.port == "auto" else serve.port
    build = vllm_command if serve.server == "vllm" else transformers_command
    workdir = Path(tempfile.mkdtemp(prefix=f"distill-serve-{serve.server}-"))
    log_path = workdir / "server.log"
    with open(log_path, "wb") as out:
        child = processes.start(build(model_dir, port, serve, alias), stdout=out, stderr=out,
                                stdin=subprocess.DEVNULL, start_new_session=True)
    try:
        wait_ready(f"http://{HOST}:{port}", child, serve, log_path)
        yield f"http://{HOST}:{port}/v1"
    finally:
        child.stop()
    shutil.rmtree(workdir, ignore_errors=True)  # kept after a failure: the log says why


def wait_ready(url: str, child: processes.Child, serve: ServeConfig, log_path: Path) -> None:
    """Until /health and /v1/models answer 200; a server that exits or takes longer raises ServeError."""
    deadline = time.monotonic() + serve.startup_timeout_s
    pending = ["/health", "/v1/models"]
    while pending:
        if child.poll() is not None:
            raise ServeError(f"{serve.server} serving {serve.model} exited with code {child.returncode} before "
                             f"it answered (log: {log_path}):\n{_tail(log_path)}")
        if time.monotonic() > deadline:
            child.stop()
            raise ServeError(f"{serve.server} serving {serve.model} did not answer {pending[0]} within "
                             f"{serve.startup_timeout_s:.0f} s (serve.startup_timeout_s; log: {log_path}):\n"
                             f"{_tail(log_path)}")
        try:
            with urllib.request.urlopen(url + pending[0], timeout=5) as response:
                if response.status == 200:
                    pending.pop(0)
                    continue
        except OSError:
            pass
        time.sleep(0.25)


def _tail(path: Path, lines: int = 30) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


@contextmanager
def serving_at(cfg: TeacherConfig, url: str) -> Iterator[None]:
    """Until exit, `cfg`'s requests go to a server started elsewhere (one a test runs with its own counters)."""
    key = server_key(cfg)
    with _LOCK:
        _LIVE[key] = url
    try:
        yield
    finally:
        _forget(key)
