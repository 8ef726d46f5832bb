"""The vllm pool backend's own logic against a stand-in engine with vLLM's offline interface (`LLM(model, **kw)`,
`get_tokenizer()`, `generate(prompts, sampling_params, use_tqdm)`, engine shutdown): engine settings and per-answer
seeds pass through, prompts render in the model's own format, failures stay per item, engines are released."""

from __future__ import annotations

import json
import sys
import types
import weakref
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Any

import pytest
from chat_families import FAMILIES, build_family_model, load_tokenizer

from pipeline.backends.base import GenerationRequest, SamplingParams
from pipeline.core.recipe import PoolModel, load_recipe
from pipeline.core.templates import render
from pipeline.run.runner import open_run, run_stage

REFUSED = "Refuse me"  # a prompt the stand-in engine rejects (as vLLM does with e.g. a bad multimodal input)


@dataclass
class FakeSamplingParams:
    temperature: float = 1.0
    top_p: float = 1.0
    max_tokens: int = 16
    seed: int | None = None
    stop_token_ids: list[int] = field(default_factory=list)


class FakeEngine:
    """Answers `answer <seed>`; raises for a whole call when a prompt is longer than its context or holds
    REFUSED, as vLLM validates every request of a call before it runs any."""

    live: weakref.WeakSet = weakref.WeakSet()
    engines: list[dict[str, Any]] = []  # per engine: its kwargs, whether it was shut down, what it was asked

    def __init__(self, model: str, **kwargs: Any):
        from transformers import AutoTokenizer

        assert not list(FakeEngine.live), "a new engine was started before the previous one was released"
        self.record: dict[str, Any] = {"model": model, "kwargs": kwargs, "shutdown": False, "calls": [],
                                       "prompts": []}
        FakeEngine.engines.append(self.record)
        FakeEngine.live.add(self)
        self.tokenizer = AutoTokenizer.from_pretrained(model)
        record = self.record
        core = SimpleNamespace(shutdown=lambda: record.update(shutdown=True))
        self.llm_engine = SimpleNamespace(engine_core=core,
                                          model_config=SimpleNamespace(max_model_len=kwargs.get("max_model_len", 512)))

    def get_tokenizer(self) -> Any:
        return self.tokenizer

    def generate(self, prompts: list[dict], sampling_params: list[FakeSamplingParams], use_tqdm: bool = True) -> list:
        texts = [self.tokenizer.decode(p["prompt_token_ids"]) for p in prompts]
        self.record["calls"].append(len(prompts))
        limit = self.llm_engine.model_config.max_model_len
        for p, text in zip(prompts, texts, strict=True):
            if len(p["prompt_token_ids"]) >= limit or REFUSED in text:
                raise ValueError(f"prompt of {len(p['prompt_token_ids'])} tokens refused")
        self.record["prompts"] += [(text, sp) for text, sp in zip(texts, sampling_params, strict=True)]
        return [SimpleNamespace(prompt_token_ids=p["prompt_token_ids"], outputs=[SimpleNamespace(
            text=f" answer {sp.seed} ", token_ids=[5, 6, 7], finish_reason="stop")])
            for p, sp in zip(prompts, sampling_params, strict=True)]


@pytest.fixture
def fake_vllm(monkeypatch):
    import transformers  # noqa: F401 - both look for a real vllm when first imported: let them find none
    import trl  # noqa: F401 - as above

    module = types.ModuleType("vllm")
    module.LLM, module.SamplingParams = FakeEngine, FakeSamplingParams
    monkeypatch.setitem(sys.modules, "vllm", module)
    FakeEngine.engines.clear()
    yield FakeEngine.engines


def test_engine_settings_seeds_and_every_stop_token_pass_through(fake_vllm, tmp_path):
    from pipeline.backends.vllm_backend import VLLMBackend

    path = build_family_model(FAMILIES["gemma"], tmp_path / "gemma")
    spec = PoolModel(name="g", backend="vllm", model=str(path), tensor_parallel_size=2, gpu_memory_utilization=0.55,
                     max_model_len=256, dtype="bfloat16", engine_args={"enforce_eager": True, "seed": 3})
    backend = VLLMBackend(spec, str(path))
    requests = [GenerationRequest([{"role": "user", "content": f"What is {i} + 1?"}], seed=100 + i) for i in range(3)]
    out = backend.generate(requests, SamplingParams(temperature=0.7, top_p=0.9, max_tokens=20))
    backend.close()
    engine = fake_vllm[0]
    assert engine["kwargs"] == {"tensor_parallel_size": 2, "gpu_memory_utilization": 0.55, "max_model_len": 256,
                                "dtype": "bfloat16", "enforce_eager": True, "seed": 3}
    eos = json.loads((path / "generation_config.json").read_text())["eos_token_id"]  # <eos> and <end_of_turn>
    assert [(sp.seed, sp.temperature, sp.top_p, sp.stop_token_ids) for _, sp in engine["prompts"]] == [
        (100 + i, 0.7, 0.9, eos) for i in range(3)]
    assert [c.text for c in out] == ["answer 100", "answer 101", "answer 102"]
    assert engine["prompts"][0][0] == "<bos><start_of_turn>user\nWhat is 0 + 1?<end_of_turn>\n<start_of_turn>model\n"
    assert engine["shutdown"] and not list(FakeEngine.live)


