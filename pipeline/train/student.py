"""The built-in tiny student (`sft.model: builtin:tiny`): a byte-level BPE tokenizer trained on the task's texts
and a small randomly initialised Llama, built offline."""

from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path
from typing import Any

from pipeline.core.recipe import Recipe, TinyStudentConfig
from pipeline.core.sources import iter_prompts
from pipeline.core.task import load_task

log = logging.getLogger("pipeline.train")

SYSTEM, USER, ASSISTANT, END, PAD = "<|system|>", "<|user|>", "<|assistant|>", "<|end|>", "<|pad|>"
SPECIAL_TOKENS = [PAD, SYSTEM, USER, ASSISTANT, END]

# The generation markers around the assistant content and its <|end|> let TRL's assistant_only_loss
# (and return_assistant_tokens_mask) find every assistant turn, end-of-turn token included.
CHAT_TEMPLATE = (
    "{%- for message in messages -%}"
    "{%- if message['role'] == 'assistant' -%}"
    "<|assistant|>\n{% generation %}{{ message['content'] }}<|end|>{% endgeneration %}"
    "{%- elif message['role'] in ['system', 'user'] -%}"
    "<|{{ message['role'] }}|>\n{{ message['content'] }}<|end|>"
    "{%- else -%}"
    "{{ raise_exception('unknown chat role: ' + message['role']) }}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '<|assistant|>\n' }}{%- endif -%}"
)


def train_tokenizer(corpus: list[str], vocab_size: int = 512, max_length: int = 512) -> Any:
    """Byte-level BPE on the corpus; every digit stays its own token so numbers compose."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Digits(individual_digits=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
    ])
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(corpus, trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        bos_token=END,
        eos_token=END,
        pad_token=PAD,
        additional_special_tokens=[SYSTEM, USER, ASSISTANT],
        chat_template=CHAT_TEMPLATE,
        model_max_length=max_length,
        padding_side="left",
    )


def build_student(
    out_dir: str | Path,
    corpus: list[str],
    vocab_size: int = 512,
    hidden_size: int = 64,
    num_layers: int = 2,
    num_heads: int = 4,
    max_position_embeddings: int = 512,
    seed: int = 0,
) -> Path:
    """Train the tokenizer, initialise a tiny LlamaForCausalLM and save both to `out_dir`."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    out = Path(out_dir)
    tokenizer = train_tokenizer(corpus, vocab_size, max_position_embeddings)
    end_id, pad_id = tokenizer.convert_tokens_to_ids([END, PAD])
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=4 * hidden_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_heads,
        max_position_embeddings=max_position_embeddings,
        bos_token_id=end_id,
        eos_token_id=end_id,
        pad_token_id=pad_id,
        tie_word_embeddings=True,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    model.generation_config.pad_token_id = pad_id
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


def student_corpus(recipe: Recipe, cfg: TinyStudentConfig) -> list[str]:
    """The task's corpus, or (no task, or a task without one) the recipe's prompts."""
    texts = load_task(recipe.task).corpus(cfg.corpus_size, cfg.corpus_seed) if recipe.task else None
    if texts is None:
        texts = [p.prompt for p in iter_prompts(recipe.prompts, recipe.task)][: cfg.corpus_size]
    if not texts:
        raise ValueError("the tiny student needs texts to train its tokenizer on; the prompts are empty")
    return texts


def build_tiny_student(target: Path, recipe: Recipe) -> Path:
    """Build the offline student into `target` unless it already holds one built from the same recipe data."""
    cfg = recipe.sft.student
    marker = {"student": cfg.model_dump(mode="json"), "task": recipe.task,
              "prompts": None if recipe.task else recipe.prompts.identity()}
    if built_with(target, marker):
        return target
    staging = target.parent / f".building-{os.getpid()}-{target.name}"
    shutil.rmtree(staging, ignore_errors=True)
    build_student(staging, student_corpus(recipe, cfg), vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size,
                  num_layers=cfg.num_layers, num_heads=cfg.num_heads,
                  max_position_embeddings=cfg.max_position_embeddings, seed=cfg.seed)
    (staging / "student.json").write_text(json.dumps(marker, sort_keys=True))
    shutil.rmtree(target, ignore_errors=True)
    try:
        os.replace(staging, target)  # readers see a whole student or none
    except OSError:
        if not built_with(target, marker):  # not a concurrent builder that got there first
            raise
        shutil.rmtree(staging, ignore_errors=True)
    log.info("built the tiny student into %s", target)
    return target


def built_with(target: Path, marker: dict[str, Any]) -> bool:
    path = target / "student.json"
    return path.is_file() and json.loads(path.read_text()) == json.loads(json.dumps(marker, sort_keys=True))
