"""On-policy rounds (`dpo.rounds`): what round r's stages are given, what they read, and whether a round is kept.

Round 1 is the run's own sample → feedback → dpo → evaluate. Round r ≥ 2 runs the same stages on the round's
recipe: the pool's `policy` members (the previous round's model) and those with `later_rounds` answer, the
same feedback settings rate and pair their answers, DPO trains from the previous round's model, and evaluate
compares the new model with it. The round is kept when it beats the previous one by the series' promotion
rule; the first round that does not ends the loop.
"""

from __future__ import annotations

import math
from typing import Any

from pipeline.core.recipe import PromptSource, Recipe
from pipeline.core.rounds import ROUND_STAGES, round_store, split_key, stage_key
from pipeline.core.store import RunStore
from pipeline.series.promotion import decide


def round_keys(recipe: Recipe) -> list[str]:
    """The stages of rounds 2..dpo.rounds, in order (`sample@2`, `feedback@2`, ...)."""
    return [stage_key(stage, r) for r in range(2, recipe.dpo.rounds + 1) for stage in ROUND_STAGES]


def round_recipe(recipe: Recipe, round_: int) -> Recipe:
    """The recipe round `round_`'s stages run with (the recipe itself in round 1)."""
    if round_ == 1:
        return recipe
    pool = [m for m in recipe.sample.pool if m.model == "policy" or m.later_rounds]
    sample = recipe.sample.model_copy(update={"pool": pool, "k": max(1, len(pool))})
    sampler = recipe.feedback.on_policy_sampler.model_copy(update={"model": "policy"})
    feedback = recipe.feedback.model_copy(update={"on_policy_sampler": sampler})
    if recipe.dpo.round_prompts == "fresh":
        sample = sample.model_copy(update={"prompts": fresh_prompts(recipe.sample.prompts or recipe.prompts, round_)})
    evaluate = recipe.evaluate.model_copy(update={"models": ["dpo"], "baseline": "policy"})
    return recipe.model_copy(update={"sample": sample, "feedback": feedback, "evaluate": evaluate})


# a task's draw for round r uses seed + (r - 1) * FRESH_SEED_STRIDE: far from the seeds a user steps through
FRESH_SEED_STRIDE = 7919


def fresh_prompts(src: PromptSource, round_: int) -> PromptSource:
    """Round `round_`'s prompts under `dpo.round_prompts: fresh`: a new draw from a task, the next `limit` rows of
    a file (round 1 answers rows 1..limit, round 2 the next limit, ...)."""
    if src.from_task:
        return src.model_copy(update={"seed": src.seed + (round_ - 1) * FRESH_SEED_STRIDE})
    assert src.limit is not None, "the recipe refuses fresh round prompts from a file without a limit"
    return src.model_copy(update={"skip": src.skip + (round_ - 1) * src.limit})


def round_inputs(stage: str, recipe: Recipe, round_: int) -> list[str]:
    """What round `round_`'s stage reads (round ≥ 2): its round's earlier stage, the previous round's model."""
    previous = stage_key("dpo", round_ - 1)
    rrecipe = round_recipe(recipe, round_)
    uses_sft = any(m.model == "sft" for m in rrecipe.sample.pool)
    on_policy = "on_policy" in recipe.feedback.sources
    inputs = {
        "sample": [previous, *(["sft"] if uses_sft else [])],
        "feedback": [stage_key("sample", round_), *([previous] if on_policy else [])],
        "dpo": ["sft", previous, stage_key("feedback", round_),
                *([stage_key("feedback", q) for q in range(1, round_)] if recipe.dpo.train_on == "all" else [])],
        "evaluate": [stage_key("dpo", round_), previous],
    }
    return inputs[stage]


def round_section(stage: str, recipe: Recipe, round_: int) -> dict[str, Any]:
    """What a round adds to its stage's fingerprint: the round, and for dpo the settings only rounds use."""
    extra: dict[str, Any] = {"round": round_}
    if stage == "dpo":
        extra |= {"reference": recipe.dpo.reference, "train_on": recipe.dpo.train_on}
    return extra


