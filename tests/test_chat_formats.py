"""Native chat formats: for tiny students of real families, training renders exactly what the model's own template
renders at inference, and the loss marks exactly the answers and their end-of-turn tokens."""

from __future__ import annotations

from pathlib import Path

import pytest
from chat_families import FAMILIES, Family, build_family_model, load_tokenizer

from pipeline.core.chat import REJECTED, SYSTEM, USER, fold_system, system_support
from pipeline.train.templates import (
    DEFAULT_FAMILY,
    ChatTemplateError,
    family_template,
    probe_conversations,
    render,
    resolve_chat_format,
)

TRIMMED = {"llama3", "llama3_1", "llama3_2", "gemma", "gemma3"}  # their templates strip an answer's spaces
DIALOGUE = [{"role": "user", "content": "What is 2 + 3?"}, {"role": "assistant", "content": "It is 5."},
            {"role": "user", "content": "And 4 + 4?"}, {"role": "assistant", "content": " 8 "}]


@pytest.fixture(scope="module")
def family_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("families")
    built: dict[str, Path] = {}

    def get(name: str) -> Path:
        if name not in built:
            built[name] = build_family_model(FAMILIES[name], root / name)
        return built[name]

    return get


def conversations(fmt_system: str) -> list[list[dict[str, str]]]:
    """The probe conversations and a plain dialogue; a system turn folded into the user turn, as sft does,
    unless the template gives it a turn of its own."""
    convs = [*probe_conversations(), DIALOGUE]
    return convs if fmt_system == SYSTEM else [fold_system(c) for c in convs]


def expected_answer(family: Family, messages: list[dict[str, str]], turn: int) -> str:
    """What the model writes for assistant turn `turn`: its answer as the template shows it, and the turn's end."""
    content = messages[turn]["content"]
    if family.name == "qwen3":
        last_query = max(i for i, m in enumerate(messages) if m["role"] == "user")
        if "</think>" in content:
            thought, content = content.split("</think>")
            thought = thought.split("<think>")[-1].strip("\n")
            content = content.lstrip("\n")
        else:
            thought = ""
        if turn > last_query:
            content = f"<think>\n{thought}\n</think>\n\n{content}"
    if family.name == "mistral_v3":  # it writes a space after [/INST], then the trimmed answer
        return " " + content.strip() + family.eot
    return (content.strip() if family.name in TRIMMED else content) + family.eot


def masked_runs(tokenizer, template: str, messages: list[dict[str, str]]) -> list[str]:
    out = tokenizer.apply_chat_template(messages, chat_template=template, tokenize=True, return_dict=True,
                                        return_assistant_tokens_mask=True)
    runs, current = [], []
    for token, masked in zip(out["input_ids"], out["assistant_masks"], strict=True):
        if masked:
            current.append(token)
        elif current:
            runs.append(current)
            current = []
    if current:
        runs.append(current)
    return [tokenizer.decode(r) for r in runs]


@pytest.mark.parametrize("name", sorted(FAMILIES))
def test_training_renders_like_inference_and_the_loss_marks_exactly_answers_and_their_end(name, family_dir):
    family = FAMILIES[name]
    tokenizer = load_tokenizer(family_dir(name))  # as the stage loads it (transformers may pick its own class)
    fmt = resolve_chat_format(tokenizer, name)
    assert (fmt.origin, fmt.variant, fmt.native_text) == ("model", name, family_template(name))
    for messages in conversations(fmt.system):
        native = render(tokenizer, fmt.native_text, messages)
        assert render(tokenizer, fmt.training, messages) == native
        answers = [i for i, m in enumerate(messages) if m["role"] == "assistant"]
        for turn in answers:  # what inference shows the model before each answer is where training has it
            prompt = render(tokenizer, fmt.native_text, messages[:turn], generation_prompt=True)
            assert native.startswith(prompt) and native[len(prompt):].startswith(expected_answer(family, messages, turn))
        assert masked_runs(tokenizer, fmt.training, messages) == [expected_answer(family, messages, t)
                                                                 for t in answers]


def test_qwen3_shows_no_empty_thinking_block_on_earlier_answers(family_dir):
    tokenizer = load_tokenizer(family_dir("qwen3"))
    fmt = resolve_chat_format(tokenizer, "qwen3")
    text = render(tokenizer, fmt.training, DIALOGUE)
    assert text.count("<think>") == 1
    assert "<|im_start|>assistant\nIt is 5.<|im_end|>" in text
    assert text.endswith("<|im_start|>assistant\n<think>\n\n</think>\n\n 8 <|im_end|>\n")


