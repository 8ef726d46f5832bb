"""DPO throughput of the `dpo` stage on a GPU: a ~0.5B Llama model built from a config (random weights), run
twice side by side: `plain` (sdpa attention, no Liger, the reference's forward in every step) and `stage` (what
the stage's fast path picks on this machine: flash attention, Liger, precomputed reference log-probs where each
imports; pipeline/train/fastpath.py), each in its own process (Liger patches transformers for the process).

    .venv/bin/python benchmarks/gpu_train.py [--steps 30] [--batch 8] [--seq 512] [--peak-tflops 989]

bf16, random token sequences (prompt, chosen and rejected of seq/2 tokens each pair). Prints each run's tokens/s,
peak GPU memory and model FLOPs utilisation (MFU: the FLOPs its steps execute, 3 passes a token with precomputed
reference log-probs, else 4), then `ratio stage/plain` of the steps' tokens/s and of the whole stage's wall time
(which holds the precompute). Without CUDA it says so and exits 2; `--smoke` runs a scaled-down copy on the CPU to
check the script itself.
"""

from __future__ import annotations

import argparse
import json
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

# Qwen2.5-0.5B's shape (24 layers, hidden 896, 14 heads with 2 KV heads, MLP 4864, vocab 151 936, tied embeddings)
# in Llama's architecture: transformers 5 loads a Qwen2 checkpoint's tokenizer as Qwen2Tokenizer whatever was saved.
SHAPE_05B = {"hidden_size": 896, "intermediate_size": 4864, "num_hidden_layers": 24, "num_attention_heads": 14,
             "num_key_value_heads": 2, "vocab_size": 151936, "tie_word_embeddings": True}
SMOKE = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
         "num_key_value_heads": 2, "vocab_size": 1024, "tie_word_embeddings": True}
PEAK_BF16_TFLOPS = {"H100": 989.0, "H200": 989.0, "H800": 989.0, "A100": 312.0, "L40S": 362.0, "A10G": 125.0}
# the dpo.args of each run: `plain` turns the fast path off, `stage` leaves the stage's defaults
ROWS: dict[str, dict[str, Any]] = {
    "plain": {"precompute_ref_log_probs": False, "use_liger_kernel": False,
              "model_init_kwargs": {"attn_implementation": "sdpa"}},
    "stage": {}}
CHAT_TEMPLATE = ("{% for m in messages %}<|{{ m['role'] }}|> {{ m['content'] }} {{ eos_token }} {% endfor %}"
                 "{% if add_generation_prompt %}<|assistant|> {% endif %}")


def word_tokenizer(vocab_size: int) -> Any:
    """A word-level tokenizer over `w0 … wN` (one token per word), so token counts are exact."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    specials = ["<pad>", "<eos>", "<unk>", "<|system|>", "<|user|>", "<|assistant|>"]
    vocab = {tok: i for i, tok in enumerate(specials)}
    vocab.update({f"w{i}": i + len(specials) for i in range(vocab_size - len(specials))})
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>", eos_token="<eos>",
                                   unk_token="<unk>", chat_template=CHAT_TEMPLATE)


def random_pairs(n: int, words: int, vocab: int, seed: int = 0) -> list[dict[str, Any]]:
    rng = random.Random(seed)

    def text() -> str:
        return " ".join(f"w{rng.randrange(vocab)}" for _ in range(words))

    pairs = []
    for i in range(n):
        user = {"role": "user", "content": text()}
        pairs.append({"prompt_id": f"p{i}", "chosen": [user, {"role": "assistant", "content": text()}],
                      "rejected": [user, {"role": "assistant", "content": text()}]})
    return pairs


def prepare_run(root: Path, shape: dict[str, Any], opts: argparse.Namespace) -> tuple[Any, Any, int]:
    """A run whose `sft` stage holds the random model and whose `feedback` stage holds random pairs."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from pipeline.core.recipe import recipe_from_dict
    from pipeline.core.store import StageState
    from pipeline.run.registry import fingerprint
    from pipeline.run.runner import open_run

    words = opts.seq // 2 - 4  # prompt + answer (+ role and eos tokens) fill `seq` tokens
    tokenizer = word_tokenizer(shape["vocab_size"])
    config = LlamaConfig(**shape, max_position_embeddings=max(4096, opts.seq), pad_token_id=0, eos_token_id=1)
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).to(torch.bfloat16)
    params = sum(p.numel() for p in model.parameters())
    dpo_args = {"max_steps": opts.steps, "per_device_train_batch_size": opts.batch, "max_length": opts.seq,
                "learning_rate": 5e-7, "save_strategy": "no", "logging_steps": 1,
                "activation_checkpointing": opts.checkpointing, "dataloader_num_workers": 2, **ROWS[opts.row]}
    recipe = recipe_from_dict({"task": "toy", "storage": {"root": str(root)}, "dpo": {"beta": 0.1, "args": dpo_args},
                               "compute": {"device": "cpu" if opts.smoke else "cuda"}})
    store = open_run(recipe, "gpu-train")
    model.save_pretrained(store.join("sft", "model"))
    tokenizer.save_pretrained(store.join("sft", "model"))
    with store.shard_writer("feedback", "pairs") as writer:
        writer.extend(random_pairs(opts.batch * opts.steps, words, shape["vocab_size"] - 6))
    for stage in ("sft", "feedback"):
        store.set_stage_state(stage, StageState(fingerprint=fingerprint(stage, recipe), status="completed"))
    return recipe, store, params


