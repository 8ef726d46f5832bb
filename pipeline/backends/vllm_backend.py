"""vLLM's offline engine on a GPU worker: one model at a time, its memory freed before the next."""

from __future__ import annotations

import gc
import logging

from pipeline.backends.base import BackendError, Completion, GenerationRequest, SamplingParams
from pipeline.core.recipe import PoolModel

log = logging.getLogger(__name__)


class VLLMBackend:
    """`vllm.LLM` over one pool model; `chat` applies the model's own chat template."""

    def __init__(self, model: PoolModel, path: str):
        try:
            import vllm
        except ImportError:
            raise BackendError(f"pool model '{model.name}' uses the vllm backend but vllm is not installed; "
                               "pip install 'zephyr-distill[gpu]' on a GPU worker") from None
        kwargs: dict[str, object] = {"tensor_parallel_size": model.tensor_parallel_size,
                                     "gpu_memory_utilization": model.gpu_memory_utilization, "dtype": model.dtype}
        if model.max_model_len is not None:
            kwargs["max_model_len"] = model.max_model_len
        self.spec = model
        self.llm = vllm.LLM(model=path, **kwargs)
        log.info("sample: vllm loaded %s (%s), tp=%d", model.name, path, model.tensor_parallel_size)

    def generate(self, requests: list[GenerationRequest], params: SamplingParams) -> list[Completion]:
        from vllm import SamplingParams as VSampling

        sampling = [VSampling(temperature=params.temperature, top_p=params.top_p, max_tokens=params.max_tokens,
                              seed=r.seed) for r in requests]
        outputs = self.llm.chat([r.messages for r in requests], sampling, use_tqdm=False)
        done = []
        for out in outputs:
            best = out.outputs[0]
            done.append(Completion(best.text.strip(), "length" if best.finish_reason == "length" else "stop",
                                   len(out.prompt_token_ids or []), len(best.token_ids)))
        return done

    def cost(self) -> dict[str, float]:
        return {}

    def close(self) -> None:
        """Free the GPU for the next model: tear down the engine and its parallel groups."""
        import torch

        try:
            from vllm.distributed.parallel_state import (
                destroy_distributed_environment,
                destroy_model_parallel,
            )

            destroy_model_parallel()
            destroy_distributed_environment()
        except ImportError:  # layout of older/newer vllm releases
            pass
        del self.llm
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
