"""GPU readiness, one part per call (benchmarks/gpu_check.sh runs them, each under its own time limit):

    python benchmarks/gpu_check.py preflight|env|build|sft|dpo|sample|vllm|summary --out DIR [--smoke]

`build` makes a ~0.5B Qwen2-architecture model from its config (Qwen2.5-0.5B's shape, random weights, bf16) and a
byte-level BPE tokenizer trained here with Qwen's special tokens and chat template (no downloads). `sft` and `dpo`
train it with TRL as the stages do (the student's own chat format, bf16, activation checkpointing) for a fixed time
per row, with and without each fast-path option (benchmarks/gpu_fastpath.py), and report tokens/s, peak memory and
MFU; `sample` runs the sample stage with the transformers backend on the GPU (or the backend alone where the
stage's dependencies are missing); `vllm` the vLLM backend, when vllm imports. Each part writes DIR/<part>.json
(and each training row DIR/<row>.json); `summary` prints one table of the parts and one of the rows side by side.
`--smoke` runs a tiny copy on the CPU.

Needs torch, transformers, trl, datasets, tokenizers; uses nothing newer than torch 2.11 / transformers 5.17.
"""

from __future__ import annotations

import argparse
import json
import platform
import random
import sys
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE.parent), str(HERE)]  # the package and gpu_model, however the script is started

from gpu_fastpath import run_rows, table  # noqa: E402 - on the path set above
from gpu_model import build, peak_tflops, text  # noqa: E402 - on the path set above

from pipeline.train.fastpath import available_kernels  # noqa: E402 - on the path set above

PARTS = ("env", "build", "sft", "dpo", "sample", "vllm")


def _pool_model(name: str, backend: str, path: Path, smoke: bool, **kwargs: Any) -> Any:
    """A recipe PoolModel where the recipe's dependencies import, else an object with the same fields."""
    fields = {"name": name, "backend": backend, "model": str(path), "temperature": 1.0, "top_p": 1.0, "max_tokens": 128,
              "batch_size": 64, "device": "cpu" if smoke else "cuda", "dtype": "auto", "tensor_parallel_size": 1,
              "gpu_memory_utilization": 0.4, "max_model_len": 2048, "engine_args": {}, "chat_template": None,
              "principles": True, **kwargs}
    try:
        from pipeline.core.recipe import PoolModel
    except ImportError:
        from types import SimpleNamespace

        return SimpleNamespace(**fields)
    return PoolModel(**fields)


def _prompts(n: int) -> list[str]:
    rng = random.Random(2)
    return [f"What is {rng.randint(1, 99)} plus {rng.randint(1, 99)}? " + text(rng, 8) for _ in range(n)]


def sample(out: Path, smoke: bool, seconds: float) -> dict[str, Any]:
    """The sample stage with a transformers pool member on the GPU; the backend alone where the stage cannot
    import (the recipe, store and task need pydantic, pyarrow, fsspec)."""
    source = out / "sft" if (out / "sft" / "config.json").is_file() else out / "model"
    n, max_tokens = (8, 16) if smoke else (128, 128)
    try:
        from pipeline.core.recipe import recipe_from_dict
        from pipeline.run.runner import open_run, run_stage
    except ImportError as exc:
        return {**_sample_backend(source, smoke, n, max_tokens), "path": f"backend only (no {exc.name})"}
    prompts = out / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in _prompts(n)))
    pool = [{"name": "student", "backend": "transformers", "model": str(source), "max_tokens": max_tokens,
             "batch_size": 64, "device": "cpu" if smoke else "cuda", "temperature": 1.0}]
    # the task by module path: the package may be on PYTHONPATH without being installed (no entry points)
    recipe = recipe_from_dict({"name": "gpu-check", "task": "pipeline.tasks.toy.plugin:ArithmeticTask",
                               "prompts": {"source": str(prompts)},
                               "sample": {"k": 1, "pool": pool, "principles": {"default": ["helpfulness"]}},
                               "storage": {"root": str(out / "runs")}})
    store = open_run(recipe, "gpu-check")
    t0 = time.perf_counter()
    report = run_stage("sample", recipe, store, force=True)
    wall = time.perf_counter() - t0
    rows = list(store.read_records("sample", "completions", columns=["completion_tokens", "system_prompt_in"]))
    tokens = sum(r["completion_tokens"] for r in rows)
    return {"path": "sample stage", "stage_status": report.status, "answers": len(rows), "tokens": tokens,
            "stage_seconds": round(wall, 2), "tokens_per_s": round(tokens / wall),
            "system_prompt_in": sorted({r["system_prompt_in"] for r in rows}), **_memory()}


def _sample_backend(source: Path, smoke: bool, n: int, max_tokens: int) -> dict[str, Any]:
    from pipeline.backends.base import GenerationRequest, SamplingParams
    from pipeline.backends.transformers_backend import TransformersBackend

    backend = TransformersBackend(_pool_model("student", "transformers", source, smoke), str(source))
    requests = [GenerationRequest([{"role": "user", "content": p}], seed=i) for i, p in enumerate(_prompts(n))]
    t0 = time.perf_counter()
    done = backend.generate(requests, SamplingParams(1.0, 1.0, max_tokens))
    wall = time.perf_counter() - t0
    backend.close()
    tokens = sum(c.completion_tokens for c in done)
    return {"answers": len(done), "failed": sum(c.error is not None for c in done), "tokens": tokens,
            "seconds": round(wall, 2), "tokens_per_s": round(tokens / wall), **_memory()}


