"""vLLM's offline engine on a GPU worker: one model at a time, its memory freed before the next.

Prompts are rendered here with the model's own chat template (a refused system turn folded into the user turn)
and handed to the engine as token ids, so a conversation the template refuses or a prompt longer than the
engine holds fails alone, into the failure ledger, instead of failing the whole batch."""

from __future__ import annotations

import gc
import logging
from typing import TYPE_CHECKING, Any

from pipeline.backends.base import BackendError, Completion, GenerationRequest, SamplingParams
from pipeline.backends.chat import PromptRenderer, generation_eos, stop_token_ids

if TYPE_CHECKING:
    from pipeline.core.recipe import PoolModel

log = logging.getLogger(__name__)


def engine_kwargs(model: PoolModel) -> dict[str, Any]:
    """`vllm.LLM` arguments from a pool model: parallelism, memory share, context, dtype, then `engine_args`."""
    kwargs: dict[str, Any] = {"tensor_parallel_size": model.tensor_parallel_size,
                              "gpu_memory_utilization": model.gpu_memory_utilization, "dtype": model.dtype}
    if model.max_model_len is not None:
        kwargs["max_model_len"] = model.max_model_len
    return {**kwargs, **model.engine_args}


class VLLMBackend:
    """`vllm.LLM` over one pool model."""

    def __init__(self, model: PoolModel, path: str, chat_template: str | None = None):
        try:
            import vllm
        except ImportError:
            raise BackendError(f"pool model '{model.name}' uses the vllm backend but vllm is not installed; "
                               "pip install 'zephyr-distill[gpu]' on a GPU worker") from None
        self.spec = model
        self.llm = vllm.LLM(model=path, **engine_kwargs(model))
        self.renderer = PromptRenderer(self.llm.get_tokenizer(), chat_template)
        self.stop_ids = stop_token_ids(self.renderer.tokenizer, generation_eos(path))
        self.max_len = _engine_max_len(self.llm) or model.max_model_len
        log.info("sample: vllm loaded %s (%s), tp=%d, max_model_len=%s, stops on %s, system turns: %s",
                 model.name, path, model.tensor_parallel_size, self.max_len, self.stop_ids, self.renderer.system)

    def generate(self, requests: list[GenerationRequest], params: SamplingParams) -> list[Completion]:
        """One completion per request: the batch goes to the engine at once; if the engine refuses it, each
        request goes alone, and the ones it refuses fail with the engine's reason."""
        out: list[Completion | None] = [None] * len(requests)
        ready: list[tuple[int, list[int], Any, str]] = []
        for i, r in enumerate(requests):
            prepared = self._prepare(r, params)
            if isinstance(prepared, Completion):
                out[i] = prepared
            else:
                ready.append((i, *prepared))
        if ready:
            try:
                results = self._run([(ids, sampling) for _, ids, sampling, _ in ready])
            except Exception as exc:  # noqa: BLE001 - one bad request fails the engine's whole call
                log.warning("sample: vllm refused a batch (%s: %s); answering its %d requests one by one",
                            type(exc).__name__, exc, len(ready))
                results = [self._alone(ids, sampling) for _, ids, sampling, _ in ready]
            for (i, ids, _, placement), result in zip(ready, results, strict=True):
                out[i] = result if isinstance(result, Completion) else _completion(result, len(ids), placement)
        return out  # type: ignore[return-value]  # every index is filled above

    def _prepare(self, r: GenerationRequest, params: SamplingParams) -> Completion | tuple[list[int], Any, str]:
        """(prompt ids, sampling params, system placement), or the Completion saying why this request fails."""
        from vllm import SamplingParams as EngineSampling

        try:
            text, placement = self.renderer.render(r.messages)
        except Exception as exc:  # noqa: BLE001 - a template refusing this conversation fails this item only
            return Completion(error=f"chat template: {type(exc).__name__}: {exc}")
        ids = self.renderer.tokenizer(text, add_special_tokens=False)["input_ids"]
        room = params.max_tokens if self.max_len is None else min(params.max_tokens, self.max_len - len(ids))
        if room <= 0:
            return Completion(error=f"prompt of {len(ids)} tokens leaves no room in max_model_len={self.max_len}")
        sampling = EngineSampling(temperature=params.temperature, top_p=params.top_p, max_tokens=room,
                                  seed=r.seed, stop_token_ids=self.stop_ids)
        return ids, sampling, placement

    def _run(self, batch: list[tuple[list[int], Any]]) -> list[Any]:
        prompts = [{"prompt_token_ids": ids} for ids, _ in batch]
        return list(self.llm.generate(prompts, [sampling for _, sampling in batch], use_tqdm=False))

    def _alone(self, ids: list[int], sampling: Any) -> Any:
        try:
            return self._run([(ids, sampling)])[0]
        except Exception as exc:  # noqa: BLE001 - the engine's reason goes to the failure ledger
            return Completion(error=f"vllm: {type(exc).__name__}: {exc}")

    def cost(self) -> dict[str, float]:
        return {}

    def close(self) -> None:
        """Free the GPU for the next model: shut the engine down, drop it, tear down its parallel groups."""
        llm, self.llm = self.llm, None
        for owner in (getattr(getattr(llm, "llm_engine", None), "engine_core", None), getattr(llm, "llm_engine", None)):
            shutdown = getattr(owner, "shutdown", None)
            if callable(shutdown):
                try:
                    shutdown()
                except Exception as exc:  # noqa: BLE001 - freeing memory must not fail the finished stage
                    log.warning("sample: vllm engine shutdown: %s: %s", type(exc).__name__, exc)
                break
        del llm
        self.renderer = None  # type: ignore[assignment]  # holds the engine's tokenizer
        gc.collect()
        try:
            from vllm.distributed.parallel_state import (
                destroy_distributed_environment,
                destroy_model_parallel,
            )

            destroy_model_parallel()
            destroy_distributed_environment()
        except ImportError:  # layout of older/newer vllm releases
            pass
        try:
            import torch
        except ImportError:
            return
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


def _engine_max_len(llm: Any) -> int | None:
    """The context the engine was built with (vLLM derives it from the model when max_model_len is unset)."""
    config = getattr(getattr(llm, "llm_engine", None), "model_config", None)
    value = getattr(config, "max_model_len", None)
    return int(value) if value else None


def _completion(result: Any, prompt_tokens: int, placement: str) -> Completion:
    best = result.outputs[0]
    finish = "length" if best.finish_reason == "length" else "stop"
    return Completion(best.text.strip(), finish, prompt_tokens, len(best.token_ids), system_prompt_in=placement)
