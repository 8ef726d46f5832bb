"""`distill estimate`: a run's expected requests, tokens and dollars per stage and endpoint, before anything
is paid, at live and at batch prices, and whether it would pass a cap.

Requests are counted from what the recipe fixes (prompts and their drawn rounds, self-instruct targets, the
pool and k, aspects, the evaluation set and models); input tokens from the rendered prompts; reply lengths
and the re-ask rate are the recipe's `estimate` assumptions. Filters that end dialogues early, identical
answers the judge is not asked about twice and failed requests make a real run cheaper. With `dpo.rounds`
> 1 every round is counted, as if none ended the loop early: the most the run can cost.
"""

from __future__ import annotations

from collections import defaultdict
from typing import Any

from pipeline.core.recipe import Recipe, TeacherConfig, all_endpoints, endpoint_key, unpriced_pool_members
from pipeline.core.rounds import split_key
from pipeline.run.registry import STAGES
from pipeline.run.rounds import round_keys, round_recipe
from pipeline.teacher.demand import Demand, Planner

NUMBERS = ("requests", "input_tokens", "output_tokens", "usd_live", "usd_batch", "usd")


def _zero() -> dict[str, float]:
    return dict.fromkeys(NUMBERS, 0.0)


def priced(demand: Demand, cfg: TeacherConfig) -> dict[str, Any]:
    """A demand's numbers with its dollars at live and batch prices, and at the price its endpoint will pay."""
    live = (demand.input_tokens * cfg.price_input_per_1k + demand.output_tokens * cfg.price_output_per_1k) / 1000
    batch = live * cfg.batch_discount
    return {"requests": demand.requests, "input_tokens": demand.input_tokens, "output_tokens": demand.output_tokens,
            "usd_live": live, "usd_batch": batch, "usd": batch if cfg.batch else live, "batch": cfg.batch}


def _add(into: dict[str, Any], numbers: dict[str, Any]) -> None:
    for key in NUMBERS:
        into[key] = into.get(key, 0.0) + numbers[key]


def estimate(recipe: Recipe) -> dict[str, Any]:
    """Per stage (and endpoint and role within it) and per endpoint: requests, tokens and dollars; the total at
    the price each endpoint pays (batch or live); the caps it would pass."""
    stages: dict[str, Any] = {}
    endpoints: dict[str, dict[str, Any]] = defaultdict(_zero)
    for key in [*STAGES, *round_keys(recipe)]:  # every round, as if none stopped the loop early
        name, round_ = split_key(key)
        spec, rrecipe = STAGES[name], round_recipe(recipe, round_)
        stage = {**_zero(), "endpoints": {}}
        if spec.demand is not None:
            plan = Planner(rrecipe)
            spec.demand(rrecipe, plan)
            for demand, cfg in plan.demands():
                numbers = priced(demand, cfg)
                entry = stage["endpoints"].setdefault(demand.endpoint, {**_zero(), "batch": cfg.batch, "roles": {}})
                entry["roles"][demand.role] = numbers
                for bucket in (entry, stage, endpoints[demand.endpoint]):
                    _add(bucket, numbers)
        stages[key] = stage
    total = _zero()
    for stage in stages.values():
        _add(total, stage)
    return {"recipe": recipe.name, "stages": stages, "endpoints": dict(endpoints), "total_usd": total["usd"],
            "total_usd_live": total["usd_live"], "total_usd_batch": total["usd_batch"],
            "total_requests": total["requests"], "over_caps": over_caps(recipe, total["usd"], endpoints),
            "assumptions": recipe.estimate.model_dump(mode="json"), "notes": unpriced_pool_members(recipe)}


def over_caps(recipe: Recipe, total: float, endpoints: dict[str, dict[str, Any]]) -> list[str]:
    """The caps the estimate passes, each naming its key."""
    over = []
    if recipe.budget.max_cost_usd is not None and total > recipe.budget.max_cost_usd:
        over.append(f"budget.max_cost_usd: the run is estimated at ${total:.2f}, over ${recipe.budget.max_cost_usd:.2f}")
    for name, cfg in all_endpoints(recipe).items():
        spend = endpoints.get(name, {}).get("usd", 0.0)
        if cfg.max_cost_usd is not None and spend > cfg.max_cost_usd:
            over.append(f"{endpoint_key(name)}.max_cost_usd: endpoint '{name}' is estimated at ${spend:.2f}, "
                        f"over ${cfg.max_cost_usd:.2f}")
    return over


def estimate_table(result: dict[str, Any]) -> list[str]:
    """The estimate as lines of a table: stage, endpoint, requests, tokens in/out, dollars live / batch."""
    lines = [f"{'stage':<11} {'endpoint':<14} {'requests':>9} {'tokens in':>11} {'tokens out':>11} "
             f"{'$ live':>10} {'$ batch':>10}"]
    lines.append("-" * len(lines[0]))
    for stage, numbers in result["stages"].items():
        for endpoint, e in numbers["endpoints"].items():
            mode = " (batch)" if e["batch"] else ""
            lines.append(f"{stage:<11} {endpoint:<14} {e['requests']:>9.0f} {e['input_tokens']:>11.0f} "
                         f"{e['output_tokens']:>11.0f} {e['usd_live']:>10.4f} {e['usd_batch']:>10.4f}{mode}")
    lines.append(f"total: {result['total_requests']:.0f} requests, ${result['total_usd']:.4f} at the prices the "
                 f"endpoints pay (${result['total_usd_live']:.4f} all live, ${result['total_usd_batch']:.4f} all batch)")
    return lines
