"""generate at scale: peak memory and wall time at growing prompt counts, `distill status` on the largest run,
and the ledgers, the response cache and status at a million rows.

Usage: python benchmarks/scale.py [--sizes 2000 20000 200000] [--rows 1000000] [--tiny] [--keep DIR]
                                  [--only scale|rows]

Part 1 runs `distill stage generate` in a fresh process for each size (distinct prompts, one teacher call each,
the built-in toy teacher on loopback with no latency, near-duplicate and dialogue dedup on) and prints its peak
RSS and wall time, checks that every prompt ended in the output, then times `distill status` on the largest
run. Targets: peak RSS at 20 000 <= 1.2x that at 2 000, at 200 000 <= 1.3x that at 20 000; wall time <= 11x
for 10x the prompts; status < 2 s.
Part 2 fills a failure ledger, a response cache and a spend ledger with `--rows` rows and times what a stage and
`distill status` do with them: append, read the ids, prune, look a response up, sum the spend.
`--tiny` (200 and 2 000 prompts, 10 000 rows) is the mode the test suite runs.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from pipeline.core.idset import IdSet  # noqa: E402
from pipeline.core.store import RunStore  # noqa: E402
from pipeline.tasks.toy.teacher_server import ToyTeacher, ToyTeacherConfig  # noqa: E402
from pipeline.teacher.cache import ResponseCache, cache_key  # noqa: E402
from pipeline.teacher.ledger import Charge  # noqa: E402
from pipeline.teacher.messages import ChatRequest, ChatResult  # noqa: E402

WORDS = ("alpha bravo charlie delta echo foxtrot golf hotel india juliet kilo lima mike november oscar papa "
         "quebec romeo sierra tango uniform victor whiskey xray yankee zulu river stone cloud ember").split()


def write_prompts(path: Path, n: int, seed: int = 2) -> None:
    """Distinct prompts (random word strings), so no filter removes any and every one costs a request."""
    rng = random.Random(seed)
    with path.open("w") as fh:
        for i in range(n):
            words = " ".join(rng.choice(WORDS) for _ in range(8))
            fh.write(json.dumps({"prompt": f"Request {i}: {words}. What is {rng.randint(0, 9)} + "
                                           f"{rng.randint(0, 9)}?"}) + "\n")


def write_recipe(path: Path, base_url: str, prompts: Path, root: Path) -> None:
    recipe = {"name": "scale", "storage": {"root": str(root)}, "prompts": {"source": str(prompts)},
              "teacher": {"base_url": base_url, "model": "toy-teacher", "api_key_env": None, "max_concurrency": 64,
                          "timeout_s": 60},
              "generate": {"min_rounds": 1, "max_rounds": 1, "shard_size": 1000, "temperature": 0.0}}
    path.write_text(json.dumps(recipe))  # JSON is YAML


def cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "pipeline.cli", *args]


def child_env() -> dict[str, str]:
    return {**os.environ, "TQDM_DISABLE": "1", "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get(
        "PYTHONPATH", "")]).rstrip(os.pathsep)}


def run_generate(base_url: str, n: int, work: Path) -> dict:
    """One `distill stage generate` process over n prompts: its peak RSS (and RSS along the way), wall and CPU
    time, and the run's counts."""
    prompts, recipe = work / f"prompts-{n}.jsonl", work / f"recipe-{n}.yaml"
    write_prompts(prompts, n)
    write_recipe(recipe, base_url, prompts, work / "runs")
    t0 = time.perf_counter()
    proc = subprocess.Popen(cli("stage", "generate", str(recipe), "--run-name", f"n{n}"), env=child_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    timeline: list[float] = []
    sampler = threading.Thread(target=sample_rss, args=(proc.pid, timeline), daemon=True)
    sampler.start()
    out = proc.stdout.read()
    _, status, usage = os.wait4(proc.pid, 0)  # this child's own peak, not the largest child's so far
    seconds = time.perf_counter() - t0
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        raise SystemExit(f"generate over {n} prompts exited {proc.returncode}:\n{out[-3000:]}")
    store = RunStore.open_existing(str(work / "runs" / f"n{n}"))
    stats = store.read_json(store.join("generate", "stats.json"))
    along = [timeline[min(len(timeline) - 1, int(q * len(timeline)))] for q in (0.25, 0.5, 0.75)] if timeline else []
    return {"n": n, "peak_mib": usage.ru_maxrss / 1024, "seconds": seconds, "cpu": usage.ru_utime + usage.ru_stime,
            "along": along, "counts": stats["counts"], "phases": stats["seconds"], "run_dir": store.url}


def sample_rss(pid: int, timeline: list[float], every_s: float = 0.5) -> None:
    """The process's RSS (MiB) every `every_s` seconds until it exits: does memory grow along the run?"""
    while True:
        try:
            status = Path(f"/proc/{pid}/status").read_text()
        except OSError:
            return
        rss = next((line.split()[1] for line in status.splitlines() if line.startswith("VmRSS:")), None)
        if rss is None:  # a zombie: it has exited
            return
        timeline.append(int(rss) / 1024)
        time.sleep(every_s)


def time_status(run_dir: str, repeats: int = 3) -> tuple[float, float]:
    """The median wall and CPU seconds of `distill status RUN_DIR` (a fresh process: what a user waits for; the
    CPU time is what a busy machine cannot inflate)."""
    wall, cpu = [], []
    for _ in range(repeats):
        t0 = time.perf_counter()
        proc = subprocess.Popen(cli("status", run_dir), env=child_env(), stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL)
        _, status, usage = os.wait4(proc.pid, 0)
        if os.waitstatus_to_exitcode(status) != 0:
            raise SystemExit(f"distill status {run_dir} failed")
        wall.append(time.perf_counter() - t0)
        cpu.append(usage.ru_utime + usage.ru_stime)
    return statistics.median(wall), statistics.median(cpu)


def scale_part(sizes: list[int], work: Path) -> list[str]:
    results = []
    with ToyTeacher(ToyTeacherConfig()) as toy:
        for n in sizes:
            res = run_generate(toy.base_url, n, work)
            complete = res["counts"]["output"] == n and res["counts"]["pending"] == 0
            along = " / ".join(f"{x:.0f}" for x in res["along"])
            print(f"  {n:>7} prompts: peak RSS {res['peak_mib']:7.1f} MiB (at 1/4, 1/2, 3/4 of the run: {along}), "
                  f"{res['seconds']:7.1f} s wall, {res['cpu']:7.1f} s CPU ({n / res['seconds']:.0f} prompts/s; "
                  f"selection {res['phases']['select_prompts']:.1f} s, dialogues {res['phases']['dialogues']:.1f} s), "
                  f"outputs {res['counts']['output']}/{n}{'' if complete else '  INCOMPLETE'}", flush=True)
            results.append(res)
    status_s, status_cpu = time_status(results[-1]["run_dir"])
    print(f"  distill status on the {sizes[-1]}-prompt run: {status_s:.2f} s wall, {status_cpu:.2f} s CPU "
          "(median of 3, a fresh process each)")
    ratios = []
    for small, big in zip(results, results[1:], strict=False):
        target = 1.2 if big["n"] <= 20000 else 1.3  # the issue's: 20 000 vs 2 000, 200 000 vs 20 000
        ratios.append(f"rss {big['n']}/{small['n']} {big['peak_mib'] / small['peak_mib']:.3f} (<= {target})")
        ratios.append(f"wall {big['n']}/{small['n']} {big['seconds'] / small['seconds']:.2f} "
                      f"(<= {1.1 * big['n'] / small['n']:.0f}; CPU {big['cpu'] / small['cpu']:.2f})")
    ratios.append(f"status {status_s:.2f} s (< 2; CPU {status_cpu:.2f} s)")
    ratios.append("outputs " + ("complete" if all(r["counts"]["output"] == r["n"] for r in results) else "INCOMPLETE"))
    return ratios


def rows_part(rows: int, work: Path) -> None:
    """A failure ledger, a response cache and a spend ledger of `rows` rows: what each costs to use."""
    store = RunStore(work / "rows", "million")
    store.init_manifest({"name": "million"}, {}, stages=["generate"])  # as the runner records a run's stages
    ledger = store.ledger("generate")
    t0 = time.perf_counter()
    for start in range(0, rows, 10_000):
        ledger.record_many((f"item-{i}", "HTTP 500", 1) for i in range(start, min(rows, start + 10_000)))
    append_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    ledger.record("item-last", "HTTP 429", 3)  # one more append: a stage's per-item cost
    one_ms = 1000 * (time.perf_counter() - t0)
    mem0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    t0 = time.perf_counter()
    ids = ledger.ids()
    ids_s, ids_mib = time.perf_counter() - t0, ids.nbytes() / 2**20
    t0 = time.perf_counter()
    rewrote = ledger.prune()  # nothing superseded: read through, no rewrite
    prune_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    ledger.prune(IdSet(f"item-{i}" for i in range(0, rows, 100)))  # 1% later succeeded: one streamed rewrite
    rewrite_s = time.perf_counter() - t0
    grew = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - mem0) / 1024
    print(f"  failure ledger of {rows} lines: appended at {rows / append_s:,.0f}/s, one more append {one_ms:.2f} ms; "
          f"ids read in {ids_s:.2f} s ({ids_mib:.1f} MiB held); prune with nothing superseded {prune_s:.2f} s "
          f"({'rewrote' if rewrote else 'no rewrite'}), with 1% succeeded {rewrite_s:.2f} s (one rewrite); "
          f"peak RSS grew {grew:.0f} MiB")
    cache_part(store, rows)


