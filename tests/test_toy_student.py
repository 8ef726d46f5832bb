"""The tiny student: tokenizer and Llama built offline, reloaded, chat template masks, forward and generate."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from pipeline.tasks.toy.task import corpus
from pipeline.train.student import CHAT_TEMPLATE, build_student

CONVERSATION = [
    {"role": "system", "content": "You are a helpful assistant."},
    {"role": "user", "content": "What is 3 + 5?"},
    {"role": "assistant", "content": "3 + 5 = 8. The answer is 8."},
    {"role": "user", "content": "Thanks! Now, subtract 4 from 17."},
    {"role": "assistant", "content": "The answer is 13."},
]


@pytest.fixture(scope="module")
def student_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_student(tmp_path_factory.mktemp("student"), corpus(500, seed=0), seed=0)


def test_student_reloads_offline_with_its_special_tokens(student_dir: Path) -> None:
    tokenizer = AutoTokenizer.from_pretrained(student_dir)
    model = AutoModelForCausalLM.from_pretrained(student_dir)
    end_id = tokenizer.convert_tokens_to_ids("<|end|>")
    assert tokenizer.eos_token == "<|end|>" and tokenizer.pad_token == "<|pad|>"
    assert model.config.eos_token_id == end_id and model.config.pad_token_id == tokenizer.pad_token_id
    assert model.config.vocab_size == len(tokenizer) <= 512
    assert tokenizer.chat_template == CHAT_TEMPLATE
    assert tokenizer.tokenize("12345") == ["1", "2", "3", "4", "5"]
    for special in ("<|system|>", "<|user|>", "<|assistant|>", "<|end|>", "<|pad|>"):
        assert tokenizer.tokenize(f"hi{special}")[-1] == special


def test_assistant_mask_covers_each_assistant_turn_and_its_end(student_dir: Path) -> None:
    tokenizer = AutoTokenizer.from_pretrained(student_dir)
    out = tokenizer.apply_chat_template(CONVERSATION, return_assistant_tokens_mask=True, return_dict=True)
    ids, mask = out["input_ids"], out["assistant_masks"]
    spans, current = [], []
    for token, flag in zip(ids, mask, strict=True):
        if flag:
            current.append(token)
        elif current:
            spans.append(current)
            current = []
    if current:
        spans.append(current)
    assert [tokenizer.decode(s) for s in spans] == [
        "3 + 5 = 8. The answer is 8.<|end|>",
        "The answer is 13.<|end|>",
    ]
    unmasked = tokenizer.decode([t for t, f in zip(ids, mask, strict=True) if not f])
    assert "What is 3 + 5?" in unmasked and "<|assistant|>" in unmasked and "The answer" not in unmasked


def test_generation_prompt_opens_an_assistant_turn(student_dir: Path) -> None:
    tokenizer = AutoTokenizer.from_pretrained(student_dir)
    prompt = tokenizer.apply_chat_template(CONVERSATION[:2], add_generation_prompt=True, tokenize=False)
    full = tokenizer.apply_chat_template(CONVERSATION[:3], tokenize=False)
    assert prompt.endswith("<|assistant|>\n") and full.startswith(prompt)
    with pytest.raises(Exception, match="unknown chat role"):
        tokenizer.apply_chat_template([{"role": "tool", "content": "x"}], tokenize=False)


def test_forward_pass_and_generate_work(student_dir: Path) -> None:
    tokenizer = AutoTokenizer.from_pretrained(student_dir)
    model = AutoModelForCausalLM.from_pretrained(student_dir)
    batch = tokenizer.apply_chat_template(
        [CONVERSATION[:2], CONVERSATION[:4]], add_generation_prompt=True, padding=True,
        return_tensors="pt", return_dict=True,
    )
    loss = model(**batch, labels=batch["input_ids"]).loss
    assert torch.isfinite(loss) and loss.item() > 0
    generated = model.generate(**batch, max_new_tokens=5, do_sample=False)
    assert generated.shape[0] == 2 and generated.shape[1] > batch["input_ids"].shape[1]


def test_same_seed_builds_the_same_student(tmp_path: Path, student_dir: Path) -> None:
    again = build_student(tmp_path / "again", corpus(500, seed=0), seed=0)
    a = AutoModelForCausalLM.from_pretrained(student_dir).state_dict()
    b = AutoModelForCausalLM.from_pretrained(again).state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert (again / "tokenizer.json").read_text() == (student_dir / "tokenizer.json").read_text()
