"""`max_concurrency: auto` against a server with a hidden concurrency limit, side by side with fixed settings.

    python benchmarks/adaptive_concurrency.py [--requests 1000] [--limit 24] [--latency-ms 200] [--rounds 3]
                                              [--fixed 16,24,32,48,64] [--ceiling 256] [--tiny]

The toy teacher answers 429 at once (no Retry-After) to a request that finds `--limit` requests in flight, and
takes `--latency-ms` over the others (long against a 2-core machine's own cost per request, so the server's
limit is what binds, as with a real provider). Each setting runs the whole generate stage (one teacher call
per prompt, the recipe's default retries and backoff) in a run of its own; rounds alternate the order of the
settings, all in one process against one server. Prints, per setting, the median answered prompts per second, the 429 answers
and the prompts that failed after their retries, and for auto where it settled (from the spend ledger, as
`distill status --json` shows it); then
`ratio auto / best fixed (N): X.XXX   429s auto / fixed M: A / B` (target: >= 0.9, fewer 429s).
`--tiny` runs a few hundred requests once, to check the script.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from teacher_throughput import stage_recipe, write_prompts

from pipeline.core.recipe import recipe_from_dict
from pipeline.run.runner import open_run, run_stage
from pipeline.tasks.toy.teacher_server import ToyTeacher, ToyTeacherConfig
from pipeline.teacher.spend import spend_summary


def run_setting(base_url: str, setting: str, ceiling: int, prompts: Path, workdir: Path, tag: str) -> dict[str, Any]:
    """One generate stage at one concurrency setting (a run of its own, so its own response cache): answered
    prompts/s, 429s, failures, the ledger's record of the concurrency."""
    data = stage_recipe(base_url, prompts, workdir / f"runs-{tag}", 1)
    data["teacher"]["max_concurrency"] = setting if setting == "auto" else int(setting)
    if setting == "auto":
        data["teacher"]["max_concurrency_ceiling"] = ceiling
    rec = recipe_from_dict(data)
    store = open_run(rec, "bench")
    t0 = time.perf_counter()
    report = run_stage("generate", rec, store)
    elapsed = time.perf_counter() - t0
    settled = spend_summary(store)["stages"]["generate"]["endpoints"]["teacher"]["concurrency"]
    return {"rate": report.counts["output"] / elapsed, "throttled": int(report.cost["throttled"]),
            "failed": report.counts["failed"], "settled": settled}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=1000)
    parser.add_argument("--limit", type=int, default=24, help="the server's hidden concurrency limit")
    parser.add_argument("--latency-ms", type=float, default=200.0)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--fixed", default="16,24,32,48,64", help="fixed max_concurrency settings to compare")
    parser.add_argument("--ceiling", type=int, default=256)
    parser.add_argument("--tiny", action="store_true", help="a few hundred requests, once: checks the script")
    args = parser.parse_args()
    if args.tiny:
        args.requests, args.rounds, args.fixed, args.latency_ms = 300, 1, "24,64", 50.0
    os.environ.setdefault("TQDM_DISABLE", "1")
    settings = [*args.fixed.split(","), "auto"]
    results: dict[str, list[dict[str, Any]]] = {s: [] for s in settings}
    with tempfile.TemporaryDirectory() as tmp, \
            ToyTeacher(ToyTeacherConfig(max_concurrent=args.limit, latency_ms=args.latency_ms)) as toy:
        prompts = Path(tmp) / "prompts.jsonl"
        write_prompts(prompts, args.requests)
        for r in range(args.rounds):
            for setting in settings if r % 2 == 0 else settings[::-1]:
                res = run_setting(toy.base_url, setting, args.ceiling, prompts, Path(tmp), f"{setting}-{r}")
                results[setting].append(res)
                print(f"  round {r + 1} {setting:>4}: {res['rate']:6.1f} prompts/s, {res['throttled']:5d} 429s, "
                      f"{res['failed']} failed", flush=True)
    print(f"generate stage, {args.requests} prompts a run, server limit {args.limit} at once (429 above), "
          f"latency {args.latency_ms:.0f} ms, {args.rounds} alternating rounds (medians); machine load varies")
    rate = {s: statistics.median(x["rate"] for x in results[s]) for s in settings}
    throttled = {s: statistics.median(x["throttled"] for x in results[s]) for s in settings}
    for s in settings:
        failed = sum(x["failed"] for x in results[s])
        note = ""
        if s == "auto":
            last = results[s][-1]["settled"]
            note = (f"  settled at {[x['settled']['final'] for x in results[s]]} (mean "
                    f"{[x['settled']['mean'] for x in results[s]]}, max {last['max']} of {last['ceiling']})")
        print(f"  {s:>4}: {rate[s]:7.1f} prompts/s  {throttled[s]:7.0f} 429s  {failed:3d} failed{note}")
    fixed = [s for s in settings if s != "auto"]
    best = max(fixed, key=rate.__getitem__)
    worst_429 = max(fixed, key=int)
    print(f"settled: {json.dumps(results['auto'][-1]['settled'])}")
    print(f"ratio auto / best fixed ({best}): {rate['auto'] / rate[best]:.3f}   429s auto / fixed {worst_429}: "
          f"{throttled['auto']:.0f} / {throttled[worst_429]:.0f}   (target >= 0.9, fewer 429s)")


if __name__ == "__main__":
    main()