def cache_part(store: RunStore, rows: int) -> None:
    cache = ResponseCache(store.join("cache", "teacher.sqlite"))
    t0 = time.perf_counter()
    for i in range(rows):
        result = ChatResult(texts=[f"answer {i}"], finish_reasons=["stop"], prompt_tokens=5, completion_tokens=2)
        cache.put(cache_key("m", ChatRequest([{"role": "user", "content": f"q{i}"}])), result, None,
                  Charge(f"c{i}", "teacher", "generate", "assistant", "m", 5, 2, 1e-6))
    put_s = time.perf_counter() - t0
    probes = random.Random(0).sample(range(rows), min(rows, 2000))
    t0 = time.perf_counter()
    for i in probes:
        assert cache.get(cache_key("m", ChatRequest([{"role": "user", "content": f"q{i}"}]))) is not None
    get_us = 1e6 * (time.perf_counter() - t0) / len(probes)
    t0 = time.perf_counter()
    total = cache.ledger.total()
    sum_s = time.perf_counter() - t0
    cache.close()
    status_s, status_cpu = time_status(store.url)
    print(f"  response cache of {rows} rows: put {rows / put_s:,.0f}/s (one transaction each), get {get_us:.0f} us; "
          f"spend total ${total:.2f} in {sum_s:.2f} s; distill status {status_s:.2f} s wall, {status_cpu:.2f} s CPU")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[2000, 20000, 200000])
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--tiny", action="store_true", help="200 and 2 000 prompts, 10 000 rows (for tests)")
    parser.add_argument("--keep", type=Path, default=None, help="Work in this directory and leave it there.")
    parser.add_argument("--only", choices=("scale", "rows"), default=None, help="Run one part.")
    args = parser.parse_args()
    sizes, rows = ([200, 2000], 10_000) if args.tiny else (sorted(args.sizes), args.rows)
    with tempfile.TemporaryDirectory() as tmp:
        work = args.keep or Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        if args.only != "rows":
            print(f"generate at {', '.join(map(str, sizes))} prompts (fresh process each, zero-latency toy teacher):")
            ratios = scale_part(sizes, work)
        if args.only != "scale":
            print(f"ledgers and cache at {rows} rows:")
            rows_part(rows, work)
    if args.only != "rows":
        print("ratios: " + "; ".join(ratios))


if __name__ == "__main__":
    main()
