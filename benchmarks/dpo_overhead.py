"""What the `dpo` stage costs over a plain TRL DPO script: same data, model, settings and process.

    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/dpo_overhead.py [--steps 100] [--rounds 7] [--threads 1]

Both train the tiny student on the same toy pairs with the same TrainingArguments (the plain script is
given the stage's checkpoint and logging settings too, so both pay for the same saves). `DPOTrainer.train` is timed
in both (wall and process CPU time; CPU time is the steadier measure on a shared machine). After one
untimed warm-up run of each, rounds alternate which goes first. Prints the median step-time ratios
(target <= 1.05) and the end-to-end ratio (the stage also reads the store, loads the reference
explicitly, and writes metrics and a model card).
"""

from __future__ import annotations

import argparse
import gc
import hashlib
import logging
import shutil
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from pipeline.core.recipe import Recipe, recipe_from_dict
from pipeline.core.store import RunStore, StageState
from pipeline.run.registry import fingerprint
from pipeline.run.runner import open_run, run_stage
from pipeline.tasks.toy.task import format_answer, make_prompts, parse_problem
from pipeline.train.common import build_tiny_student, stage_defaults, student_options

SETTINGS = {"learning_rate": 1e-3, "per_device_train_batch_size": 16, "max_length": 128, "beta": 0.1,
            "loss_type": ["sigmoid", "sft"], "lr_scheduler_type": "linear", "warmup_steps": 0.1, "seed": 0,
            "report_to": "none", "logging_steps": 10}
TRAIN_TIMES: list[tuple[float, float, int]] = []  # (wall s, cpu s, steps) of each DPOTrainer.train call


def time_train_calls() -> None:
    """Wrap DPOTrainer.train so every call, the stage's or the script's, is timed the same way."""
    from trl import DPOTrainer

    original: Callable[..., Any] = DPOTrainer.train

    def train(self: Any, *args: Any, **kwargs: Any) -> Any:
        wall, cpu = time.perf_counter(), time.process_time()
        result = original(self, *args, **kwargs)
        TRAIN_TIMES.append((time.perf_counter() - wall, time.process_time() - cpu, self.state.global_step))
        return result

    DPOTrainer.train = train


def toy_pairs(n: int) -> list[dict[str, Any]]:
    """Correct answers chosen over off-by-one ones, in the ultrafeedback_binarized shape."""
    pairs = []
    for prompt in make_prompts(n, seed=0):
        problem = parse_problem(prompt)
        user = {"role": "user", "content": prompt}
        pairs.append({"prompt": prompt, "prompt_id": hashlib.sha256(prompt.encode()).hexdigest(),
                      "chosen": [user, {"role": "assistant", "content": format_answer(problem, problem.answer)}],
                      "rejected": [user, {"role": "assistant", "content": format_answer(problem, problem.answer + 1)}],
                      "score_chosen": 5.0, "score_rejected": 1.0})
    return pairs


def prepare_run(root: Path, pairs: list[dict[str, Any]], steps: int) -> tuple[Recipe, RunStore]:
    """A run whose sft stage is done (the tiny student) and whose feedback stage holds the pairs."""
    dpo_args = {k: v for k, v in SETTINGS.items() if k not in ("beta", "loss_type")}
    recipe = recipe_from_dict({"task": "toy", "storage": {"root": str(root)}, "compute": {"device": "cpu"},
                               "dpo": {"beta": SETTINGS["beta"], "loss_type": SETTINGS["loss_type"],
                                       "args": {**dpo_args, "max_steps": steps}}})
    store = open_run(recipe, "overhead")
    build_tiny_student(Path(store.join("sft", "model")), student_options({}))
    with store.shard_writer("feedback", "pairs") as writer:
        writer.extend(pairs)
    for stage in ("sft", "feedback"):
        store.set_stage_state(stage, StageState(fingerprint=fingerprint(stage, recipe), status="completed"))
    return recipe, store


def run_the_stage(recipe: Recipe, store: RunStore) -> float:
    """End-to-end seconds of one `dpo` stage run (afresh each time)."""
    t0 = time.perf_counter()
    run_stage("dpo", recipe, store, force=True)
    return time.perf_counter() - t0


def run_plain_trl(model_dir: str, pairs: list[dict[str, Any]], steps: int, out: Path) -> float:
    """End-to-end seconds of the script a TRL user would write for the same run."""
    from datasets import Dataset
    from transformers import AutoTokenizer
    from trl import DPOConfig, DPOTrainer

    t0 = time.perf_counter()
    data = Dataset.from_list([{"prompt": p["chosen"][:-1], "chosen": p["chosen"][-1:],
                               "rejected": p["rejected"][-1:]} for p in pairs])
    settings = {**stage_defaults(None), **SETTINGS}  # the stage's checkpoint and logging cadence too
    args = DPOConfig(output_dir=str(out), max_steps=steps, use_cpu=True, bf16=False,
                     activation_checkpointing=False, **settings)
    trainer = DPOTrainer(model=model_dir, args=args, train_dataset=data,
                         processing_class=AutoTokenizer.from_pretrained(model_dir))
    trainer.train()
    trainer.save_model(str(out / "model"))
    return time.perf_counter() - t0


def measure(run: Callable[[], float]) -> tuple[float, float, float]:
    """(wall ms/step, cpu ms/step, end-to-end s) of one run."""
    gc.collect()  # the previous run's models must not be freed on this one's clock
    total = run()
    wall, cpu, steps = TRAIN_TIMES[-1]
    return 1000 * wall / steps, 1000 * cpu / steps, total


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--pairs", type=int, default=400)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1 is steadiest on a shared box)")
    opts = parser.parse_args()
    import torch

    torch.set_num_threads(opts.threads)
    logging.disable(logging.WARNING)
    time_train_calls()
    root = Path(tempfile.mkdtemp(prefix="dpo-overhead-"))
    pairs = toy_pairs(opts.pairs)
    recipe, store = prepare_run(root, pairs, opts.steps)
    model_dir = store.join("sft", "model")

    def stage() -> tuple[float, float, float]:
        return measure(lambda: run_the_stage(recipe, store))

    def plain(i: int) -> tuple[float, float, float]:
        return measure(lambda: run_plain_trl(model_dir, pairs, opts.steps, root / f"plain-{i}"))

    stage(), plain(-1)  # warm-up: first-call costs (allocator, lazy imports) hit neither side's numbers
    results: list[tuple[tuple[float, float, float], tuple[float, float, float]]] = []
    for i in range(opts.rounds):
        if i % 2:
            p = plain(i)
            results.append((stage(), p))
        else:
            s = stage()
            results.append((s, plain(i)))
        (sw, sc, st), (pw, pc, pt) = results[-1]
        print(f"round {i + 1}: stage {sw:.1f} ms/step wall, {sc:.1f} ms/step cpu, {st:.1f} s total | "
              f"plain TRL {pw:.1f} ms/step wall, {pc:.1f} ms/step cpu, {pt:.1f} s total", flush=True)
    for name, k in (("wall", 0), ("cpu", 1), ("end-to-end", 2)):
        ratio = statistics.median(s[k] / p[k] for s, p in results)
        verdict = "" if k == 2 else f"  ({'within' if ratio <= 1.05 else 'ABOVE'} the 1.05 target)"
        print(f"{name:>10} ratio stage/plain (median of {opts.rounds}): {ratio:.3f}{verdict}")
    shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
