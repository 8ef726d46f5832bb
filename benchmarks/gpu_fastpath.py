"""The GPU check's training parts: SFT and DPO on the check's model, row by row, each row adding one fast-path
option (flash attention, padding-free or packed batches, precomputed reference log-probs, Liger) to the row before
it, so each option's gain is the ratio of two rows measured side by side in one process. The top of each ladder is
what the stages choose on a machine with every kernel (pipeline/train/fastpath.py); the table marks the row that
matches their choice here.

Each row is written to DIR/<row>.json as soon as it is measured, so a part cut short keeps the rows it finished;
the first row of each part (`sft`, `dpo`: sdpa, padded, nothing fused, the reference in the step) is the part's own
result. Liger's rows run last: Liger patches transformers' modules for the rest of the process. A row whose kernel
does not import here is skipped with the reason, and the rows above it build on the last row that ran. `--smoke`
(CPU, tiny model) runs the padding-free and packed rows with sdpa, to check the path; its numbers mean nothing.
"""

from __future__ import annotations

import gc
import json
import time
from pathlib import Path
from typing import Any

from gpu_model import (
    attention_length,
    dialogues,
    flops_per_token,
    parameter_count,
    peak_tflops,
    preference_pairs,
)

from pipeline.train import fastpath

# row: (the row it adds its option to, the option); in order, Liger last
SFT_ROWS: dict[str, tuple[str | None, str | None]] = {
    "sft": (None, None), "sft_flash": ("sft", "flash"), "sft_padfree": ("sft_flash", "padding_free"),
    "sft_packed": ("sft_flash", "packing"), "sft_liger": ("sft_padfree", "liger")}
DPO_ROWS: dict[str, tuple[str | None, str | None]] = {
    "dpo": (None, None), "dpo_flash": ("dpo", "flash"), "dpo_padfree": ("dpo_flash", "padding_free"),
    "dpo_precompute": ("dpo_flash", "precompute"), "dpo_liger": ("dpo_precompute", "liger")}
TRL_KEYS = {"padding_free": "padding_free", "packing": "packing", "precompute": "precompute_ref_log_probs"}


class TimeBox:
    """A trainer callback: stops training after `seconds` (and at least `warmup` + 2 steps); times the steps after
    the first `warmup` ones and counts the tokens TRL logs for them (`num_tokens`, padding excluded)."""

    def __init__(self, seconds: float, warmup: int = 3):
        from transformers import TrainerCallback

        box = self

        class Callback(TrainerCallback):
            def on_train_begin(self, args, state, control, **kwargs) -> None:  # noqa: ANN001, ANN003 - transformers' API
                box.t0 = time.perf_counter()

            def on_log(self, args, state, control, logs=None, **kwargs) -> None:  # noqa: ANN001, ANN003 - transformers' API
                if logs and "num_tokens" in logs:
                    box.marks.append((state.global_step, time.perf_counter(), float(logs["num_tokens"])))
                if time.perf_counter() - box.t0 > box.seconds and state.global_step >= box.warmup + 2:
                    control.should_training_stop = True  # time is up and there are steps to time

        self.seconds, self.warmup, self.marks, self.t0 = seconds, warmup, [], 0.0
        self.callback = Callback()

    def rate(self) -> tuple[int, float, float]:
        """(steps timed, seconds, tokens) over the steps after the warm-up ones."""
        timed = [m for m in self.marks if m[0] >= self.warmup]
        if len(timed) < 2:
            raise RuntimeError(f"only {len(self.marks)} steps ran within {self.seconds} s: nothing to time")
        (s0, t0, n0), (s1, t1, n1) = timed[0], timed[-1]
        return s1 - s0, t1 - t0, n1 - n0


def unavailable(options: set[str], kernels: fastpath.Kernels, smoke: bool) -> str | None:
    """Why a row with these options cannot run here, or None."""
    if "liger" in options and not kernels.liger:
        return "liger-kernel does not import here (or there is no CUDA GPU)"
    if "flash" in options and not kernels.flash:
        return "flash-attn does not import here (pip install flash-attn)"
    if options & {"padding_free", "packing"} and not kernels.flash and not smoke:
        return "needs flash attention: with sdpa a flattened batch's attention is computed whole (correct, slower)"
    return None


