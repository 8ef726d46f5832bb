"""The GPU readiness check's CPU-runnable parts: the ~0.5B Qwen2 model built from its config, the FLOPs per token
its MFU divides by (against what torch counts), and the whole script in smoke mode on a lean interpreter."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

from pipeline.train.fastpath import Kernels

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

from gpu_fastpath import DPO_ROWS, SFT_ROWS  # noqa: E402 - found on the path set above
from gpu_model import QWEN2_05B, SMOKE, flops_per_token, model_config, parameter_count  # noqa: E402 - found on the path set above

# What a lean GPU image may lack: the recipe's and the teacher's dependencies (the check must not need them)
# (everything pyproject declares beyond torch, transformers, trl, datasets, accelerate and their own dependencies)
LEAN_BLOCKED = ("pydantic", "openai", "prefect", "fastapi", "sqlalchemy", "starlette", "uvicorn", "click",
                "matplotlib", "datasketch", "rapidfuzz", "peft", "vllm")
LEAN_BOOT = """
import runpy, sys
from importlib.abc import MetaPathFinder
class Lean(MetaPathFinder):  # the path finder, blind to the blocked packages: find_spec says None, import fails
    def __init__(self, inner):
        self.inner = inner
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in {blocked!r}:
            return None
        return self.inner.find_spec(name, path, target)
    def find_distributions(self, *args, **kwargs):
        return (d for d in self.inner.find_distributions(*args, **kwargs)
                if (d.metadata["Name"] or "").lower().replace("-", "_") not in {blocked!r})
    def invalidate_caches(self):
        self.inner.invalidate_caches()
