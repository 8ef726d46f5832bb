"""Batched generation with transformers (left padding), for CPU or one GPU and small models."""

from __future__ import annotations

import logging
from typing import Any

from pipeline.backends.base import BackendError, Completion, GenerationRequest, SamplingParams
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

    def __init__(self, model: PoolModel, path: str):
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self.spec, self.path = model, path
        self.device = _device(model.device)
        try:
            self.tokenizer = AutoTokenizer.from_pretrained(path, padding_side="left")
            self.model = AutoModelForCausalLM.from_pretrained(path, dtype=_dtype(model.dtype, self.device))
        except (OSError, ValueError) as exc:
            raise BackendError(f"pool model '{model.name}': cannot load '{path}' with transformers ({exc})") from None
        if not self.tokenizer.chat_template:
            raise BackendError(f"pool model '{model.name}': the tokenizer at '{path}' has no chat template; "
                               "use a chat (instruction-tuned) model")
        if self.tokenizer.pad_token is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        self.model.to(self.device).eval()
        self.limit = getattr(self.model.config.get_text_config(), "max_position_embeddings", None)
        log.info("sample: loaded %s (%s) on %s", model.name, path, self.device)

    def _render(self, messages: list[dict[str, str]]) -> str:
        try:
            return self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        except Exception:  # noqa: BLE001 - some templates refuse a system turn: fold it into the user turn
            if messages[0]["role"] != "system":
                raise
            system, user, *rest = messages
            merged = {"role": "user", "content": f"{system['content']}\n\n{user['content']}"}
            return self.tokenizer.apply_chat_template([merged, *rest], tokenize=False, add_generation_prompt=True)

    def generate(self, requests: list[GenerationRequest], params: SamplingParams) -> list[Completion]:
        out: list[Completion] = []
        size = self.spec.batch_size
        for start in range(0, len(requests), size):
            out += self._batch(requests[start:start + size], params)
        return out

    def _batch(self, batch: list[GenerationRequest], params: SamplingParams) -> list[Completion]:
        import torch

        texts = [self._render(r.messages) for r in batch]
        enc = self.tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False).to(self.device)
        width = enc["input_ids"].shape[1]
        max_new = params.max_tokens if self.limit is None else min(params.max_tokens, self.limit - width)
        if max_new <= 0:
            why = f"prompt of {width} tokens leaves no room in the model's {self.limit} positions"
            return [Completion(error=why) for _ in batch]
        sampling: dict[str, Any] = {"do_sample": False}
        if params.temperature > 0:
            sampling = {"do_sample": True, "temperature": params.temperature, "top_p": params.top_p}
        torch.manual_seed(batch[0].seed)
        eos = self.tokenizer.eos_token_id
        with torch.no_grad():
            generated = self.model.generate(**enc, max_new_tokens=max_new, pad_token_id=self.tokenizer.pad_token_id,
                                            eos_token_id=eos, **sampling)
        out = []
        for row, mask in zip(generated[:, width:].tolist(), enc["attention_mask"].tolist(), strict=True):
            stop = row.index(eos) if eos in row else None
            tokens = row[:stop] if stop is not None else row
            text = self.tokenizer.decode(tokens, skip_special_tokens=True).strip()
            out.append(Completion(text, "stop" if stop is not None else "length", int(sum(mask)), len(tokens)))
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
