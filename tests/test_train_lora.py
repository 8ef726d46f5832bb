"""LoRA through peft: SFT and DPO train adapters; DPO's reference is the adapter-disabled SFT model."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from test_train_toyworld import toy_recipe, write_dialogues, write_pairs

from pipeline.run.runner import open_run, run_stage
from pipeline.train.models import resolve_base_model

LORA = {"r": 4, "alpha": 8, "dropout": 0.0, "target_modules": "all-linear"}


@pytest.mark.slow
def test_lora_sft_then_lora_dpo_train_adapters_and_save_merged_models(tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM

    recipe = toy_recipe(
        tmp_path,
        prompts={"source": "task", "count": 16},
        sft={"model": "builtin:tiny", "lora": LORA,
             "args": {"max_steps": 3, "per_device_train_batch_size": 4, "learning_rate": 1e-3}},
        dpo={"lora": LORA, "args": {"max_steps": 3, "per_device_train_batch_size": 4, "learning_rate": 1e-3}},
    )
    store = open_run(recipe, "lora")
    write_dialogues(store, recipe)
    run_stage("sft", recipe, store)
    write_pairs(store, recipe)
    run_stage("dpo", recipe, store)

    weights = {"student": AutoModelForCausalLM.from_pretrained(resolve_base_model(recipe, store)).state_dict()}
    for stage in ("sft", "dpo"):
        adapter = json.loads(Path(store.join(stage, "adapter", "adapter_config.json")).read_text())
        assert adapter["r"] == 4
        weights[stage] = AutoModelForCausalLM.from_pretrained(store.join(stage, "model")).state_dict()  # no peft
    # each stage's trained adapter is merged into the model it saves: sft moved from the student, dpo from sft
    for before, after in (("student", "sft"), ("sft", "dpo")):
        assert weights[before].keys() == weights[after].keys()
        assert any(not torch.equal(weights[before][k], weights[after][k]) for k in weights[before]), after
    dpo = json.loads(Path(store.join("dpo", "metrics.json")).read_text())
    assert dpo["global_step"] == 3
    first = next(h for h in dpo["history"] if "rewards/margins" in h)
    # LoRA starts as a no-op, so before its first update the policy is exactly the adapter-disabled reference.
    assert first["rewards/chosen"] == 0 and first["rewards/rejected"] == 0