def paired_gain(store: RunStore) -> dict[str, Any] | None:
    """Ground truth of a round's model against its policy on the same items: mean gain and its paired s.e."""
    correct: dict[str, dict[str, float]] = {}
    for row in store.read_records("evaluate", "answers", columns=["item_id", "model", "correct"]):
        if row["correct"] is not None:
            correct.setdefault(row["model"], {})[row["item_id"]] = float(row["correct"])
    new, old = correct.get("dpo", {}), correct.get("policy", {})
    items = sorted(new.keys() & old.keys())
    if len(items) < 2:
        return None
    gains = [new[i] - old[i] for i in items]
    mean = sum(gains) / len(gains)
    var = sum((g - mean) ** 2 for g in gains) / (len(gains) - 1)
    return {"n": len(items), "accuracy": sum(new[i] for i in items) / len(items),
            "previous_accuracy": sum(old[i] for i in items) / len(items), "gain": mean,
            "gain_stderr": math.sqrt(var / len(gains))}


def decide_round(run: RunStore, recipe: Recipe, round_: int) -> dict[str, Any]:
    """Keep round `round_` (≥ 2) when its model beats its policy: on ground truth, the accuracy gain minus
    `evaluate.promote_stderr_k` standard errors must be above 0; without a checker, the win rate's lower bound
    must be above `evaluate.promote_min_win_rate` (the series' promotion rule)."""
    store = round_store(run, round_)
    k = recipe.evaluate.promote_stderr_k
    gain = paired_gain(store)
    report = store.read_json(store.join("evaluate", "report.json")) or {}
    if gain is not None:
        lower = gain["gain"] - k * gain["gain_stderr"]
        keep = lower > 0
        accuracy = ((report.get("evaluation") or {}).get("models", {}).get("dpo") or {}).get("accuracy") or {}
        return {"round": round_, "kept": keep, "measure": "accuracy", "value": gain["accuracy"],
                "stderr": accuracy.get("stderr"), "previous": gain["previous_accuracy"], "lower_bound": lower,
                **gain,
                "reason": f"accuracy {gain['previous_accuracy']:.3f} -> {gain['accuracy']:.3f} over {gain['n']} "
                          f"items: gain {gain['gain']:+.3f} ± {gain['gain_stderr']:.3f}, lower bound (gain - {k:g} "
                          f"s.e.) {lower:+.3f} is {'above' if keep else 'not above'} 0"}
    verdict = decide(report, recipe.evaluate.promote_min_win_rate, candidate="dpo", k=k)
    return {"round": round_, "kept": verdict["promote"], "measure": "win_rate", "value": verdict["win_rate"],
            "previous": 0.5, "lower_bound": verdict["lower_bound"], "stderr": verdict["stderr"],
            "n": verdict["n"], "reason": verdict["reason"]}


SUMMARY = ("rounds", "summary.json")


def read_summary(run: RunStore) -> dict[str, Any]:
    return run.read_json(run.join(*SUMMARY), {}) or {}


def still_running(run: RunStore, key: str) -> bool:
    """False for a stage of a round after the one that ended the loop (it did not beat its policy)."""
    stopped = read_summary(run).get("stopped_after")
    return stopped is None or split_key(key)[1] <= stopped


def round_one(run: RunStore) -> dict[str, Any]:
    """Round 1's line of the summary: its model against the recipe's baseline, from evaluate's report."""
    ev = (run.read_json(run.join("evaluate", "report.json")) or {}).get("evaluation") or {}
    model = (ev.get("models") or {}).get("dpo") or {}
    accuracy, vs = model.get("accuracy"), model.get("vs_baseline") or {}
    if accuracy:
        return {"round": 1, "kept": True, "measure": "accuracy", "value": accuracy["mean"],
                "stderr": accuracy.get("stderr"), "reason": "round 1 is the run's own dDPO round"}
    return {"round": 1, "kept": True, "measure": "win_rate", "value": vs.get("win_rate"),
            "stderr": vs.get("stderr"), "reason": f"round 1 is the run's own dDPO round (vs {ev.get('baseline')})"}


def pair_numbers(store: RunStore) -> dict[str, Any]:
    """A round's pairs: how many, their mean margin, and the chosen/rejected length ratio."""
    report = store.read_json(store.join("feedback", "report.json")) or {}
    return {"pairs": report.get("pairs"), "margin": (report.get("margin") or {}).get("mean"),
            "length_ratio": (report.get("length_bias") or {}).get("mean_length_ratio")}


