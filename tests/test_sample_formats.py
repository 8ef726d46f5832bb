"""Sampling in each model's own format: a principle reaches a student whose template refuses a system turn (and a
server that refuses one) in the user turn, recorded per answer; generation stops on every eos id."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from chat_families import FAMILIES, build_family_model, load_tokenizer

from pipeline.backends.base import GenerationRequest, SamplingParams
from pipeline.backends.chat import PromptRenderer
from pipeline.core.recipe import PoolModel, load_recipe
from pipeline.core.templates import render
from pipeline.run.runner import open_run, run_stage
from pipeline.tasks.toy.teacher_server import ToyTeacher, ToyTeacherConfig
from pipeline.teacher.cache import ResponseCache

TEACHER = {"model": "toy-teacher", "api_key_env": None, "timeout_s": 5.0, "max_retries": 2, "backoff_base_s": 0.05,
           "backoff_max_s": 0.2, "max_concurrency": 4}


def _sample_recipe(write_recipe, pool: list[dict], base_url: str = "http://127.0.0.1:9/v1", count: int = 8) -> Path:
    return write_recipe({"name": "formats", "task": "toy", "teacher": {"base_url": base_url, **TEACHER},
                         "prompts": {"source": "task", "count": count},
                         "sample": {"k": len(pool), "pool": pool, "principles": {"default": ["honesty"]}}})


def test_a_mistral_student_with_principles_answers_with_the_principle_in_its_user_turn(write_recipe, tmp_path):
    path = build_family_model(FAMILIES["mistral"], tmp_path / "mistral")
    pool = [{"name": "mistral", "backend": "transformers", "model": str(path), "max_tokens": 6, "batch_size": 4}]
    recipe = load_recipe(_sample_recipe(write_recipe, pool))
    store = open_run(recipe, "mistral")
    report = run_stage("sample", recipe, store)
    assert report.status == "completed" and report.counts["output"] == 8 and report.counts["failed"] == 0
    principle = render("principle_honesty.jinja")
    rows = list(store.read_records("sample", "completions"))
    assert {(r["principle"], r["system_prompt"], r["system_prompt_in"]) for r in rows} == {
        ("honesty", principle, "user")}
    renderer = PromptRenderer(load_tokenizer(path))  # what the backend rendered for the model
    for r in rows:
        text, placement = renderer.render([{"role": "system", "content": principle},
                                           {"role": "user", "content": r["prompt"]}])
        assert placement == "user" and text == f"<s>[INST] {principle}\n\n{r['prompt']} [/INST]"


def test_a_server_refusing_system_turns_gets_the_principle_in_the_user_turn(write_recipe):
    pool = [{"name": "teacher", "backend": "openai", "model": "toy-teacher", "temperature": 0.0}]
    with ToyTeacher(ToyTeacherConfig(refuse_system=True)) as toy:
        recipe = load_recipe(_sample_recipe(write_recipe, pool, toy.base_url, count=12))
        store = open_run(recipe, "refused")
        report = run_stage("sample", recipe, store)
        stats = toy.stats()
    assert report.status == "completed" and report.counts["output"] == 12
    # refused until the backend learnt it (at most the requests already in flight), then folded up front
    assert 1 <= stats["outcomes"]["400_system"] <= TEACHER["max_concurrency"]
    assert stats["outcomes"]["ok"] == 12
    principle = render("principle_honesty.jinja")
    rows = list(store.read_records("sample", "completions"))
    assert {(r["system_prompt_in"], r["finish_reason"]) for r in rows} == {("user", "stop")}
    cache = ResponseCache(Path(store.join("cache", "teacher.sqlite")))
    sent = [r["messages"] for r in cache.requests()]
    cache.close()
    assert len(sent) == 12 and all(len(m) == 1 and m[0]["role"] == "user" for m in sent)
    assert {m[0]["content"] for m in sent} == {f"{principle}\n\n{r['prompt']}" for r in rows}


def always_end_of_turn(family_name: str, out: Path) -> Path:
    """A tiny model of the family that writes its end-of-turn token first, whatever the prompt: every layer's
    output is zeroed, so the last hidden state is a token's embedding, and every embedding points the same way
    with the end-of-turn token's the longest (in the output layer too, where it is not tied)."""
    import torch
    from transformers import AutoModelForCausalLM

    family = FAMILIES[family_name]
    path = build_family_model(family, out)
    model = AutoModelForCausalLM.from_pretrained(path)
    eot = load_tokenizer(path).convert_tokens_to_ids(family.eot)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith(("o_proj.weight", "down_proj.weight")):
                param.zero_()
        direction = torch.randn(model.get_input_embeddings().weight.shape[1])
        for weights in {model.get_input_embeddings().weight, model.get_output_embeddings().weight}:
            weights.copy_(0.5 * direction.expand_as(weights))
            weights[eot] = direction
    model.save_pretrained(path)
    return path


@pytest.mark.parametrize("family_name", ["gemma", "phi3", "llama3_1"])
def test_generation_stops_on_every_end_of_sequence_token_of_the_generation_config(family_name, tmp_path):
    from pipeline.backends.transformers_backend import TransformersBackend

    path = always_end_of_turn(family_name, tmp_path / family_name)
    family = FAMILIES[family_name]
    tokenizer = load_tokenizer(path)
    assert tokenizer.eos_token != family.eot or family_name == "llama3_1"  # Gemma, Phi-3: the turn ends elsewhere
    config = json.loads((path / "generation_config.json").read_text())
    assert tokenizer.convert_tokens_to_ids(family.eot) in config["eos_token_id"]
    backend = TransformersBackend(PoolModel(name=family_name, backend="transformers", model=str(path)), str(path))
    requests = [GenerationRequest([{"role": "user", "content": "What is 2 + 3?"}], seed=i) for i in range(3)]
    out = backend.generate(requests, SamplingParams(temperature=0.0, top_p=1.0, max_tokens=16))
    backend.close()
    assert [(c.text, c.finish_reason, c.completion_tokens, c.error) for c in out] == [("", "stop", 0, None)] * 3
