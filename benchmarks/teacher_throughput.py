"""Teacher request path vs a plain AsyncOpenAI + semaphore client, and generate-stage peak memory.

Usage: python benchmarks/teacher_throughput.py [--requests 2000] [--concurrency 64] [--latency-ms 50]
                                               [--rounds 2] [--rss-sizes 2000,20000]
                                               [--stage-concurrency auto] [--tiny]

Part 1 runs, in one process and alternating (after one untimed warm-up pass of each), the baseline
(AsyncOpenAI, semaphore, nothing else) and the `generate` stage (one teacher call per prompt: cache, spend
ledger, retries, rate limiting, budget, shards, failure ledgers, stats) against the toy teacher with a fixed
latency, and prints requests/s and the ratio of the whole stage to the baseline (target >= 0.9).
`--stage-concurrency auto` runs the stage with `max_concurrency: auto` (the baseline keeps `--concurrency`).
Part 2 runs the stage in a fresh subprocess for each size against a zero-latency server and prints peak
RSS (target: the largest/smallest ratio <= 1.3: the stage streams prompts instead of holding them).
`--tiny` runs both parts on a few hundred prompts, once, to check the script.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import openai

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipeline.core.recipe import TeacherConfig, recipe_from_dict
from pipeline.core.work import stream_map
from pipeline.run.runner import open_run, run_stage
from pipeline.tasks.toy.teacher_server import ToyTeacher, ToyTeacherConfig
from pipeline.teacher.cache import ResponseCache
from pipeline.teacher.client import TeacherClient
from pipeline.teacher.messages import ChatRequest, ChatResult

WORDS = ("alpha bravo charlie delta echo foxtrot golf hotel india juliet kilo lima mike november oscar papa "
         "quebec romeo sierra tango uniform victor whiskey xray yankee zulu river stone cloud ember").split()


def write_prompts(path: Path, n: int, seed: int = 0) -> None:
    """Distinct prompts (random word strings), so no filter removes any and every one costs a request."""
    rng = random.Random(seed)
    with path.open("w") as fh:
        for i in range(n):
            a, b = rng.randint(0, 9), rng.randint(0, 9)
            words = " ".join(rng.choice(WORDS) for _ in range(8))
            fh.write(json.dumps({"prompt": f"Request {i}: {words}. What is {a} + {b}?"}) + "\n")


def stage_recipe(base_url: str, prompts: Path, root: Path, concurrency: int) -> dict:
    return {
        "name": "bench",
        "teacher": {"base_url": base_url, "model": "toy-teacher", "api_key_env": None,
                    "max_concurrency": concurrency, "timeout_s": 30},
        "prompts": {"source": str(prompts)},
        "generate": {"min_rounds": 1, "max_rounds": 1, "shard_size": 1000, "temperature": 0.0},
        "storage": {"root": str(root)},
    }


async def baseline(base_url: str, prompts: list[str], concurrency: int) -> float:
    client = openai.AsyncOpenAI(base_url=base_url, api_key="x", max_retries=0)
    sem = asyncio.Semaphore(concurrency)

    async def one(p: str) -> None:
        async with sem:
            await client.chat.completions.create(model="toy-teacher", temperature=0.0, max_tokens=512,
                                                 messages=[{"role": "user", "content": p}])

    t0 = time.perf_counter()
    await asyncio.gather(*(one(p) for p in prompts))
    elapsed = time.perf_counter() - t0
    await client.close()
    return len(prompts) / elapsed


async def request_path(base_url: str, prompts: list[str], concurrency: int, cache_file: Path) -> float:
    """The stage's request path alone: TeacherClient (limits, retries, response cache) driven by stream_map."""
    cfg = TeacherConfig(base_url=base_url, model="toy-teacher", api_key_env=None, max_concurrency=concurrency,
                        timeout_s=30)
    client = TeacherClient(cfg, ResponseCache(cache_file))

    async def one(p: str) -> ChatResult:
        return await client.chat(ChatRequest([{"role": "user", "content": p}], temperature=0.0, max_tokens=512))

    t0 = time.perf_counter()
    async for _, res in stream_map(prompts, one, 2 * concurrency):  # as the generate stage does
        assert not isinstance(res, BaseException), res
    elapsed = time.perf_counter() - t0
    await client.aclose()
    return len(prompts) / elapsed


def stage_rate(base_url: str, prompts: Path, n: int, concurrency: int, tag: str) -> float:
    with tempfile.TemporaryDirectory() as tmp:
        rec = recipe_from_dict(stage_recipe(base_url, prompts, Path(tmp), concurrency))
        store = open_run(rec, f"run-{tag}")
        t0 = time.perf_counter()
        report = run_stage("generate", rec, store)
        elapsed = time.perf_counter() - t0
        assert report.counts["output"] == n, report.counts
        phases = json.loads(Path(store.join("generate", "stats.json")).read_text())["seconds"]
        print(f"    stage {tag}: {elapsed:.2f} s in all, {phases['dialogues']:.2f} s of dialogues, "
              f"{phases['select_prompts']:.2f} s dedup/decontamination")
    return n / elapsed


