"""The sft stage on tiny students of real families: TRL trains on the model's own rendering with the loss on exactly
the answers and their end-of-turn tokens, and the saved model keeps its own chat template."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from chat_families import FAMILIES, build_family_model, load_tokenizer
from test_chat_formats import expected_answer
from test_train_toyworld import write_dialogues

from pipeline.core.recipe import recipe_from_dict
from pipeline.run.runner import open_run, run_stage
from pipeline.train.templates import family_template, render

TWO_TURNS = [{"role": "user", "content": "What is 2 + 3?"}, {"role": "assistant", "content": "It is 5."},
             {"role": "user", "content": "And 4 + 4?"}, {"role": "assistant", "content": "8"}]
TRAINED = ["llama3_1", "llama3_2", "qwen2_5", "qwen3", "mistral", "mistral_v3", "gemma", "gemma3", "phi3", "phi4",
           "zephyr"]


@pytest.mark.parametrize("name", TRAINED)
def test_sft_trains_in_the_students_own_format_and_saves_its_own_template(name, tmp_path: Path):
    family = FAMILIES[name]
    base = build_family_model(family, tmp_path / "base")
    recipe = recipe_from_dict({
        "name": name, "task": "toy", "prompts": {"count": 12}, "storage": {"root": str(tmp_path / "runs")},
        "sft": {"model": str(base), "args": {"max_steps": 1, "per_device_train_batch_size": 4, "max_length": 256}}})
    store = open_run(recipe, name)
    write_dialogues(store, recipe)
    run_stage("sft", recipe, store)

    native = load_tokenizer(base)
    saved = load_tokenizer(Path(store.join("sft", "model")))
    assert saved.chat_template == family_template(name)
    for generation_prompt in (False, True):
        shown = TWO_TURNS[:-1] if generation_prompt else TWO_TURNS
        assert saved.apply_chat_template(shown, tokenize=False, add_generation_prompt=generation_prompt) == \
            native.apply_chat_template(shown, tokenize=False, add_generation_prompt=generation_prompt)

    report = json.loads(Path(store.join("sft", "chat_format.json")).read_text())
    assert (report["origin"], report["training_variant"]) == ("model", name)
    first = min(store.read_records("generate"), key=lambda r: r["prompt_id"])  # the trainer's example 0
    messages = [{"role": m["role"], "content": m["content"]} for m in first["messages"]]
    text = render(native, native.chat_template, messages)
    example = report["example"]
    assert example["input_ids"] == native(text, add_special_tokens=False)["input_ids"]
    assert "".join(s["text"] for s in example["segments"]) == text
    answers = [i for i, m in enumerate(messages) if m["role"] == "assistant"]
    assert [s["text"] for s in example["segments"] if s["trained"]] == [expected_answer(family, messages, t)
                                                                       for t in answers]
