"""AI feedback from a biased judge, without and with the feedback stage's mitigations.

    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/biased_judge.py [--root DIR] [--length-bias 0.3] [--tiny]

The quickstart recipe with a flawed toy rater (the first text shown gains 1, a text gains `--length-bias` per word
beyond the mean of those shown with it, 20 % of ratings are a uniform draw). generate, sft and sample run once
(the flaws touch only the rater, so both variants' fingerprints for those stages are the same) and the run is
copied; then feedback → dpo → evaluate run once plain and once mitigated. Prints how often the judge preferred
the longer of two answers that are both right or both wrong, the feedback reports' bias figures and mitigation
lines, and held-out ground-truth accuracy side by side. Last line:
`biased judge: sft=0.xx dpo_plain=0.xx dpo_mitigated=0.xx` (target: dpo_mitigated >= sft + 0.15, > dpo_plain).
`--tiny` shrinks the run (prompts, training steps, held-out set) to check the script; its numbers mean nothing.
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
import tempfile
from collections import defaultdict
from itertools import combinations
from pathlib import Path
from typing import Any

import yaml

from pipeline.core.recipe import Recipe, recipe_from_dict
from pipeline.core.store import RunStore
from pipeline.run.runner import open_run, run_stage, teacher_endpoint
from pipeline.tasks.toy.task import is_correct

QUICKSTART = Path(__file__).resolve().parents[1] / "configs" / "quickstart.yaml"
SHARED = ("generate", "sft", "sample")
AFTER = ("feedback", "dpo", "evaluate")
MITIGATIONS = {"orders": 4, "drop_order_flips": True}  # every answer of 4 shown first once; MT-Bench's flip rule
LENGTH_MARGIN_PER_WORD = 0.15


TINY = {"prompts": {"count": 24}, "sft": {"args": {"max_steps": 4}}, "dpo": {"args": {"max_steps": 4}},
        "evaluate": {"heldout_count": 8}}


def recipes(root: Path, length_bias: float, tiny: bool = False) -> tuple[Recipe, Recipe]:
    """The quickstart with the flawed judge, plain and mitigated (only the feedback section differs)."""
    data = yaml.safe_load(QUICKSTART.read_text())
    data["storage"]["root"] = str(root)
    for section, keys in TINY.items() if tiny else ():
        for key, value in keys.items():
            data[section][key] = {**data[section][key], **value} if isinstance(value, dict) else value
    data["teacher"]["builtin"].update({"position_bias": 1.0, "length_bias": length_bias, "rater_noise": 0.2})
    plain = recipe_from_dict(data, str(QUICKSTART), QUICKSTART.parent)
    data["feedback"].update(MITIGATIONS)
    data["feedback"]["pairs"]["length_margin_per_word"] = LENGTH_MARGIN_PER_WORD
    return plain, recipe_from_dict(data, str(QUICKSTART), QUICKSTART.parent)


def longer_wins(store: RunStore) -> tuple[float, int]:
    """Share of same-correctness answer pairs of different length (pool items) where the judge's score
    favours the longer one (ties count half), and how many such pairs there were."""
    prompts = {r["prompt_id"]: r["prompt"] for r in store.read_records("sample", "completions",
                                                                       columns=["prompt_id", "prompt"])}
    by_item: dict[str, dict[str, dict[str, Any]]] = defaultdict(dict)
    for r in store.read_records("feedback", "ratings"):
        if r["source"] == "pool" and not r["order"]:
            by_item[r["item_id"]][r["completion_id"]] = r
    texts = {r["completion_id"]: r["completion"] for r in store.read_records(
        "sample", "completions", columns=["completion_id", "completion"])}
    wins, n = 0.0, 0
    for answers in by_item.values():
        for a, b in combinations(answers.values(), 2):
            ta, tb = texts[a["completion_id"]], texts[b["completion_id"]]
            prompt = prompts[a["prompt_id"]]
            if len(ta.split()) == len(tb.split()) or is_correct(prompt, ta) != is_correct(prompt, tb):
                continue
            longer, shorter = (a, b) if len(ta.split()) > len(tb.split()) else (b, a)
            n += 1
            wins += 1.0 if longer["score"] > shorter["score"] else 0.5 if longer["score"] == shorter["score"] else 0.0
    return (wins / n if n else float("nan")), n


def accuracy(store: RunStore, model: str) -> float:
    report = json.loads(Path(store.join("evaluate", "report.json")).read_text())["evaluation"]
    return report["models"][model]["accuracy"]["mean"]


def run(recipe: Recipe, run_name: str, stages: tuple[str, ...]) -> RunStore:
    store = open_run(recipe, run_name)
    with teacher_endpoint(recipe) as live:
        for name in stages:
            report = run_stage(name, live, store)
            print(f"  {run_name}/{name}: {report.message}", flush=True)
    return store


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", type=Path, help="where the runs go (default: a temporary directory)")
    parser.add_argument("--length-bias", type=float, default=0.3, help="rating points per extra word")
    parser.add_argument("--tiny", action="store_true", help="a tiny run: checks the script, measures nothing")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    root = args.root or Path(tempfile.mkdtemp(prefix="biased-judge-"))
    plain, mitigated = recipes(root, args.length_bias, args.tiny)
    print(f"runs under {root}; mitigated feedback: {MITIGATIONS}, "
          f"pairs.length_margin_per_word={LENGTH_MARGIN_PER_WORD}", flush=True)
    run(plain, "plain", SHARED)
    if not (root / "mitigated").exists():
        shutil.copytree(root / "plain", root / "mitigated")  # the same generate, sft and sample
    stores = {"plain": run(plain, "plain", AFTER), "mitigated": run(mitigated, "mitigated", AFTER)}
    share, n = longer_wins(stores["plain"])
    print(f"judge prefers the longer of two same-correctness answers: {share:.2f} of {n} pairs "
          f"(length bias {args.length_bias:g}/word, position 1, noise 0.2)")
    for name, store in stores.items():
        rep = json.loads(Path(store.join("feedback", "report.json")).read_text())
        print(f"{name}: {rep['pairs']} pairs; first-position advantage {rep['first_position_advantage']}; "
              f"chosen longer in {rep['length_bias']['chosen_longer_share']} of pairs")
        for key, line in rep["mitigations"].items():
            print(f"  {key}: {line}")
        print(f"  held-out accuracy: base {accuracy(store, 'base'):.3f}  sft {accuracy(store, 'sft'):.3f}  "
              f"dpo {accuracy(store, 'dpo'):.3f}")
    sft, dpo_plain, dpo_mit = (accuracy(stores["plain"], "sft"), accuracy(stores["plain"], "dpo"),
                               accuracy(stores["mitigated"], "dpo"))
    print(f"target dpo_mitigated >= sft + 0.15 and > dpo_plain: "
          f"{'met' if dpo_mit >= sft + 0.15 and dpo_mit > dpo_plain else 'NOT met'}")
    print(f"biased judge: sft={sft:.2f} dpo_plain={dpo_plain:.2f} dpo_mitigated={dpo_mit:.2f}")


if __name__ == "__main__":
    main()