def row_settings(options: set[str], kernels: fastpath.Kernels) -> tuple[dict[str, Any], dict[str, Any]]:
    """(the model's init kwargs, TRL settings) of a row."""
    init = {"attn_implementation": kernels.flash[0]} if "flash" in options and kernels.flash else {}
    args = {trl_key: True for key, trl_key in TRL_KEYS.items() if key in options}
    return init, {**args, "use_liger_kernel": "liger" in options}


def stage_choice(section: str, kernels: fastpath.Kernels, smoke: bool) -> set[str]:
    """The options the stage turns on here by default (fastpath.resolve), in the rows' names."""
    fast = fastpath.resolve(section, "cpu" if smoke else "cuda", {}, {}, kernels)
    chosen = {"flash"} if fast.init_kwargs.get("attn_implementation") in fastpath.FLASH else set()
    return chosen | {key for key, trl_key in {**TRL_KEYS, "liger": "use_liger_kernel"}.items()
                     if fast.defaults.get(trl_key)}


def trl_args(config_cls: type, out: Path, smoke: bool, **extra: Any) -> Any:
    """The stages' settings on a GPU (bf16, TRL's activation checkpointing), fixed-length runs, no checkpoints."""
    common = {"output_dir": str(out), "max_steps": 1000, "learning_rate": 2e-5, "lr_scheduler_type": "cosine",
              "save_strategy": "no", "logging_steps": 1, "report_to": "none", "seed": 0,
              "dataloader_num_workers": 0 if smoke else 2}
    common.update({"use_cpu": True, "bf16": False} if smoke else {"bf16": True})
    return config_cls(**{**common, **extra})