def test_system_turns_are_taken_folded_or_refused_as_each_template_does(family_dir):
    support = {}
    for name in ("llama3_1", "mistral", "mistral_v3", "gemma", "gemma3", "qwen2_5"):
        tokenizer = load_tokenizer(family_dir(name))
        support[name] = system_support(lambda m, t=tokenizer: render(t, t.chat_template, m, generation_prompt=True))
    assert support == {"llama3_1": SYSTEM, "mistral": REJECTED, "mistral_v3": USER, "gemma": REJECTED,
                       "gemma3": USER, "qwen2_5": SYSTEM}
    messages = [{"role": "system", "content": "Be honest."}, *DIALOGUE]
    folded = fold_system(messages)
    assert folded[0] == {"role": "user", "content": "Be honest.\n\nWhat is 2 + 3?"} and folded[1:] == DIALOGUE[1:]
    assert fold_system(DIALOGUE) == DIALOGUE


def test_a_template_that_cannot_be_masked_is_an_error_naming_the_model_the_reason_and_the_options(tmp_path):
    odd = "{% for m in messages %}{{ m['role'] | upper }}: {{ m['content'] }}\n{% endfor %}"  # no end-of-turn token
    path = build_family_model(FAMILIES["zephyr"], tmp_path / "odd", template=odd)
    tokenizer = load_tokenizer(path)
    with pytest.raises(ChatTemplateError, match=r"odd-model: .*no training variant .*nothing after answer 1 is a "
                                                 r"special token.*sft\.chat_template.*sft\.replace_template: true"):
        resolve_chat_format(tokenizer, "odd-model")
    replaced = resolve_chat_format(tokenizer, "odd-model", replace=True)
    assert (replaced.origin, replaced.native_text) == ("replaced", family_template(DEFAULT_FAMILY))


def test_a_base_model_without_a_template_trains_in_zephyr_format(tmp_path):
    tokenizer = load_tokenizer(build_family_model(FAMILIES["mistral"], tmp_path / "base", template=None))
    fmt = resolve_chat_format(tokenizer, "base")
    assert (fmt.origin, fmt.variant, fmt.native_text) == ("default", "zephyr", family_template("zephyr"))
    assert render(tokenizer, fmt.native_text, DIALOGUE[:2]) == "<|user|>\nWhat is 2 + 3?</s>\n<|assistant|>\nIt is 5.</s>\n"


def test_sft_chat_template_override_takes_a_format_name_a_file_or_text(family_dir, tmp_path):
    from pipeline.core.recipe import recipe_from_dict

    tokenizer = load_tokenizer(family_dir("mistral"))
    by_name = resolve_chat_format(tokenizer, "m", override="zephyr")
    assert (by_name.origin, by_name.variant) == ("sft.chat_template", "zephyr")
    with pytest.raises(ChatTemplateError, match=r"m: .*end-of-turn token .* not a special token of this tokenizer"):
        resolve_chat_format(tokenizer, "m", override="chatml")  # Mistral's vocabulary has no <|im_end|>
    marked = family_template("zephyr", training=True)
    (tmp_path / "mine.jinja").write_text(marked)
    recipe = recipe_from_dict({"task": "toy", "sft": {"chat_template": "mine.jinja"}}, base_dir=tmp_path)
    assert recipe.sft.chat_template == marked  # read at load time, so the stage fingerprint covers the text
    own = resolve_chat_format(tokenizer, "m", override=recipe.sft.chat_template)
    assert (own.variant, own.training, own.native_text) == ("own-markers", marked, marked)
    with pytest.raises(ChatTemplateError, match="'llama9' is not a chat format name"):
        resolve_chat_format(tokenizer, "m", override="llama9")


def test_an_unknown_chat_format_name_fails_at_validate_before_anything_is_paid():
    from pipeline.core.recipe import recipe_from_dict
    from pipeline.train.configs import check_trl_args
    from pipeline.train.models import TrainingError

    recipe = recipe_from_dict({"task": "toy", "sft": {"chat_template": "llama9"}})
    with pytest.raises(TrainingError, match=r"sft\.chat_template: 'llama9' is not a chat format name \(llama3, "):
        check_trl_args(recipe)
