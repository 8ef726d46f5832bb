"""Tiny random-weight students of real model families, built offline: each family's own chat template text (TRL's
package data, or written from the model card), its special tokens in a small byte-level BPE vocabulary, its
architecture from a small config, and its generation config's list of end-of-sequence tokens."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pipeline.train.templates import family_template

CORPUS = [
    "What is 2 + 3? It is 5.", "And 4 + 4? 8", "Answer briefly.", "Because 4 + 4 = 8.", "add them",
    "Hello there, how are you doing today? I am fine, thank you.", "Compute 7 minus 2. The answer is 5.",
    "Be honest about what you do not know.", "Subtract 3 from 9, please: 6.",
] * 20


@dataclass(frozen=True)
class Family:
    """One family: its chat format, architecture, special tokens and what ends a turn."""

    name: str  # the chat format (pipeline.train.templates.FAMILIES)
    arch: str  # llama, qwen2, qwen3, mistral, gemma2, gemma3, phi3
    specials: tuple[str, ...]
    eos: str
    eot: str  # the token every answer ends with (what the model stops on)
    bos: str | None = None
    pad: str | None = None
    stop: tuple[str, ...] = ()  # generation_config.eos_token_id, as tokens
    added: tuple[str, ...] = ()  # added tokens that are not special (Qwen3's <think>)
    extra: dict[str, Any] = field(default_factory=dict)


LLAMA3 = ("<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>",
          "<|eom_id|>", "<|python_tag|>")
CHATML = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")
GEMMA = ("<pad>", "<eos>", "<bos>", "<unk>", "<start_of_turn>", "<end_of_turn>")
SENTENCEPIECE = ("<unk>", "<s>", "</s>")

FAMILIES: dict[str, Family] = {f.name: f for f in [
    Family("llama3", "llama", LLAMA3, "<|eot_id|>", "<|eot_id|>", bos="<|begin_of_text|>",
           stop=("<|end_of_text|>", "<|eot_id|>")),
    Family("llama3_1", "llama", LLAMA3, "<|eot_id|>", "<|eot_id|>", bos="<|begin_of_text|>",
           stop=("<|end_of_text|>", "<|eom_id|>", "<|eot_id|>")),
    Family("llama3_2", "llama", LLAMA3, "<|eot_id|>", "<|eot_id|>", bos="<|begin_of_text|>",
           stop=("<|end_of_text|>", "<|eom_id|>", "<|eot_id|>")),
    Family("qwen2", "qwen2", CHATML, "<|im_end|>", "<|im_end|>", pad="<|endoftext|>",
           stop=("<|im_end|>", "<|endoftext|>")),
    Family("qwen2_5", "qwen2", CHATML, "<|im_end|>", "<|im_end|>", pad="<|endoftext|>",
           stop=("<|im_end|>", "<|endoftext|>")),
    Family("qwen3", "qwen3", CHATML, "<|im_end|>", "<|im_end|>", pad="<|endoftext|>",
           stop=("<|im_end|>", "<|endoftext|>"), added=("<think>", "</think>")),
    Family("mistral", "mistral", SENTENCEPIECE, "</s>", "</s>", bos="<s>"),
    Family("mistral_v3", "mistral", (*SENTENCEPIECE, "[INST]", "[/INST]"), "</s>", "</s>", bos="<s>"),
    Family("gemma", "gemma2", GEMMA, "<eos>", "<end_of_turn>", bos="<bos>", pad="<pad>",
           stop=("<eos>", "<end_of_turn>")),
    Family("gemma3", "gemma3", GEMMA, "<eos>", "<end_of_turn>", bos="<bos>", pad="<pad>",
           stop=("<eos>", "<end_of_turn>")),
    Family("phi3", "phi3", (*SENTENCEPIECE, "<|endoftext|>", "<|assistant|>", "<|end|>", "<|system|>", "<|user|>"),
           "<|endoftext|>", "<|end|>", bos="<s>", stop=("<|endoftext|>", "<|assistant|>", "<|end|>")),
    Family("phi3_5", "phi3", (*SENTENCEPIECE, "<|endoftext|>", "<|assistant|>", "<|end|>", "<|system|>",
                              "<|user|>"), "<|endoftext|>", "<|end|>", bos="<s>",
           stop=("<|endoftext|>", "<|assistant|>", "<|end|>")),
    Family("phi4", "phi3", (*CHATML, "<|im_sep|>"), "<|im_end|>", "<|im_end|>", pad="<|endoftext|>",
           stop=("<|im_end|>",)),
    Family("zephyr", "mistral", SENTENCEPIECE, "</s>", "</s>", bos="<s>"),
    Family("chatml", "llama", CHATML, "<|im_end|>", "<|im_end|>", pad="<|endoftext|>"),
]}


def family_tokenizer(family: Family, template: str | None) -> Any:
    """A 320-token byte-level BPE holding the family's special tokens, with `template` as its chat template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=320, special_tokens=list(family.specials), show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    backend.train_from_iterator(CORPUS, trainer=trainer)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, bos_token=family.bos, eos_token=family.eos,
                                        pad_token=family.pad, chat_template=template,
                                        additional_special_tokens=[t for t in family.specials
                                                                   if t not in (family.bos, family.eos, family.pad)])
    if family.added:
        tokenizer.add_tokens(list(family.added))
    return tokenizer


def _config(family: Family, vocab: int, ids: dict[str, int | None]) -> Any:
    import transformers as tf

    tiny = {"vocab_size": vocab, "hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 1,
            "num_attention_heads": 2, "num_key_value_heads": 1, "max_position_embeddings": 512,
            "bos_token_id": ids["bos"], "eos_token_id": ids["eos"], "pad_token_id": ids["pad"]}
    if family.arch in ("qwen2", "qwen3", "mistral", "gemma2", "gemma3", "llama"):
        tiny["head_dim"] = 8
    classes = {"llama": (tf.LlamaConfig, tf.LlamaForCausalLM), "qwen2": (tf.Qwen2Config, tf.Qwen2ForCausalLM),
               "qwen3": (tf.Qwen3Config, tf.Qwen3ForCausalLM), "mistral": (tf.MistralConfig, tf.MistralForCausalLM),
               "gemma2": (tf.Gemma2Config, tf.Gemma2ForCausalLM),
               "gemma3": (tf.Gemma3TextConfig, tf.Gemma3ForCausalLM), "phi3": (tf.Phi3Config, tf.Phi3ForCausalLM)}
    config_cls, model_cls = classes[family.arch]
    return model_cls, config_cls(**tiny, **family.extra)


def build_family_model(family: Family, out_dir: Path, template: str | None = "native", seed: int = 0) -> Path:
    """Save a random-weight model of `family` with its tokenizer (its own template, `template`, or none)."""
    import torch

    text = family_template(family.name) if template == "native" else template
    tokenizer = family_tokenizer(family, text)
    ids = {k: tokenizer.convert_tokens_to_ids(getattr(family, k)) if getattr(family, k) else None
           for k in ("bos", "eos", "pad")}
    model_cls, config = _config(family, len(tokenizer), ids)
    torch.manual_seed(seed)
    model = model_cls(config)
    model.generation_config.eos_token_id = [tokenizer.convert_tokens_to_ids(t) for t in family.stop] or ids["eos"]
    model.generation_config.bos_token_id, model.generation_config.pad_token_id = ids["bos"], ids["pad"]
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    return out_dir


def load_tokenizer(path: Path) -> Any:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(path))
