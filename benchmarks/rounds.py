"""On-policy rounds on the toy task: configs/quickstart-rounds.yaml (the quickstart, then up to 3 rounds in which
the previous round's model answers, the teacher rates and corrects, and DPO trains from it), once per seed.

    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/rounds.py [--seeds 0 1] [--root DIR] [--set KEY=VALUE] [--tiny]

Prints, per seed, the held-out ground-truth accuracy of each round that ran and how many rounds were kept:
`rounds: seed=0 r1=0.xx r2=0.xx r3=0.xx kept=3` (target: the best kept round >= r1 + 0.03, every kept round >= the
one before, and the loop stopping at the first round that is not kept). The seed is the training and sampling
seed (sft.args.seed, dpo.args.seed, sample.seed); the prompts and the teacher stay the same. `--tiny` runs a
miniature of it (24 prompts, 2 rounds, a few steps) to check that the script works, not what it measures.
"""

from __future__ import annotations

import argparse
import json
import logging
import tempfile
import time
from pathlib import Path

from pipeline.core.recipe import load_recipe
from pipeline.run.runner import run_pipeline

RECIPE = Path(__file__).resolve().parents[1] / "configs" / "quickstart-rounds.yaml"
TINY = ["prompts.count=24", "generate.max_rounds=1", "sft.args.num_train_epochs=3", "dpo.rounds=2",
        "dpo.args.num_train_epochs=2", "dpo.args.per_device_train_batch_size=4", "evaluate.heldout_count=12"]


def run_seed(root: Path, seed: int, tiny: bool, extra: tuple[str, ...] | list[str] = ()) -> dict:
    """One whole run of the recipe with `seed` (and `extra` overrides); its rounds summary and wall seconds."""
    overrides = [f"storage.root={root}", f"sft.args.seed={seed}", f"dpo.args.seed={seed}", f"sample.seed={seed}",
                 *(TINY if tiny else []), *extra]
    t0 = time.perf_counter()
    store, _ = run_pipeline(load_recipe(RECIPE, overrides), f"rounds-seed{seed}")
    summary = json.loads(Path(store.join("rounds", "summary.json")).read_text())
    return {**summary, "seconds": time.perf_counter() - t0}


def line(seed: int, summary: dict) -> str:
    values = " ".join(f"r{e['round']}={e['value']:.2f}" for e in summary["rounds"] if e["value"] is not None)
    kept = sum(e["kept"] for e in summary["rounds"])
    return f"rounds: seed={seed} {values} kept={kept} ({summary['seconds']:.0f} s)"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--root", type=Path, default=None, help="where the runs go (default: a temporary dir)")
    parser.add_argument("--tiny", action="store_true", help="a miniature run, to check the script works")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="a recipe override, as `distill run --set` (repeatable)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    root = args.root or Path(tempfile.mkdtemp(prefix="rounds-bench-"))
    seeds = args.seeds[:1] if args.tiny else args.seeds
    for seed in seeds:
        summary = run_seed(root, seed, args.tiny, args.overrides)
        for entry in summary["rounds"]:
            print(f"  seed {seed} round {entry['round']}: {entry['reason']}")
        print(line(seed, summary), flush=True)


if __name__ == "__main__":
    main()
