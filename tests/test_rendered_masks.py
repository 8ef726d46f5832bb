"""Any chat template trains: where no training variant renders like a student's template, the loss mask is
derived by rendering it (each answer through its end-of-turn token), and a template that cannot be masked that
way is refused with the reason."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from chat_families import FAMILIES, build_family_model, load_tokenizer
from test_train_toyworld import mark_completed

from pipeline.core.recipe import recipe_from_dict
from pipeline.run.runner import open_run, run_stage
from pipeline.train.templates import RENDERED, ChatTemplateError, masked_examples, render, resolve_chat_format

# Mistral-Instruct with other whitespace than the shipped one: a space before [INST], a newline after [/INST],
# answers stripped and each followed by a newline after its </s>
MISTRAL_SPACED = (
    "{{- bos_token }}{%- for message in messages %}"
    "{%- if message['role'] == 'system' %}{{- raise_exception('no system turn') }}"
    "{%- elif message['role'] == 'user' %}{{- ' [INST] ' + message['content'].strip() + ' [/INST]\\n' }}"
    "{%- else %}{{- message['content'].strip() + eos_token + '\\n' }}{%- endif %}{%- endfor %}")
# turns headed by their role, ended by eos; no generation prompt, so the model writes the header itself
ROLE_HEADED = "{% for m in messages %}{{ m['role'] | upper }}: {{ m['content'] }}{{ eos_token }}\n{% endfor %}"
SYSTEM = {"role": "system", "content": "Be brief."}
TWO_ANSWERS = [{"role": "user", "content": "What is 2 + 3?"}, {"role": "assistant", "content": "It is 5."},
               {"role": "user", "content": "And 4 + 4?"}, {"role": "assistant", "content": " 8 "}]


def trained_runs(tokenizer: Any, example: dict[str, list[int]]) -> list[str]:
    """The decoded runs of consecutive trained tokens."""
    runs: list[list[int]] = []
    previous = 0
    for token, trained in zip(example["input_ids"], example["assistant_masks"], strict=True):
        if trained and not previous:
            runs.append([])
        if trained:
            runs[-1].append(token)
        previous = trained
    return [tokenizer.decode(r) for r in runs]


def tokenizer_with(tmp_path: Path, template: str, family: str = "mistral") -> Any:
    return load_tokenizer(build_family_model(FAMILIES[family], tmp_path / family, template=template))


def test_a_mistral_template_with_other_whitespace_masks_exactly_each_answer_and_its_eos(tmp_path):
    tokenizer = tokenizer_with(tmp_path, MISTRAL_SPACED)
    fmt = resolve_chat_format(tokenizer, "spaced")
    assert (fmt.variant, fmt.training, fmt.system) == (RENDERED, MISTRAL_SPACED, "rejected")
    [example] = masked_examples(tokenizer, fmt, {"d": TWO_ANSWERS})
    text = render(tokenizer, MISTRAL_SPACED, TWO_ANSWERS)
    assert text == "<s> [INST] What is 2 + 3? [/INST]\nIt is 5.</s>\n [INST] And 4 + 4? [/INST]\n8</s>\n"
    assert example["input_ids"] == tokenizer(text, add_special_tokens=False)["input_ids"]
    assert trained_runs(tokenizer, example) == ["It is 5.</s>", "8</s>"]
    # token by token: the prompt pieces untrained, each answer and its </s> trained, the newline after it not
    pieces = [("<s> [INST] What is 2 + 3? [/INST]\n", 0), ("It is 5.</s>", 1), ("\n [INST] And 4 + 4? [/INST]\n", 0),
              ("8</s>", 1), ("\n", 0)]
    expected = [(t, flag) for piece, flag in pieces for t in tokenizer(piece, add_special_tokens=False)["input_ids"]]
    assert list(zip(example["input_ids"], example["assistant_masks"], strict=True)) == expected


def test_without_a_generation_prompt_the_model_learns_the_turn_header_it_must_write(tmp_path):
    tokenizer = tokenizer_with(tmp_path, ROLE_HEADED, "zephyr")
    fmt = resolve_chat_format(tokenizer, "headed")
    [example] = masked_examples(tokenizer, fmt, {"d": [SYSTEM, *TWO_ANSWERS]})
    assert fmt.variant == RENDERED
    assert trained_runs(tokenizer, example) == ["ASSISTANT: It is 5.</s>", "ASSISTANT:  8 </s>"]


@pytest.mark.parametrize(("template", "reason"), [
    ("{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}",
     r"nothing after answer 1 is a special token of this tokenizer .* never learn to stop"),
    ("{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
     "{% if add_generation_prompt %}assistant:{% else %}{{ eos_token }}{% endif %}",
     r"answer 1 renders differently once a later turn follows: as the last turn it ends '.*</s>', followed by "
     r"another turn ' \\nuser'"),
    ("{% for m in messages %}{{ m['role'] }}: {{ m['content'] | upper }}{{ eos_token }}{% endfor %}",
     r"answer 1's text does not appear in its rendering: the template changes it"),
    ("{% for m in messages %}{% if loop.last %}{{ m['role'] }}: {{ m['content'] }}{{ eos_token }}{% endif %}"
     "{% endfor %}{% if add_generation_prompt %}assistant: {% endif %}",
     r"the prompt inference shows before answer 1 is not how the whole conversation starts"),
    ("{{ raise_exception('this template renders no conversation') }}",
     r"the template refuses to render .*this template renders no conversation"),
])
def test_a_template_that_cannot_be_masked_is_refused_saying_why(template, reason, tmp_path):
    tokenizer = tokenizer_with(tmp_path, template, "zephyr")
    with pytest.raises(ChatTemplateError, match=r"student: .*cannot be derived by rendering it: " + reason):
        resolve_chat_format(tokenizer, "student")


def write_generate(store: Any, recipe: Any, dialogues: list[list[dict[str, str]]]) -> None:
    """`generate`'s output holding these dialogues (prompt ids d00, d01, ... in this order)."""
    with store.shard_writer("generate") as writer:
        for i, messages in enumerate(dialogues):
            writer.add({"prompt": messages[-2]["content"], "prompt_id": f"d{i:02d}", "messages": messages})
    mark_completed(store, "generate", recipe, len(dialogues))