def report(box: TimeBox, config: Any, seq: int, passes: int, smoke: bool,
           ref: tuple[float, int] | None = None) -> dict[str, Any]:
    """Tokens/s, MFU (model FLOPs of `passes` passes a token over the GPU's dense bf16 peak) and peak memory. With
    `ref` (seconds, tokens of precomputed reference log-probs) the rate is one epoch's: steps and precompute."""
    import torch

    params = parameter_count(config)
    steps, seconds, tokens = box.rate()
    rate = tokens / seconds
    numbers: dict[str, Any] = {}
    if ref:  # DPO's work a token is still 4 passes; its reference pass just ran before the steps
        numbers = {"steps_tokens_per_s": round(rate), "precompute_s": round(ref[0], 2),
                   "precompute_tokens_per_s": round(ref[1] / ref[0])}
        rate = 1 / (1 / rate + ref[0] / ref[1])
    achieved = rate * flops_per_token(config, params, seq, passes) / 1e12
    peak = peak_tflops(torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu")
    return {"steps_timed": steps, "seconds_timed": round(seconds, 2), "tokens_per_s": round(rate),
            "achieved_tflops": round(achieved, 2), "mfu": round(achieved / peak, 4) if peak and not smoke else None,
            "peak_mem_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2) if torch.cuda.is_available() else None,
            "attention_seq": seq, "params_millions": round(params / 1e6, 1), **numbers}


def run_rows(part: str, out: Path, smoke: bool, seconds: float) -> dict[str, Any]:
    """Every row of `part` (sft | dpo), each written to DIR/<row>.json; returns the first (the part's own)."""
    kernels = fastpath.available_kernels("cpu" if smoke else "cuda")
    rows, train = (SFT_ROWS, sft_row) if part == "sft" else (DPO_ROWS, dpo_row)
    ran: dict[str, set[str]] = {}  # rows that ran -> their options
    choice = stage_choice(part, kernels, smoke)
    for name, (base, option) in rows.items():
        while base is not None and base not in ran:  # a skipped row: build on the last one below it that ran
            base = rows[base][0]
        options = (ran[base] if base else set()) | ({option} if option else set())
        why = unavailable(options, kernels, smoke)
        t0 = time.perf_counter()
        try:
            result = {"skipped": why} if why else train(out, smoke, seconds, row_settings(options, kernels),
                                                        first=name == part)
        except Exception as exc:  # noqa: BLE001 - one row's failure (an OOM, a kernel) must not cost the others
            result = {"error": f"{type(exc).__name__}: {str(exc)[:300]}"}
        status = "skipped" if "skipped" in result else "failed" if "error" in result else "ok"
        if status == "ok":
            ran[name] = options
        result = {"status": status, **result, "base": base, "options": sorted(options),
                  "stage_choice": options == choice, "wall_s": round(time.perf_counter() - t0, 1)}
        (out / f"{name}.json").write_text(json.dumps(result, indent=2))
        print(json.dumps({"row": name, **result}), flush=True)
        _free_memory()
    first = json.loads((out / f"{part}.json").read_text())
    return {k: v for k, v in first.items() if k != "wall_s"}  # the part's own wall time replaces the row's


def _free_memory() -> None:
    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def sft_row(out: Path, smoke: bool, seconds: float, settings: tuple[dict[str, Any], dict[str, Any]],
            first: bool = False) -> dict[str, Any]:
    """TRL SFT in the model's own chat format with the loss on the answers, as the sft stage trains; the first
    row saves the model for the dpo, sample and vllm parts."""
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import SFTConfig, SFTTrainer

    from pipeline.train.templates import resolve_chat_format

    tokenizer = AutoTokenizer.from_pretrained(out / "model")
    fmt = resolve_chat_format(tokenizer, "qwen2-0.5b")
    tokenizer.chat_template = fmt.training
    init, extra = settings
    model = AutoModelForCausalLM.from_pretrained(out / "model", dtype=torch.float32 if smoke else torch.bfloat16,
                                                 **init).to("cpu" if smoke else "cuda")
    batch, seq = (4, 256) if smoke else (16, 1024)
    # 32 batches, cycled until the time is up: tokenizing more only delays the start
    data = Dataset.from_list([{"messages": m} for m in dialogues(batch * (8 if smoke else 32), 60 if smoke else 220,
                                                                 varied=True)])
    box = TimeBox(seconds, warmup=1 if smoke else 3)
    args = trl_args(SFTConfig, out / "sft-ckpt", smoke, per_device_train_batch_size=batch, max_length=seq,
                    assistant_only_loss=True, **extra)
    trainer = SFTTrainer(model=model, args=args, processing_class=tokenizer, train_dataset=data,
                         data_collator=fastpath.padding_free_collator(args, tokenizer), callbacks=[box.callback])
    used = fastpath.summary(trainer)
    trainer.train()
    lengths = [len(tokenizer.apply_chat_template(row["messages"], tokenize=True, return_dict=True)["input_ids"])
               for row in data.select(range(min(64, len(data))))]
    if first:
        tokenizer.chat_template = fmt.native
        trainer.save_model(str(out / "sft"))
        tokenizer.save_pretrained(out / "sft")
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    return {**report(box, model.config, attention_length(lengths, seq), 3, smoke), "settings": used,
            "chat_format": fmt.variant, "batch": batch, "max_length": seq, "padding_share": padding_share(lengths, batch, seq),
            "first_loss": round(losses[0], 3), "last_loss": round(losses[-1], 3)}


def padding_share(lengths: list[int], batch: int, max_length: int) -> float:
    """The share of a padded batch's tokens that are padding, for batches of `batch` in the data's order."""
    cut = [min(n, max_length) for n in lengths]
    groups = [cut[i:i + batch] for i in range(0, len(cut), batch)]
    return round(1 - sum(cut) / sum(max(g) * len(g) for g in groups), 3)


def dpo_row(out: Path, smoke: bool, seconds: float, settings: tuple[dict[str, Any], dict[str, Any]],
            first: bool = False) -> dict[str, Any]:
    """TRL DPO from the SFT model: policy fwd+bwd and the reference's forward, in the step or precomputed."""
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import DPOConfig, __version__

    source = out / "sft" if (out / "sft" / "config.json").is_file() else out / "model"
    init, extra = settings
    load = lambda: AutoModelForCausalLM.from_pretrained(  # noqa: E731 - the policy and the reference alike
        source, dtype=torch.float32 if smoke else torch.bfloat16, **init).to("cpu" if smoke else "cuda")
    tokenizer, policy = AutoTokenizer.from_pretrained(source), load()
    precompute = bool(extra.get("precompute_ref_log_probs"))
    batch, seq, words = (2, 256, 40) if smoke else (8, 1024, 150)
    pairs = preference_pairs(batch * (16 if smoke else 48), words)
    box = TimeBox(seconds, warmup=1 if smoke else 3)
    args = trl_args(DPOConfig, out / "dpo-ckpt", smoke, per_device_train_batch_size=batch, max_length=seq,
                    beta=0.1, learning_rate=5e-7, **extra)
    trainer = timed_dpo_trainer()(model=policy, ref_model=None if precompute else load(), args=args,
                                  processing_class=tokenizer, train_dataset=Dataset.from_list(pairs),
                                  callbacks=[box.callback])
    for cache in trainer.train_dataset.cache_files:  # precomputed log-probs: the next row must compute its own
        Path(cache["filename"]).unlink(missing_ok=True)  # (the open file stays readable until this row ends)
    if args.padding_free and not getattr(trainer, "padding_free", False):
        return {"skipped": f"TRL {__version__}'s DPOTrainer turns padding_free off (it pads)"}
    if precompute and not trainer.ref_tokens:
        raise RuntimeError("the reference log-probs came from a cache: nothing to time")
    used = fastpath.summary(trainer)
    trainer.train()
    lengths = [len(tokenizer.apply_chat_template(p["prompt"] + p["chosen"], tokenize=True, return_dict=True)
                   ["input_ids"]) for p in pairs[:64]]
    ref = (trainer.ref_seconds, trainer.ref_tokens) if precompute else None
    return {**report(box, policy.config, attention_length(lengths, seq), 4, smoke, ref), "settings": used,
            "source": source.name, "pairs_per_step": batch, "max_length": seq}


def timed_dpo_trainer() -> type:
    """DPOTrainer that times the reference log-probs it precomputes (TRL calls compute_ref_log_probs only there)."""
    import torch
    from trl import DPOTrainer

    class TimedDPOTrainer(DPOTrainer):
        ref_seconds, ref_tokens = 0.0, 0

        def compute_ref_log_probs(self, model, inputs):  # noqa: ANN001, ANN202 - TRL's API
            t0 = time.perf_counter()
            logps = super().compute_ref_log_probs(model, inputs)
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            self.ref_seconds += time.perf_counter() - t0
            self.ref_tokens += int(inputs["attention_mask"].sum())
            return logps

    return TimedDPOTrainer


def table(out: Path) -> list[str]:
    """The rows side by side: MFU, tokens/s, the rate over the row it adds its option to and over the part's first
    row (both count the same FLOPs a token), peak memory, and the row that matches the stage's own choice."""
    lines = ["Training rows (each adds one option to its base row; same training time each):", "",
             f"  {'row':<15} {'mfu':>6} {'tok/s':>8} {'x base':>7} {'x plain':>7} {'GiB':>6}  options"]
    for rows in (SFT_ROWS, DPO_ROWS):
        found = {name: _read(out / f"{name}.json") for name in rows}
        plain = found[next(iter(rows))]
        for name, row in found.items():
            if row.get("status") != "ok":
                why = row.get("skipped") or row.get("error") or "not run (timed out or crashed)"
                lines.append(f"  {name:<15} {row.get('status', 'not run'):>6}  {why}")
                continue
            base = found.get(row.get("base") or "", {})
            lines.append(f"  {name:<15} {_fmt(row.get('mfu'), '.3f'):>6} {row['tokens_per_s']:>8} "
                         f"{_fmt(_ratio(row, base), '.2f'):>7} {_fmt(_ratio(row, plain), '.2f'):>7} "
                         f"{_fmt(row.get('peak_mem_gib'), '.1f'):>6}  {' + '.join(row.get('options', [])) or 'none'}"
                         + ("   <- the stage's choice here" if row.get("stage_choice") else ""))
    return lines


def _ratio(row: dict[str, Any], base: dict[str, Any]) -> float | None:
    return row["tokens_per_s"] / base["tokens_per_s"] if base.get("tokens_per_s") else None


def _read(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text()) if path.is_file() else {}


def _fmt(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)