def test_a_too_long_prompt_a_refused_conversation_and_an_engine_refusal_each_fail_alone(fake_vllm, tmp_path):
    from pipeline.backends.vllm_backend import VLLMBackend

    path = build_family_model(FAMILIES["mistral"], tmp_path / "mistral")
    backend = VLLMBackend(PoolModel(name="m", backend="vllm", model=str(path), max_model_len=64), str(path))
    user = [{"role": "user", "content": "What is 2 + 3?"}]
    requests = [GenerationRequest(user, 1),
                GenerationRequest([{"role": "user", "content": "What is 2 + 3? " * 40}], 2),  # longer than 64 tokens
                GenerationRequest([{"role": "assistant", "content": "Hi"}, *user], 3),  # Mistral's template refuses
                GenerationRequest([{"role": "user", "content": REFUSED}], 4),
                GenerationRequest([{"role": "system", "content": "Be brief."}, *user], 5)]
    out = backend.generate(requests, SamplingParams(temperature=1.0, top_p=1.0, max_tokens=100))
    backend.close()
    assert [c.error is None for c in out] == [True, False, False, False, True]
    assert "leaves no room in max_model_len=64" in out[1].error
    assert out[2].error.startswith("chat template:") and "alternate" in out[2].error
    assert out[3].error.startswith("vllm: ValueError")
    assert [c.system_prompt_in for c in (out[0], out[4])] == ["none", "user"]
    engine = fake_vllm[0]
    assert engine["calls"] == [3, 1, 1, 1]  # the refused call of three, then each of its requests alone
    asked = {sp.seed: (text, sp.max_tokens) for text, sp in engine["prompts"]}
    assert asked[5][0] == "<s>[INST] Be brief.\n\nWhat is 2 + 3? [/INST]"
    assert asked[1][0] == "<s>[INST] What is 2 + 3? [/INST]"
    prompt_tokens = len(load_tokenizer(path)(asked[1][0], add_special_tokens=False)["input_ids"])
    assert asked[1][1] == 64 - prompt_tokens  # max_tokens 100, capped to what the context holds


def test_sample_stage_with_two_vllm_models_releases_each_engine_and_ledgers_what_failed(fake_vllm, write_recipe,
                                                                                         tmp_path):
    mistral = build_family_model(FAMILIES["mistral"], tmp_path / "mistral")
    llama = build_family_model(FAMILIES["llama3_1"], tmp_path / "llama")
    prompts = tmp_path / "prompts.jsonl"
    texts = [f"What is {i} + {i}?" for i in range(6)] + ["Please add these numbers: " + "7 + " * 200 + "1"]
    prompts.write_text("".join(json.dumps({"prompt": t}) + "\n" for t in texts))
    pool = [{"name": "mistral", "backend": "vllm", "model": str(mistral), "max_model_len": 256},
            {"name": "llama", "backend": "vllm", "model": str(llama), "max_model_len": 256}]
    recipe = load_recipe(write_recipe({"name": "vllm", "prompts": {"source": str(prompts)}, "task": "toy",
                                       "sample": {"k": 2, "pool": pool, "principles": {"default": ["honesty"]}}}))
    store = open_run(recipe, "vllm")
    report = run_stage("sample", recipe, store)
    assert report.status == "completed"
    assert report.counts == {"input": 14, "prompts": 7, "output": 12, "failed": 2, "pending": 0,
                             "dropped_prompts": 0}
    assert [e["model"] for e in fake_vllm] == [str(mistral), str(llama)] and all(e["shutdown"] for e in fake_vllm)
    failed = store.ledger("sample").latest()
    assert len(failed) == 2 and all("leaves no room in max_model_len=256" in f.reason for f in failed.values())
    rows = list(store.read_records("sample", "completions"))
    placement = {r["model"]: r["system_prompt_in"] for r in rows}
    assert placement == {"mistral": "user", "llama": "system"}
    principle = render("principle_honesty.jinja")
    assert all(text.startswith(f"<s>[INST] {principle}\n\n") for text, _ in fake_vllm[0]["prompts"])
    assert all("<|start_header_id|>system<|end_header_id|>\n\n" in text and principle in text
               for text, _ in fake_vllm[1]["prompts"])
    assert {r["completion"] for r in rows} == {f"answer {r['seed']}" for r in rows}