def record_round(run: RunStore, recipe: Recipe, round_: int) -> dict[str, Any] | None:
    """Decide round `round_` (once its evaluate completed) and write `rounds/summary.json`: each round's
    measure, pairs and decision, the best kept round and its model, and where the loop stopped. Nothing
    for a run of one round."""
    if recipe.dpo.rounds == 1:
        return None
    entry = round_one(run) if round_ == 1 else decide_round(run, recipe, round_)
    store = round_store(run, round_)
    entry |= {**pair_numbers(store), "model": store.join("dpo", "model")}
    summary = read_summary(run)
    rounds = [e for e in summary.get("rounds", []) if e["round"] < round_] + [entry]
    best = max(e["round"] for e in rounds if e["kept"])
    summary = {"max_rounds": recipe.dpo.rounds, "rounds": rounds, "best_round": best,
               "best_model": round_store(run, best).join("dpo", "model"),
               "stopped_after": None if entry["kept"] else round_, "measure": entry["measure"]}
    run.write_json(run.join(*SUMMARY), summary)
    run.write_bytes(run.join("rounds", "rounds.png"), rounds_plot(summary))
    run.write_bytes(run.join("rounds", "report.md"), rounds_markdown(summary, "rounds.png").encode())
    return entry


def rounds_table(summary: dict[str, Any]) -> list[dict[str, Any]]:
    """One row per round: its measure (± s.e.), the gain over its policy, its pairs, and the decision."""
    def num(value: Any) -> Any:
        return None if value is None else round(float(value), 4)

    return [{"round": e["round"], "measure": e["measure"], "value": num(e.get("value")), "stderr": num(e.get("stderr")),
             "gain": num(e.get("gain")), "lower_bound": num(e.get("lower_bound")), "pairs": e.get("pairs"),
             "margin": num(e.get("margin")), "length_ratio": num(e.get("length_ratio")),
             "kept": e["kept"]} for e in summary.get("rounds", [])]


def rounds_markdown(summary: dict[str, Any], plot: str | None = None) -> str:
    """The rounds' table, the best round and where the loop stopped (and the plot, where one is given)."""
    lines = [f"## On-policy rounds ({len(summary.get('rounds', []))} of {summary.get('max_rounds')} run)", "",
             "| round | measure | value ± s.e. | gain | lower bound | pairs | margin | chosen/rejected length | kept |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rounds_table(summary):
        value = "–" if r["value"] is None else f"{r['value']:.3f}" + (f" ± {r['stderr']:.3f}" if r["stderr"] else "")
        lines.append(f"| {r['round']} | {r['measure']} | {value} | {_dash(r['gain'])} | {_dash(r['lower_bound'])} | "
                     f"{_dash(r['pairs'])} | {_dash(r['margin'])} | {_dash(r['length_ratio'])} | "
                     f"{'yes' if r['kept'] else 'no'} |")
    lines += ["", f"Best kept round: {summary.get('best_round')} (`{summary.get('best_model')}`)."]
    if summary.get("stopped_after"):
        reason = next(e["reason"] for e in summary["rounds"] if e["round"] == summary["stopped_after"])
        lines.append(f"The loop stopped after round {summary['stopped_after']}: {reason}.")
    if plot:
        lines += ["", f"![measure by round]({plot})"]
    return "\n".join(lines)


def _dash(value: Any) -> str:
    return "–" if value is None else str(value)


def rounds_plot(summary: dict[str, Any]) -> bytes:
    """The measure by round (± s.e.), kept rounds filled and the others hollow, as a PNG."""
    import io

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in rounds_table(summary) if r["value"] is not None]
    fig, ax = plt.subplots(figsize=(5, 3.2))
    ax.errorbar([r["round"] for r in rows], [r["value"] for r in rows], yerr=[r["stderr"] or 0 for r in rows],
                color="tab:blue", capsize=3, zorder=1)
    for r in rows:
        ax.scatter(r["round"], r["value"], s=45, zorder=2, color="tab:blue" if r["kept"] else "white",
                   edgecolors="tab:blue")
    ax.set(xlabel="round", ylabel=summary.get("measure", "measure"), title="on-policy rounds")
    ax.set_xticks([r["round"] for r in rows])
    buffer = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buffer, format="png", dpi=110)
    plt.close(fig)
    return buffer.getvalue()
