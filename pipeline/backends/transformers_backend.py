"""Batched generation with transformers (left padding), for CPU or one GPU and small models."""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

from pipeline.backends.base import BackendError, Completion, GenerationRequest, SamplingParams
from pipeline.backends.chat import PromptRenderer, stop_token_ids

if TYPE_CHECKING:
    from pipeline.core.recipe import PoolModel

log = logging.getLogger(__name__)


def _device(wanted: str) -> str:
    import torch

    if wanted != "auto":
        return wanted
    return "cuda" if torch.cuda.is_available() else "cpu"


def _dtype(wanted: str, device: str) -> Any:
    import torch

    if wanted != "auto":
        return getattr(torch, wanted)
    if device.startswith("cuda"):
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.float32


class TransformersBackend:
    """One model loaded once; `generate` runs it in batches of `batch_size`."""

    def __init__(self, model: PoolModel, path: str, chat_template: str | None = None):
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self.spec, self.path = model, path
        self.device = _device(model.device)
        try:
            self.tokenizer = AutoTokenizer.from_pretrained(path, padding_side="left")
            self.model = AutoModelForCausalLM.from_pretrained(path, dtype=_dtype(model.dtype, self.device))
        except (OSError, ValueError) as exc:
            raise BackendError(f"pool model '{model.name}': cannot load '{path}' with transformers ({exc})") from None
        if not (chat_template or self.tokenizer.chat_template):
            raise BackendError(f"pool model '{model.name}': the tokenizer at '{path}' has no chat template; "
                               "use a chat (instruction-tuned) model")
        self.renderer = PromptRenderer(self.tokenizer, chat_template)
        if self.tokenizer.pad_token is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        self.stop_ids = stop_token_ids(self.tokenizer, self.model.generation_config.eos_token_id)
        self.model.to(self.device).eval()
        self.limit = getattr(self.model.config.get_text_config(), "max_position_embeddings", None)
        log.info("sample: loaded %s (%s) on %s; stops on token ids %s; system turns: %s",
                 model.name, path, self.device, self.stop_ids, self.renderer.system)

    def generate(self, requests: list[GenerationRequest], params: SamplingParams) -> list[Completion]:
        """One completion per request; a prompt the template refuses or the model cannot hold fails alone."""
        out: list[Completion | None] = [None] * len(requests)
        ready: list[tuple[int, list[int], str, int]] = []  # (index, prompt ids, system placement, seed)
        for i, r in enumerate(requests):
            try:
                text, placement = self.renderer.render(r.messages)
            except Exception as exc:  # noqa: BLE001 - a template refusing this conversation fails this item only
                out[i] = Completion(error=f"chat template: {type(exc).__name__}: {exc}")
                continue
            ids = self.tokenizer(text, add_special_tokens=False)["input_ids"]
            if self.limit is not None and len(ids) >= self.limit:
                out[i] = Completion(error=f"prompt of {len(ids)} tokens leaves no room in the model's "
                                          f"{self.limit} positions")
            else:
                ready.append((i, ids, placement, r.seed))
        size = self.spec.batch_size
        for start in range(0, len(ready), size):
            batch = ready[start:start + size]
            for (i, *_), done in zip(batch, self._batch(batch, params), strict=True):
                out[i] = done
        return out  # type: ignore[return-value]  # every index is filled above

    def _batch(self, batch: list[tuple[int, list[int], str, int]], params: SamplingParams) -> list[Completion]:
        import torch

        enc = self.tokenizer.pad({"input_ids": [ids for _, ids, _, _ in batch]}, return_tensors="pt").to(self.device)
        width = enc["input_ids"].shape[1]
        max_new = params.max_tokens if self.limit is None else min(params.max_tokens, self.limit - width)
        sampling: dict[str, Any] = {"do_sample": False}
        if params.temperature > 0:
            sampling = {"do_sample": True, "temperature": params.temperature, "top_p": params.top_p}
        torch.manual_seed(batch[0][3])
        with torch.no_grad():
            generated = self.model.generate(**enc, max_new_tokens=max(1, max_new),
                                            pad_token_id=self.tokenizer.pad_token_id,
                                            eos_token_id=self.stop_ids, **sampling)
        out = []
        for row, (_, ids, placement, _) in zip(generated[:, width:].tolist(), batch, strict=True):
            stop = next((k for k, token in enumerate(row) if token in self.stop_ids), None)
            tokens = row[:stop] if stop is not None else row
            text = self.tokenizer.decode(tokens, skip_special_tokens=True).strip()
            out.append(Completion(text, "stop" if stop is not None else "length", len(ids), len(tokens),
                                  system_prompt_in=placement))
        return out

    def cost(self) -> dict[str, float]:
        return {}

    def close(self) -> None:
        import gc

        import torch

        del self.model
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