def vllm_part(out: Path, smoke: bool, seconds: float) -> dict[str, Any]:
    """The vLLM backend on the SFT model: engine start, then 256 answers with per-answer seeds."""
    import importlib.util

    if importlib.util.find_spec("vllm") is None:
        return {"skipped": "vllm does not import here"}
    from pipeline.backends.base import GenerationRequest, SamplingParams
    from pipeline.backends.vllm_backend import VLLMBackend

    source = out / "sft" if (out / "sft" / "config.json").is_file() else out / "model"
    t0 = time.perf_counter()
    member = _pool_model("student", "vllm", source, smoke, engine_args={"enforce_eager": True})
    backend = VLLMBackend(member, str(source))
    started = time.perf_counter() - t0
    requests = [GenerationRequest([{"role": "user", "content": p}], seed=i) for i, p in enumerate(_prompts(256))]
    t1 = time.perf_counter()
    done = backend.generate(requests, SamplingParams(1.0, 1.0, 128))
    wall = time.perf_counter() - t1
    backend.close()
    tokens = sum(c.completion_tokens for c in done)
    return {"engine_start_s": round(started, 1), "answers": len(done), "failed": sum(c.error is not None for c in done),
            "tokens": tokens, "seconds": round(wall, 2), "tokens_per_s": round(tokens / wall)}


def _memory() -> dict[str, Any]:
    import torch

    if not torch.cuda.is_available():
        return {}
    return {"peak_mem_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2)}


def environment(out: Path, smoke: bool, seconds: float) -> dict[str, Any]:
    import importlib.metadata

    import torch

    versions = {}
    for dist in ("torch", "transformers", "trl", "datasets", "accelerate", "peft", "vllm", "pydantic", "pyarrow",
                 "flash-attn", "flash-attn-3", "liger-kernel"):
        try:
            versions[dist] = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            versions[dist] = None
    gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else None
    kernels = available_kernels("cpu" if smoke else "cuda")  # what the stages' fast path finds here
    return {"python": platform.python_version(), "gpu": gpu, "gpus": torch.cuda.device_count(),
            "peak_bf16_tflops": peak_tflops(gpu or ""), "flash_attention": list(kernels.flash) or None,
            "liger": kernels.liger, "versions": versions}


def preflight(smoke: bool) -> str | None:
    """Why the check cannot measure anything here (a missing library, no CUDA), or None."""
    import importlib.util

    missing = [m for m in ("torch", "transformers", "trl", "datasets", "accelerate")
               if importlib.util.find_spec(m) is None]
    if missing:
        return f"{sys.executable} cannot import {', '.join(missing)}; install them (or set PYTHON=...)"
    import torch

    if not smoke and not torch.cuda.is_available():
        return (f"CUDA is not available (torch {torch.__version__}, built for CUDA {torch.version.cuda}, "
                f"{torch.cuda.device_count()} devices): this check needs a GPU; GPU_CHECK_SMOKE=1 checks the "
                f"script on the CPU")
    return None


def summary(out: Path) -> tuple[str, bool]:
    """(one table of every part: status and its numbers, whether every part ran: ok or skipped)."""
    rows = []
    for part in PARTS:
        path = out / f"{part}.json"
        result = json.loads(path.read_text()) if path.is_file() else {"status": "not run (timed out or crashed)"}
        status = result.pop("status", "skipped" if "skipped" in result else "ok")
        numbers = ", ".join(f"{k}={v}" for k, v in result.items() if k not in ("versions", "error", "settings", "base", "options", "stage_choice"))
        rows.append((part, status, result.get("error") or numbers))
    env = json.loads((out / "env.json").read_text()) if (out / "env.json").is_file() else {}
    versions = ", ".join(f"{k} {v}" for k, v in (env.get("versions") or {}).items() if v)
    lines = [f"GPU check: {env.get('gpu')} x{env.get('gpus')} ({versions})", "",
             f"{'part':<8} {'status':<10} numbers", f"{'-' * 8} {'-' * 10} {'-' * 60}"]
    lines += [f"{part:<8} {status:<10} {numbers}" for part, status, numbers in rows]
    lines += ["", *table(out)]
    return "\n".join(lines), all(status in ("ok", "skipped") for _, status, _ in rows)


RUNNERS = {"env": environment, "build": lambda out, smoke, seconds: build(out, smoke),
           "sft": lambda out, smoke, seconds: run_rows("sft", out, smoke, seconds),
           "dpo": lambda out, smoke, seconds: run_rows("dpo", out, smoke, seconds), "sample": sample, "vllm": vllm_part}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("part", choices=(*PARTS, "preflight", "summary"))
    parser.add_argument("--out", type=Path, required=True, help="working directory shared by the parts")
    parser.add_argument("--seconds", type=float, default=45.0, help="training time per training part")
    parser.add_argument("--smoke", action="store_true", help="a tiny model on the CPU: checks the script itself")
    opts = parser.parse_args(argv)
    if opts.part == "preflight":
        problem = preflight(opts.smoke)
        if problem:
            print(f"gpu_check: {problem}", file=sys.stderr)
        return 2 if problem else 0
    opts.out.mkdir(parents=True, exist_ok=True)
    if opts.part == "summary":
        table, complete = summary(opts.out)
        print(table)
        return 0 if complete else 1
    t0 = time.perf_counter()
    try:
        result = {"status": "ok", **RUNNERS[opts.part](opts.out, opts.smoke, opts.seconds)}
    except Exception as exc:  # noqa: BLE001 - the table reports each part's failure; the others still run
        result = {"status": "failed", "error": f"{type(exc).__name__}: {str(exc)[:300]}"}
    if "skipped" in result:
        result["status"] = "skipped"
    result["wall_s"] = round(time.perf_counter() - t0, 1)
    (opts.out / f"{opts.part}.json").write_text(json.dumps(result, indent=2))
    print(json.dumps(result))
    return 0 if result["status"] != "failed" else 1


if __name__ == "__main__":
    sys.exit(main())
