"""The fast path (pipeline/train/fastpath.py) on the CPU, for correctness: padding-free and packed SFT batches give
the padded loss and keep each conversation's assistant mask, precomputed DPO reference log-probs give the in-loop
loss, CUDA defaults turn on only what keeps the batches, and an absent Liger or flash-attn falls back with a
message. Its speed is measured on a GPU only (benchmarks/gpu_check.sh), never here."""

from __future__ import annotations

import json
import logging
import random
from pathlib import Path

import pytest

from pipeline.core.recipe import recipe_from_dict
from pipeline.stages.dpo.stage import dpo_trainer
from pipeline.stages.sft.stage import chat_format, sft_trainer
from pipeline.train import fastpath
from pipeline.train.fastpath import Kernels
from pipeline.train.outputs import write_chat_format
from pipeline.train.student import CHAT_TEMPLATE, END, build_student

UNMARKED = CHAT_TEMPLATE.replace("{% generation %}", "").replace("{% endgeneration %}", "")
CUDA_KERNELS = Kernels(flash=("flash_attention_2",), liger=True)


@pytest.fixture(scope="module")
def students(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """Two tiny students of the same tokenizer and different weights (an SFT model and a later policy)."""
    from pipeline.tasks.toy.task import corpus

    root = tmp_path_factory.mktemp("students")
    texts = corpus(300, 0)
    return (build_student(root / "sft", texts, hidden_size=32, num_layers=2, num_heads=2, seed=0),
            build_student(root / "later", texts, hidden_size=32, num_layers=2, num_heads=2, seed=1))


def dialogues(n: int = 12, seed: int = 0) -> dict[str, list[dict[str, str]]]:
    """Dialogues of one to three rounds and answers of different lengths, so batches need padding."""
    rng = random.Random(seed)
    found = {}
    for i in range(n):
        messages = []
        for _ in range(rng.randint(1, 3)):
            a, b = rng.randint(1, 99), rng.randint(1, 99)
            messages += [{"role": "user", "content": f"What is {a} + {b}?"},
                         {"role": "assistant", "content": " ".join([f"{a} + {b} = {a + b}."] * rng.randint(1, 4))}]
        found[f"d{i:02d}"] = messages
    return found


def build_sft(model: Path, args: dict, template: str | None, tmp_path: Path, data: dict | None = None):
    """The sft stage's trainer on the CPU, as the stage builds it."""
    data = data or dialogues()
    recipe = recipe_from_dict({"task": "toy", "sft": {"model": str(model), "chat_template": template, "args": {
        "per_device_train_batch_size": len(data), "gradient_accumulation_steps": 1, "max_steps": 2,
        "learning_rate": 1e-3, "save_strategy": "no", **args}}})
    tokenizer, fmt, _ = chat_format(recipe, str(model), data)
    return sft_trainer(recipe, "cpu", str(model), tokenizer, fmt, data, tmp_path / "out"), tokenizer, fmt


def whole_dataset_loss(trainer) -> tuple[float, int]:
    """(the mean loss over every trained token of the dataset in one batch, how many tokens are trained)."""
    import torch

    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(len(trainer.train_dataset))])
    trainer.model.eval()
    with torch.no_grad():
        loss = trainer.compute_loss(trainer.model, batch)
    return float(loss), int((batch["labels"] != -100).sum())


@pytest.mark.parametrize("template", [None, UNMARKED], ids=["markers", "rendered-mask"])
def test_padding_free_and_packed_batches_give_the_padded_loss(students, tmp_path, template):
    padded, _, fmt = build_sft(students[0], {}, template, tmp_path / "padded")
    assert fmt.variant == ("own-markers" if template is None else "rendered")
    flat, _, _ = build_sft(students[0], {"padding_free": True}, template, tmp_path / "flat")
    packed, _, _ = build_sft(students[0], {"packing": True}, template, tmp_path / "packed")
    assert fastpath.summary(padded)["padding_free"] is False and "attention_mask" in padded.data_collator(
        [padded.train_dataset[0]])
    assert fastpath.summary(flat)["padding_free"] is True and fastpath.summary(packed)["packing"] == "bfd"
    assert len(packed.train_dataset) < len(padded.train_dataset)  # several conversations a row
    reference, tokens = whole_dataset_loss(padded)
    for trainer in (flat, packed):
        loss, trained = whole_dataset_loss(trainer)
        assert trained == tokens and loss == pytest.approx(reference, rel=1e-5)


