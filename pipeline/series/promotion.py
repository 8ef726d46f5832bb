"""The promotion gate of a scheduled series: a new model becomes current only if it beats the current one.

Beating means more than a point estimate: the win rate's lower bound, win rate - k x standard error, must be
above the threshold (0.5 by default), so a tie, or a lead within the noise, keeps the current model.

The flow evaluates the run with `evaluate.baseline` = the series' current model (`with_current_baseline`),
then records `promotion_for_run(...)` with `Series.record(..., promotion=...)`.
"""

from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Any

from pipeline.core.recipe import Recipe
from pipeline.core.store import RunStore

DEFAULT_K = 2.0  # evaluate.promote_stderr_k: about a 97.5 % one-sided bound


def decide(report: dict[str, Any], min_win_rate: float, candidate: str | None = None,
           k: float = DEFAULT_K) -> dict[str, Any]:
    """Promote `candidate` (default: the report's) only if its win rate against the report's baseline minus `k`
    standard errors is above `min_win_rate`; `report` is report.json's `evaluation` section (or all of it)."""
    ev = report.get("evaluation", report)
    candidate = candidate or ev.get("candidate")
    model = (ev.get("models") or {}).get(candidate) or {}
    vs = model.get("vs_baseline") or {}
    decision = {"promote": False, "candidate": candidate, "candidate_path": model.get("path"),
                "baseline": ev.get("baseline"), "baseline_spec": ev.get("baseline_spec"),
                "min_win_rate": min_win_rate, "k": k, "win_rate": vs.get("win_rate"), "stderr": vs.get("stderr"),
                "lower_bound": None, "n": vs.get("n", 0), "wins": vs.get("wins"), "ties": vs.get("ties"),
                "losses": vs.get("losses"), "decided_at": time.time()}
    if not model:
        return {**decision, "reason": f"the candidate '{candidate}' was not evaluated"}
    if candidate == ev.get("baseline"):
        return {**decision, "reason": f"the candidate '{candidate}' is the baseline itself"}
    if not vs.get("n") or vs.get("win_rate") is None:
        return {**decision, "reason": f"no pairwise judgment of '{candidate}' against '{ev.get('baseline')}'"}
    if vs["n"] < 2 or vs.get("stderr") is None or not math.isfinite(vs["stderr"]):
        return {**decision, "reason": f"{vs['n']} comparison(s) of '{candidate}' with '{ev.get('baseline')}' give "
                                      "no standard error; the gate needs at least 2"}
    lower = vs["win_rate"] - k * vs["stderr"]
    promote = lower > min_win_rate
    return {**decision, "promote": promote, "lower_bound": lower,
            "reason": f"win rate of {candidate} vs {ev.get('baseline')} {vs['win_rate']:.3f} ± {vs['stderr']:.3f} "
                      f"over {vs['n']} prompts: its lower bound (win rate - {k:g} s.e.) {lower:.3f} is "
                      f"{'above' if promote else 'not above'} {min_win_rate:g}"}


def with_current_baseline(recipe: Recipe, current_model: str | None) -> Recipe:
    """The recipe with the series' current model as the evaluation baseline (unchanged when there is none)."""
    if not current_model:
        return recipe
    evaluate = recipe.evaluate.model_copy(update={"baseline": current_model})
    return recipe.model_copy(update={"evaluate": evaluate})


def promotion_for_run(store: RunStore, current_model: str | None,
                      min_win_rate: float | None = None) -> dict[str, Any]:
    """The decision to record for a finished run of a series, from its evaluate/report.json.

    No current model yet: the run's model becomes current. Otherwise evaluate must have completed, judging the
    candidate against exactly `current_model`, with a win rate lower bound above min_win_rate (default: the
    recipe's).
    """
    if not current_model:
        return {"promote": True, "reason": "the series has no current model yet", "decided_at": time.time()}
    keep = {"promote": False, "current_model": current_model, "decided_at": time.time()}
    state = store.stage_state("evaluate")
    if state.status != "completed":
        return {**keep, "reason": f"the evaluate stage of {store.run_name} is {state.status}; the current model stays"}
    ev = (store.read_json(store.join("evaluate", "report.json")) or {}).get("evaluation")
    if not ev:
        return {**keep, "reason": f"no evaluation in {store.url}/evaluate/report.json; the current model stays"}
    threshold = ev["promote_min_win_rate"] if min_win_rate is None else min_win_rate
    decision = {**decide(ev, threshold, k=ev.get("promote_stderr_k", DEFAULT_K)), "current_model": current_model}
    if _same_model(ev.get("baseline_spec"), current_model):
        return decision
    return {**decision, "promote": False,
            "reason": f"the report's baseline is '{ev.get('baseline_spec')}', not the current model "
                      f"'{current_model}'; evaluate with evaluate.baseline set to it (with_current_baseline)"}


def _same_model(a: str | None, b: str) -> bool:
    if a is None:
        return False
    if a == b:
        return True
    return "://" not in a and "://" not in b and Path(a).expanduser().resolve() == Path(b).expanduser().resolve()