def throughput(args: argparse.Namespace, workdir: Path) -> None:
    prompts_file = workdir / "prompts.jsonl"
    write_prompts(prompts_file, args.requests, seed=1)
    texts = [json.loads(line)["prompt"] for line in prompts_file.read_text().splitlines()]
    rates: dict[str, list[float]] = {"base": [], "path": [], "stage": []}
    cpu: dict[str, list[float]] = {"base": [], "path": [], "stage": []}  # this process's CPU ms per request

    def measure(kind: str, run: Callable[[], float]) -> None:
        c0 = time.process_time()
        rates[kind].append(run())
        cpu[kind].append(1000 * (time.process_time() - c0) / args.requests)

    with ToyTeacher(ToyTeacherConfig(latency_ms=args.latency_ms)) as toy:
        # one untimed pass of each on a tenth of the prompts: what a process pays once (imports, the first
        # connections, the near-duplicate index's permutations) is not throughput
        warm_file, warm = workdir / "warm.jsonl", max(10, args.requests // 10)
        write_prompts(warm_file, warm, seed=2)
        warm_texts = [json.loads(line)["prompt"] for line in warm_file.read_text().splitlines()]
        asyncio.run(baseline(toy.base_url, warm_texts, args.concurrency))
        asyncio.run(request_path(toy.base_url, warm_texts, args.concurrency, workdir / "cache-warm.sqlite"))
        stage_rate(toy.base_url, warm_file, warm, args.stage_concurrency or args.concurrency, "warm-up")
        for r in range(args.rounds):
            # a suffix per round and client keeps every request new to the cache (same size of work)
            measure("base", lambda r=r: asyncio.run(baseline(toy.base_url, [f"{t} (b{r})" for t in texts],
                                                             args.concurrency)))
            measure("path", lambda r=r: asyncio.run(request_path(
                toy.base_url, [f"{t} (p{r})" for t in texts], args.concurrency, workdir / f"cache-{r}.sqlite")))
            measure("stage", lambda r=r: stage_rate(toy.base_url, prompts_file, args.requests,
                                                    args.stage_concurrency or args.concurrency, str(r)))
    b, p, s = (statistics.median(rates[k]) for k in ("base", "path", "stage"))

    def rounds(kind: str) -> str:
        return (", ".join(f"{x:.0f}" for x in rates[kind]) + f"; client CPU {statistics.median(cpu[kind]):.2f} "
                "ms/request")

    print(f"throughput: {args.requests} requests, concurrency {args.concurrency}, server latency "
          f"{args.latency_ms:.0f} ms, {args.rounds} alternating rounds (median)")
    print(f"  baseline AsyncOpenAI + semaphore        : {b:8.1f} req/s   (rounds: {rounds('base')})")
    print(f"  request path (client + cache + streaming): {p:8.1f} req/s   (rounds: {rounds('path')})")
    print(f"  whole generate stage (dedup, shards, ...): {s:8.1f} req/s   (rounds: {rounds('stage')}; "
          f"max_concurrency {args.stage_concurrency or args.concurrency})")
    print(f"  ratio request path / baseline           : {p / b:8.3f}")
    print(f"  ratio whole stage / baseline            : {s / b:8.3f}   (target >= 0.9)")


CHILD = """
import sys, json, resource
from pathlib import Path
sys.path.insert(0, {root!r})
from pipeline.core.recipe import recipe_from_dict
from pipeline.run.runner import open_run, run_stage
rec = recipe_from_dict(json.loads({recipe!r}))
report = run_stage("generate", rec, open_run(rec, "rss"))
peak_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print(json.dumps({{"output": report.counts["output"], "peak_mb": peak_kb / 1024}}))
"""


def peak_rss(args: argparse.Namespace, workdir: Path) -> None:
    sizes = [int(s) for s in args.rss_sizes.split(",")]
    results = {}
    with ToyTeacher(ToyTeacherConfig()) as toy:
        for n in sizes:
            prompts_file = workdir / f"rss-{n}.jsonl"
            write_prompts(prompts_file, n, seed=2)
            recipe = stage_recipe(toy.base_url, prompts_file, workdir / f"rss-runs-{n}", args.concurrency)
            code = CHILD.format(root=str(Path(__file__).resolve().parents[1]), recipe=json.dumps(recipe))
            t0 = time.perf_counter()
            out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                                 env={**os.environ, "TQDM_DISABLE": "1"})
            res = json.loads(out.stdout.strip().splitlines()[-1])
            res["seconds"] = time.perf_counter() - t0
            assert res["output"] == n, res
            results[n] = res
    print("peak RSS of the generate stage (fresh process each, zero-latency server):")
    for n, res in results.items():
        print(f"  {n:>7} prompts: {res['peak_mb']:8.1f} MiB   ({res['seconds']:.1f} s, {n / res['seconds']:.0f} prompts/s)")
    lo, hi = results[sizes[0]]["peak_mb"], results[sizes[-1]]["peak_mb"]
    print(f"  ratio {sizes[-1]}/{sizes[0]}: {hi / lo:.3f}   (target <= 1.3)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=2000)
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument("--latency-ms", type=float, default=50.0)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--rss-sizes", default="2000,20000")
    parser.add_argument("--skip-rss", action="store_true")
    parser.add_argument("--stage-concurrency", default=None, help="the stage's max_concurrency (a number or auto)")
    parser.add_argument("--tiny", action="store_true", help="a few hundred prompts, once: checks the script")
    args = parser.parse_args()
    if args.tiny:
        args.requests, args.rounds, args.rss_sizes = 300, 1, "200,400"
    if args.stage_concurrency not in (None, "auto"):
        args.stage_concurrency = int(args.stage_concurrency)
    os.environ.setdefault("TQDM_DISABLE", "1")
    with tempfile.TemporaryDirectory() as tmp:
        throughput(args, Path(tmp))
        if not args.skip_rss:
            peak_rss(args, Path(tmp))


if __name__ == "__main__":
    main()