sys.meta_path[:] = [Lean(f) if getattr(f, "__name__", "") == "PathFinder" else f for f in sys.meta_path]
sys.argv = sys.argv[1:]
runpy.run_path(sys.argv[0], run_name="__main__")
"""


def test_the_check_model_has_qwen2_5_0_5b_shape_and_parameter_count():
    config = model_config(QWEN2_05B, {"eos": 1, "pad": 0})
    assert (config.model_type, config.num_hidden_layers, config.hidden_size, config.num_key_value_heads,
            config.vocab_size, config.tie_word_embeddings) == ("qwen2", 24, 896, 2, 151936, True)
    assert parameter_count(config) == 494_032_768  # Qwen2.5-0.5B's published size


def test_flops_per_token_match_what_torch_counts_for_a_training_step():
    import torch
    from torch.utils.flop_counter import FlopCounterMode
    from transformers import AutoModelForCausalLM

    config = model_config(SMOKE, {"eos": 1, "pad": 0})
    config._attn_implementation = "eager"  # attention as matmuls, which the counter sees on the CPU
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config)
    batch, seq = 2, 96
    ids = torch.randint(0, config.vocab_size, (batch, seq))
    with FlopCounterMode(display=False) as counter:
        model(input_ids=ids, labels=ids).loss.backward()
    counted = counter.get_total_flops()
    predicted = flops_per_token(config, parameter_count(config), seq, passes=3) * batch * seq
    assert abs(predicted - counted) / counted < 0.02


def test_gpu_check_without_cuda_fails_at_once_saying_so(tmp_path):
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "GPU_CHECK_SMOKE")}
    env.update(PYTHON=sys.executable, CUDA_VISIBLE_DEVICES="", GPU_CHECK_DIR=str(tmp_path / "check"))
    done = subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu_check.sh")], env=env, capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 2 and "gpu_check: CUDA is not available" in done.stderr, done.stderr[-2000:]
    assert "GPU_CHECK_SMOKE=1" in done.stderr and not (tmp_path / "check").exists()


@pytest.mark.slow
def test_gpu_check_runs_whole_in_smoke_mode_on_an_interpreter_without_the_recipe_dependencies(tmp_path):
    boot = tmp_path / "lean_boot.py"
    boot.write_text(LEAN_BOOT.format(blocked=LEAN_BLOCKED))
    lean = tmp_path / "lean-python"
    lean.write_text(f'#!/bin/sh\nexec "{sys.executable}" "{boot}" "$@"\n')
    lean.chmod(0o755)
    env = {**os.environ, "PYTHON": str(lean), "GPU_CHECK_SMOKE": "1", "GPU_CHECK_SECONDS": "4",
           "GPU_CHECK_DIR": str(tmp_path / "check")}
    env.pop("PYTHONPATH", None)
    t0 = time.monotonic()
    done = subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu_check.sh")], env=env, capture_output=True,
                          text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert time.monotonic() - t0 < 480
    rows = dict(re.findall(r"^(env|build|sft|dpo|sample|vllm)\s+(\S+)", done.stdout, re.M))
    assert rows == {"env": "ok", "build": "ok", "sft": "ok", "dpo": "ok", "sample": "ok", "vllm": "skipped"}, \
        done.stdout + done.stderr[-3000:]
    sft = json.loads((tmp_path / "check" / "sft.json").read_text())
    assert sft["chat_format"] == "qwen2_5" and sft["tokens_per_s"] > 0 and sft["steps_timed"] >= 1
    # every training row ran or said why not; padding-free, packed and precomputed rows ran on the CPU's sdpa
    rows = {name: json.loads((tmp_path / "check" / f"{name}.json").read_text()) for name in (*SFT_ROWS, *DPO_ROWS)}
    assert {name: row["status"] for name, row in rows.items()} == {
        "sft": "ok", "sft_flash": "skipped", "sft_padfree": "ok", "sft_packed": "ok", "sft_liger": "skipped",
        "dpo": "ok", "dpo_flash": "skipped", "dpo_padfree": "skipped", "dpo_precompute": "ok", "dpo_liger": "skipped"}
    assert rows["sft_padfree"]["settings"]["padding_free"] and rows["sft_packed"]["settings"]["packing"] == "bfd"
    assert rows["dpo_precompute"]["settings"]["precompute_ref_log_probs"] and rows["dpo_precompute"]["precompute_s"] > 0
    assert "flash-attn does not import" in rows["sft_flash"]["skipped"]
    assert "liger-kernel does not import" in rows["dpo_liger"]["skipped"]
    assert "turns padding_free off" in rows["dpo_padfree"]["skipped"]
    assert re.search(r"^  sft_packed +- +\d+ +\d+\.\d\d +\d+\.\d\d +- +packing$", done.stdout, re.M), done.stdout
    assert re.search(r"^  dpo +- +\d+ .* none   <- the stage's choice here$", done.stdout, re.M), done.stdout
    sample = json.loads((tmp_path / "check" / "sample.json").read_text())
    assert sample["path"] == "backend only (no pydantic)" and sample["tokens"] > 0 and sample["failed"] == 0
    assert not (tmp_path / "check" / "model").exists()  # the weights are removed, the numbers kept


def test_sample_backend_path_builds_a_valid_pool_member_where_pydantic_imports(tmp_path):
    """The GPU image has pydantic but not the teacher's packages: the backend-only sample path then builds a
    real PoolModel, which must name its backend."""
    built = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu_check.py"), "build", "--smoke",
                            "--out", str(tmp_path)], capture_output=True, text=True, timeout=300)
    assert built.returncode == 0, built.stderr[-3000:]
    import gpu_check

    member = gpu_check._pool_model("student", "transformers", tmp_path / "model", True)
    assert type(member).__name__ == "PoolModel" and member.backend == "transformers"
    result = gpu_check._sample_backend(tmp_path / "model", True, 4, 8)
    assert result["answers"] == 4 and result["failed"] == 0 and result["tokens"] > 0


@pytest.mark.parametrize("kernels, top", [
    (Kernels(flash=("flash_attention_2",), liger=True), {"sft_liger": ["flash", "liger", "padding_free"],
                                                          "dpo_liger": ["flash", "liger", "precompute"]}),
    (Kernels(liger=True), {"sft_liger": ["liger"], "dpo_liger": ["liger", "precompute"]}),
], ids=["every-kernel", "no-flash-attn"])
def test_each_row_adds_one_option_and_the_top_row_is_the_stages_choice(monkeypatch, tmp_path, kernels, top):
    """The ladder without training: each row's options are its base row's plus one, a skipped row's options pass
    to none above it, and the stage's own choice (pipeline.train.fastpath) is the top row where every kernel is."""
    import gpu_fastpath

    monkeypatch.setattr(gpu_fastpath.fastpath, "available_kernels", lambda device: kernels)
    trained = []

    def fake_row(out, smoke, seconds, settings, first=False):
        trained.append(settings)
        return {"tokens_per_s": 100, "settings": {}}

    monkeypatch.setattr(gpu_fastpath, "sft_row", fake_row)
    monkeypatch.setattr(gpu_fastpath, "dpo_row", fake_row)
    for part in ("sft", "dpo"):
        gpu_fastpath.run_rows(part, tmp_path, smoke=False, seconds=1)
    rows = {name: json.loads((tmp_path / f"{name}.json").read_text()) for name in (*SFT_ROWS, *DPO_ROWS)}
    for name, options in top.items():
        assert rows[name]["options"] == options and rows[name]["stage_choice"] is True
    if kernels.flash:
        assert [rows[n]["options"] for n in ("sft_flash", "sft_padfree", "sft_packed")] == [
            ["flash"], ["flash", "padding_free"], ["flash", "packing"]]
        assert rows["sft_padfree"]["base"] == "sft_flash" and rows["sft_liger"]["base"] == "sft_padfree"
    else:  # padding-free without flash attention computes the whole flattened square: not run on a GPU
        assert {rows[n]["status"] for n in ("sft_flash", "sft_padfree", "sft_packed", "dpo_flash")} == {"skipped"}
        assert rows["sft_liger"]["base"] == "sft" and rows["dpo_precompute"]["base"] == "dpo"
    assert {"attn_implementation": "flash_attention_2"} in [init for init, _ in trained] or not kernels.flash