def test_a_padding_free_run_trains_like_the_padded_one(students, tmp_path):
    """Same batches, same steps: two optimizer steps log the same losses and end in the same weights."""
    import torch

    runs = []
    for name, args in (("padded", {}), ("flat", {"padding_free": True})):
        trainer, _, _ = build_sft(students[0], {**args, "logging_steps": 1, "per_device_train_batch_size": 6},
                                  None, tmp_path / name)
        trainer.train()
        runs.append(([h["loss"] for h in trainer.state.log_history if "loss" in h], trainer.model.state_dict()))
    (padded_losses, padded_weights), (flat_losses, flat_weights) = runs
    assert len(padded_losses) == 2 and flat_losses == pytest.approx(padded_losses, rel=1e-4)
    for key, value in padded_weights.items():
        torch.testing.assert_close(flat_weights[key], value, rtol=1e-4, atol=1e-6)


def segments(row: dict) -> list[tuple[list[int], list[int]]]:
    """A packed row cut back into its conversations: (input ids, labels) each."""
    cuts, start = [], 0
    for length in row["seq_lengths"]:
        cuts.append((list(row["input_ids"][start:start + length]), list(row["labels"][start:start + length])))
        start += length
    return cuts


def trained_text(tokenizer, ids: list[int], labels: list[int]) -> list[str]:
    runs, previous = [], False
    for token, label in zip(ids, labels, strict=True):
        if label != -100 and not previous:
            runs.append([])
        if label != -100:
            runs[-1].append(token)
        previous = label != -100
    return [tokenizer.decode(r) for r in runs]


@pytest.mark.parametrize("template", [None, UNMARKED], ids=["markers", "rendered-mask"])
def test_packed_rows_keep_each_conversations_mask_on_its_answers_and_end_tokens(students, tmp_path, template):
    data = dialogues()
    padded, tokenizer, _ = build_sft(students[0], {}, template, tmp_path / "padded", data)
    packed, _, fmt = build_sft(students[0], {"packing": True}, template, tmp_path / "packed", data)
    alone = {tuple(row["input_ids"]): list(row["labels"]) for row in padded.train_dataset}
    answers = {tuple(row["input_ids"]): [m["content"] + END for m in messages if m["role"] == "assistant"]
               for row, messages in zip(padded.train_dataset, data.values(), strict=True)}
    seen = []
    for row in packed.train_dataset:
        for ids, labels in segments(row):
            assert labels == alone[tuple(ids)]  # the mask it has alone, token for token
            assert trained_text(tokenizer, ids, labels) == answers[tuple(ids)]
            seen.append(tuple(ids))
    assert sorted(seen) == sorted(alone)  # every conversation once, none cut
    write_chat_format(packed, tokenizer, tmp_path, fmt, len(data))  # its example: the pack's first conversation
    example = json.loads((tmp_path / "chat_format.json").read_text())["example"]
    first = tuple(segments(packed.train_dataset[0])[0][0])
    assert example["input_ids"] == list(first)
    assert [s["text"] for s in example["segments"] if s["trained"]] == answers[first]
    batch = packed.data_collator([packed.train_dataset[0]])
    starts = (batch["position_ids"][0] == 0).nonzero().flatten().tolist()
    assert len(starts) == len(packed.train_dataset[0]["seq_lengths"])  # positions restart at every conversation
    assert all(batch["labels"][0, s] == -100 for s in starts)  # no token is predicted across a boundary


def test_cpu_keeps_todays_settings(students, tmp_path):
    for section in ("sft", "dpo"):
        fast = fastpath.resolve(section, "cpu", {"learning_rate": 1e-3}, {})
        assert (fast.defaults, fast.user_args, fast.init_kwargs) == ({}, {"learning_rate": 1e-3}, {})
    trainer, _, _ = build_sft(students[0], {}, None, tmp_path)
    assert fastpath.summary(trainer) == {"attn_implementation": "sdpa", "padding_free": False,
                                         "use_liger_kernel": False, "bf16": False, "packing": False}


def test_cuda_turns_on_what_keeps_the_same_batches_and_the_recipe_still_decides():
    sft = fastpath.resolve("sft", "cuda", {}, {}, CUDA_KERNELS)
    assert sft.defaults == {"use_liger_kernel": True, "padding_free": True}
    assert sft.init_kwargs == {"attn_implementation": "flash_attention_2"}
    dpo = fastpath.resolve("dpo", "cuda", {}, {}, CUDA_KERNELS)
    assert dpo.defaults == {"use_liger_kernel": True, "precompute_ref_log_probs": True}
    # the recipe's own settings win; packing changes what a step holds, so it is never a default
    mine = fastpath.resolve("sft", "cuda", {"padding_free": False, "use_liger_kernel": False},
                            {"attn_implementation": "eager"}, CUDA_KERNELS)
    assert (mine.defaults, mine.init_kwargs["attn_implementation"]) == ({}, "eager")
    assert "padding_free" not in fastpath.resolve("sft", "cuda", {"packing": True}, {}, CUDA_KERNELS).defaults
    assert "precompute_ref_log_probs" not in fastpath.resolve("dpo", "cuda", {"sync_ref_model": True}, {},
                                                              CUDA_KERNELS).defaults
    # no flash attention: padding-free would compute the whole flattened square, so it stays off
    no_flash = fastpath.resolve("sft", "cuda", {}, {"dtype": "float32"}, CUDA_KERNELS)
    assert "attn_implementation" not in no_flash.init_kwargs and "padding_free" not in no_flash.defaults