def flops_per_token(params: int, shape: dict[str, Any], seq: int, passes: int = 4) -> float:
    """Policy forward+backward (3 passes) and, unless precomputed, the reference's forward (1): 2N a pass plus
    attention's scores (PaLM's 4·L·d·s a pass)."""
    attention = shape["num_hidden_layers"] * shape["hidden_size"] * seq
    return passes * (2 * params + 4 * attention)


def peak_tflops(name: str, given: float | None) -> float | None:
    if given:
        return given
    return next((v for k, v in PEAK_BF16_TFLOPS.items() if k in name), None)


def options() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--batch", type=int, default=8, help="pairs per step")
    parser.add_argument("--seq", type=int, default=512, help="tokens per sequence (prompt + answer)")
    parser.add_argument("--checkpointing", action="store_true", help="activation checkpointing on")
    parser.add_argument("--peak-tflops", type=float, default=None, help="the GPU's dense bf16 peak")
    parser.add_argument("--smoke", action="store_true", help="tiny model on CPU: checks the script, measures nothing")
    parser.add_argument("--row", choices=ROWS, help=argparse.SUPPRESS)  # one run, in its own process
    parser.add_argument("--report", type=Path, help=argparse.SUPPRESS)  # where that run writes its numbers
    opts = parser.parse_args()
    if opts.smoke:  # a few short steps: the script's path, in seconds
        opts.steps, opts.batch, opts.seq = min(opts.steps, 3), min(opts.batch, 2), min(opts.seq, 64)
    return opts


def run_row(opts: argparse.Namespace) -> dict[str, Any]:
    """One run of the dpo stage with the row's dpo.args; its numbers."""
    import torch

    from pipeline.run.runner import run_stage

    shape = SMOKE if opts.smoke else SHAPE_05B
    root = Path(tempfile.mkdtemp(prefix="gpu-train-"))
    recipe, store, params = prepare_run(root, shape, opts)
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    run_stage("dpo", recipe, store)
    wall = time.perf_counter() - t0
    metrics = json.loads(Path(store.join("dpo", "metrics.json")).read_text())
    runtime, tokens = metrics["summary"]["train_runtime"], metrics["final"]["num_tokens"]
    tokens_per_s = tokens / runtime
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu (smoke)"
    peak = peak_tflops(device, opts.peak_tflops)
    passes = 3 if metrics["fast_path"].get("precompute_ref_log_probs") else 4
    achieved = tokens_per_s * flops_per_token(params, shape, opts.seq, passes) / 1e12
    return {
        "row": opts.row, "device": device, "params_millions": round(params / 1e6, 1), "steps": metrics["global_step"],
        "pairs_per_step": opts.batch, "seq": opts.seq, "train_runtime_s": round(runtime, 2),
        "stage_wall_s": round(wall, 2), "tokens_per_s": round(tokens_per_s),
        "step_s": round(runtime / metrics["global_step"], 3), "achieved_tflops": round(achieved, 1),
        "mfu": round(achieved / peak, 4) if peak else None,
        "peak_gpu_mem_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2) if torch.cuda.is_available() else None,
        "fast_path": metrics["fast_path"],
    }


def main() -> None:
    opts = options()
    import torch

    if not torch.cuda.is_available() and not opts.smoke:
        print("gpu_train: no CUDA device visible to torch; this benchmark needs a GPU (run it on a GPU worker). "
              "Nothing was measured.", file=sys.stderr)
        sys.exit(2)
    if opts.row:
        opts.report.write_text(json.dumps(run_row(opts)))
        return
    reports = {}
    for row in ROWS:  # each in a fresh process, one after the other on the same GPU
        with tempfile.TemporaryDirectory() as tmp:
            report = Path(tmp) / "report.json"
            subprocess.run([sys.executable, __file__, *sys.argv[1:], "--row", row, "--report", str(report)],
                           check=True)
            reports[row] = json.loads(report.read_text())
        print(json.dumps(reports[row], indent=2), flush=True)
    plain, stage = reports["plain"], reports["stage"]
    print(f"ratio stage/plain: steps tokens/s {stage['tokens_per_s'] / plain['tokens_per_s']:.3f}  "
          f"stage wall {plain['stage_wall_s'] / stage['stage_wall_s']:.3f} (plain's wall over the stage's)")


if __name__ == "__main__":
    main()
