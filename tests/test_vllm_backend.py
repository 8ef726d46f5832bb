"""The vllm adapter on a real GPU: two pool models one after the other, the first one's memory freed."""

from __future__ import annotations

import importlib.util

import pytest

from pipeline.backends.base import GenerationRequest, SamplingParams
from pipeline.core.recipe import PoolModel
from pipeline.tasks.toy.task import corpus, make_prompts
from pipeline.train.student import build_student


def _cuda() -> bool:
    try:
        import torch
    except ImportError:
        return False
    return torch.cuda.is_available()


pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(importlib.util.find_spec("vllm") is None or not _cuda(), reason="needs vllm and a CUDA GPU"),
]


def test_vllm_generates_for_two_models_in_turn_and_frees_memory(tmp_path):
    import torch

    from pipeline.backends.vllm_backend import VLLMBackend

    prompts = make_prompts(16, seed=0)
    requests = [GenerationRequest([{"role": "user", "content": p}], seed=i) for i, p in enumerate(prompts)]
    params = SamplingParams(temperature=1.0, top_p=1.0, max_tokens=8)
    free_before = torch.cuda.mem_get_info()[0]
    for seed in (0, 1):
        path = build_student(tmp_path / f"m{seed}", corpus(300, seed=seed), seed=seed)
        backend = VLLMBackend(PoolModel(name=f"m{seed}", backend="vllm", model=str(path), dtype="float32",
                                        gpu_memory_utilization=0.3, max_model_len=256), str(path))
        out = backend.generate(requests, params)
        backend.close()
        assert len(out) == 16 and all(c.finish_reason in ("stop", "length") and c.error is None for c in out)
        assert sum(c.completion_tokens for c in out) > 0
        # the engine's memory is given back before the next model loads
        assert torch.cuda.mem_get_info()[0] > free_before - 2 * 2**30
