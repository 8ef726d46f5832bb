"""Every script in benchmarks/ runs: its tiny mode, in a fresh process, prints the line its numbers end in. So a
moved module breaks a test here, not a benchmark nobody runs; the numbers themselves are not checked."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
BENCHMARKS = ROOT / "benchmarks"

# script -> (its tiny mode's arguments, the line it must print, whether it is slow: trains a model or runs whole
# stages; instruction_filter alone is quick)
TINY = {
    "adaptive_concurrency.py": (["--tiny"], r"^ratio auto / best fixed \(\d+\): \d+\.\d{3}   429s auto / fixed 64: "
                                            r"\d+ / \d+", True),
    "teacher_throughput.py": (["--tiny"], r"ratio whole stage / baseline\s*:\s+\d+\.\d{3}(?s:.*)"
                                          r"ratio 400/200: \d+\.\d{3}", True),
    "instruction_filter.py": (["--tiny"], r"^ratio 2k/1k: \d+\.\d{2}  agreement: [01]\.\d{3}$", False),
    "dpo_overhead.py": (["--tiny"], r"^\s+wall ratio stage/plain \(median of 1\): \d+\.\d{3}(?s:.*)"
                                    r"^end-to-end ratio stage/plain \(median of 1\): \d+\.\d{3}$", True),
    "biased_judge.py": (["--tiny"], r"^biased judge: sft=\d\.\d\d dpo_plain=\d\.\d\d dpo_mitigated=\d\.\d\d$", True),
    "gpu_train.py": (["--smoke"], r'"tokens_per_s": \d+,\s+"step_s": [\d.]+(?s:.*)'
                                  r"^ratio stage/plain: steps tokens/s \d+\.\d{3}  stage wall \d+\.\d{3}", True),
    "rounds.py": (["--tiny"], r"^rounds: seed=0 r1=\d\.\d\d r2=\d\.\d\d kept=[12] \(\d+ s\)$", True),
}
# scripts whose tiny run lives in another test (they need a lean interpreter or CUDA), and where
ELSEWHERE = {
    "gpu_check.sh": "test_gpu_check.py::test_gpu_check_runs_whole_in_smoke_mode_on_an_interpreter_without_the_recipe_"
                    "dependencies",
    "gpu_check.py": "test_gpu_check.py::test_gpu_check_runs_whole_in_smoke_mode_on_an_interpreter_without_the_recipe_"
                    "dependencies",
    "gpu_model.py": "test_gpu_check.py::test_flops_per_token_match_what_torch_counts_for_a_training_step",
    "gpu_fastpath.py": "test_gpu_check.py::test_gpu_check_runs_whole_in_smoke_mode_on_an_interpreter_without_the_"
                       "recipe_dependencies",
    "scale.py": "test_scale_benchmark.py::test_scale_benchmark_tiny_mode_prints_its_ratios_and_completes_every_prompt",
}


def test_every_benchmark_has_a_tiny_run_here_or_in_the_test_named():
    scripts = {p.name for p in BENCHMARKS.iterdir() if p.suffix in (".py", ".sh")}
    assert scripts == set(TINY) | set(ELSEWHERE), "give each new benchmark a tiny mode and an entry in TINY"
    for where in ELSEWHERE.values():
        module, test = where.split("::")
        assert f"def {test}(" in (ROOT / "tests" / module).read_text(), where


@pytest.mark.parametrize("script", [pytest.param(name, marks=[pytest.mark.slow] if slow else [])
                                    for name, (_, _, slow) in TINY.items()])
def test_tiny_mode_runs_and_prints_its_ratio_line(script, tmp_path):
    args, line, _ = TINY[script]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TQDM_DISABLE": "1", "TMPDIR": str(tmp_path),
           "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    done = subprocess.run([sys.executable, str(BENCHMARKS / script), *args], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert re.search(line, done.stdout, re.M), done.stdout[-3000:]