@pytest.mark.slow
def test_sft_trains_a_whitespace_variant_and_saves_it_unchanged(tmp_path):
    base = build_family_model(FAMILIES["mistral"], tmp_path / "base", template=MISTRAL_SPACED)
    recipe = recipe_from_dict({
        "name": "spaced", "task": "toy", "storage": {"root": str(tmp_path / "runs")},
        "sft": {"model": str(base), "args": {"max_steps": 2, "per_device_train_batch_size": 2, "max_length": 128}}})
    store = open_run(recipe, "r")
    write_generate(store, recipe, [[SYSTEM, *TWO_ANSWERS], TWO_ANSWERS[:2], TWO_ANSWERS])
    run_stage("sft", recipe, store)

    saved = load_tokenizer(Path(store.join("sft", "model")))
    assert saved.chat_template == MISTRAL_SPACED
    report = json.loads(Path(store.join("sft", "chat_format.json")).read_text())
    assert (report["training_variant"], report["loss_mask"]["how"].split(":")[0]) == (RENDERED, "rendered")
    segments = report["example"]["segments"]  # d00: its system turn folded into the first user turn
    assert [s["text"] for s in segments if s["trained"]] == ["It is 5.</s>", "8</s>"]
    assert "".join(s["text"] for s in segments).startswith("<s> [INST] Be brief.\n\nWhat is 2 + 3? [/INST]\n")
    assert json.loads(Path(store.join("sft", "metrics.json")).read_text())["global_step"] == 2
