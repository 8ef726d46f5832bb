"""The GPU check's model: Qwen2.5-0.5B's architecture built from its config (random weights) with a byte-level BPE
tokenizer trained here with Qwen's special tokens and chat template, its FLOPs per token for MFU, and its data."""

from __future__ import annotations

import random
import time
from pathlib import Path
from typing import Any

# Qwen2.5-0.5B's shape: 24 layers, hidden 896, 14 query / 2 key-value heads, MLP 4864, vocab 151 936, tied embeddings
QWEN2_05B = {"hidden_size": 896, "intermediate_size": 4864, "num_hidden_layers": 24, "num_attention_heads": 14,
             "num_key_value_heads": 2, "vocab_size": 151936, "tie_word_embeddings": True,
             "max_position_embeddings": 4096, "rope_theta": 1000000.0, "rms_norm_eps": 1e-6}
SMOKE = {**QWEN2_05B, "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
         "num_key_value_heads": 2, "vocab_size": 1024}
PEAK_BF16_TFLOPS = {"H200": 989.0, "H100": 989.0, "H800": 989.0, "H20": 148.0, "A100": 312.0, "L40S": 362.0,
                    "A10G": 125.0, "L4": 121.0}
QWEN_SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
WORDS = ("the model answers each question with care and a number when asked what is seven plus five it says "
         "twelve because adding is counting on and the teacher rates every answer before the student learns").split()


def model_config(shape: dict[str, Any], ids: dict[str, int]) -> Any:
    """A Qwen2Config of the given shape with the tokenizer's special token ids."""
    from transformers import Qwen2Config

    return Qwen2Config(**shape, bos_token_id=None, eos_token_id=ids["eos"], pad_token_id=ids["pad"])


def parameter_count(config: Any) -> int:
    """Parameters of the model the config describes, counted on the meta device (no memory used)."""
    import torch
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    return sum(p.numel() for p in model.parameters())


def matmul_params(config: Any, params: int) -> int:
    """Weights a token is multiplied by: every parameter except the embedding lookup (the output projection,
    tied or not, is one matmul) and the norms' scales."""
    untied = 0 if config.tie_word_embeddings else config.vocab_size * config.hidden_size
    norms = (2 * config.num_hidden_layers + 1) * config.hidden_size
    return params - untied - norms


def flops_per_token(config: Any, params: int, seq: int, passes: int = 3) -> float:
    """Model FLOPs per token: 2·(matmul weights) per forward pass plus attention's scores and mixing
    (2·2·layers·seq·heads·head_dim, counted for the full square as PaLM's MFU does); `passes` 3 = forward and
    backward (training), 1 = forward only."""
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    attention = 4 * config.num_hidden_layers * seq * config.num_attention_heads * head_dim
    return passes * (2 * matmul_params(config, params) + attention)


def peak_tflops(device_name: str) -> float | None:
    return next((v for k, v in PEAK_BF16_TFLOPS.items() if k in device_name), None)


def text(rng: random.Random, words: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(words))


def dialogues(n: int, words: int, seed: int = 0, varied: bool = False) -> list[list[dict[str, str]]]:
    """Two-round dialogues of about `words` words per turn; `varied`: one to three rounds of words/4 to 2·words
    words a turn, so batches need padding as real dialogues do (UltraChat's run from one round to seven)."""
    rng = random.Random(seed)
    if not varied:
        return [[{"role": role, "content": text(rng, words)} for role in ("user", "assistant", "user", "assistant")]
                for _ in range(n)]
    return [[{"role": role, "content": text(rng, rng.randint(words // 4, 2 * words))}
             for _ in range(rng.randint(1, 3)) for role in ("user", "assistant")] for _ in range(n)]


def preference_pairs(n: int, words: int, seed: int = 1) -> list[dict[str, Any]]:
    """Pairs in TRL's explicit form whose prompt and answers run from words/4 to 2·words words."""
    rng = random.Random(seed)

    def turn(role: str) -> list[dict[str, str]]:
        return [{"role": role, "content": text(rng, rng.randint(words // 4, 2 * words))}]

    return [{"prompt": turn("user"), "chosen": turn("assistant"), "rejected": turn("assistant")} for _ in range(n)]


def attention_length(lengths: list[int], max_length: int) -> int:
    """The sequence length attention's FLOPs per token are counted at: sum(L²) / sum(L) over the (truncated)
    sequences, as attention over a sequence of L tokens costs ∝ L per token (the mean for equal lengths)."""
    cut = [min(n, max_length) for n in lengths]
    return round(sum(n * n for n in cut) / sum(cut))


def build(out: Path, smoke: bool) -> dict[str, Any]:
    """The random-weight Qwen2 model and a local BPE tokenizer with Qwen2.5's chat template, saved to out/model."""
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast

    from pipeline.train.templates import family_template

    t0 = time.perf_counter()
    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=2048 if not smoke else 512, special_tokens=QWEN_SPECIALS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    rng = random.Random(0)
    backend.train_from_iterator([text(rng, 40) for _ in range(2000)], trainer=trainer)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                                        additional_special_tokens=["<|im_start|>"],
                                        chat_template=family_template("qwen2_5"))
    ids = {"eos": tokenizer.convert_tokens_to_ids("<|im_end|>"), "pad": tokenizer.convert_tokens_to_ids("<|endoftext|>")}
    config = model_config(SMOKE if smoke else QWEN2_05B, ids)
    torch.manual_seed(0)
    with torch.device("cuda" if torch.cuda.is_available() and not smoke else "cpu"):  # 0.5B initialise fast there
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32 if smoke else torch.bfloat16)
    model.generation_config.eos_token_id = [ids["eos"], ids["pad"]]
    model.save_pretrained(out / "model")
    tokenizer.save_pretrained(out / "model")
    params = sum(p.numel() for p in model.parameters())
    return {"params_millions": round(params / 1e6, 1), "seconds": round(time.perf_counter() - t0, 1),
            "tokenizer_vocab": len(tokenizer), "dtype": str(model.dtype)}