def test_an_absent_liger_or_flash_attention_falls_back_with_a_message(students, tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="pipeline.train")
    fast = fastpath.resolve("sft", "cuda", {"use_liger_kernel": True}, {"attn_implementation": "flash_attention_2"},
                            Kernels())
    assert fast.user_args["use_liger_kernel"] is False and "attn_implementation" not in fast.init_kwargs
    assert "sft.args.use_liger_kernel: liger-kernel does not import here" in caplog.text
    assert "attn_implementation: flash_attention_2 needs flash-attn" in caplog.text
    caplog.clear()
    # and the stage trains through it on this machine instead of failing (transformers would raise ImportError)
    trainer, _, _ = build_sft(students[0], {"use_liger_kernel": True, "max_steps": 1,
                                            "model_init_kwargs": {"attn_implementation": "flash_attention_2"}},
                              None, tmp_path)
    trainer.train()
    assert trainer.state.global_step == 1 and fastpath.summary(trainer)["attn_implementation"] == "sdpa"
    assert "training without it" in caplog.text and "training with transformers' default" in caplog.text


def pairs(n: int = 8, seed: int = 1) -> list[dict]:
    rng = random.Random(seed)
    found = []
    for _ in range(n):
        a, b = rng.randint(1, 99), rng.randint(1, 99)
        found.append({"prompt": [{"role": "user", "content": f"What is {a} + {b}?"}],
                      "chosen": [{"role": "assistant", "content": f"{a} + {b} = {a + b}."}],
                      "rejected": [{"role": "assistant", "content": f"{a} + {b} = {a + b + rng.randint(1, 9)}."}]})
    return found


def first_dpo_loss(students, tmp_path: Path, precompute: bool, start: Path) -> float:
    recipe = recipe_from_dict({"task": "toy", "dpo": {"args": {
        "precompute_ref_log_probs": precompute, "per_device_train_batch_size": 8, "max_steps": 1,
        "logging_steps": 1, "save_strategy": "no", "learning_rate": 1e-4}}})
    from pipeline.train.models import load_tokenizer

    trainer = dpo_trainer(recipe, "cpu", str(start), str(students[0]), load_tokenizer(str(students[0])), pairs(),
                          tmp_path / f"dpo-{precompute}-{start.name}")
    trainer.train()
    return next(h["loss"] for h in trainer.state.log_history if "loss" in h)


@pytest.mark.parametrize("start", ["sft", "later"])
def test_precomputed_reference_log_probs_give_the_in_loop_loss(students, tmp_path, start):
    """Also where the policy does not start from the reference (a later round with `dpo.reference: sft`): the
    log-probs must then come from the reference, not from the policy before it trains."""
    policy = students[0] if start == "sft" else students[1]
    in_loop = first_dpo_loss(students, tmp_path, False, policy)
    assert first_dpo_loss(students, tmp_path, True, policy) == pytest.approx(in_loop, rel=1e-4)


def test_a_model_that_refuses_the_chosen_flash_attention_loads_without_it(students, caplog):
    """The fast path's own choice must not break a model that trained before; the recipe's choice still fails."""
    from transformers import AutoModelForCausalLM

    def load(init):
        return AutoModelForCausalLM.from_pretrained(students[0], **init)

    chosen = fastpath.resolve("sft", "cuda", {}, {}, CUDA_KERNELS)  # flash attention claimed, absent in fact
    assert chosen.chose_attention and chosen.init_kwargs == {"attn_implementation": "flash_attention_2"}
    model, init = fastpath.load_model(load, chosen, "sft")
    assert init == {} and model.config._attn_implementation == "sdpa"
    assert "sft: the model does not load with flash_attention_2" in caplog.text
    asked = fastpath.FastPath({}, {}, {"attn_implementation": "flash_attention_2"})
    with pytest.raises(ImportError):
        fastpath.load_model(load, asked, "sft")
