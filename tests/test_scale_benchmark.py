"""benchmarks/scale.py runs in its tiny mode: a move of code breaks this test, not a benchmark nobody runs. It
asserts that the run completes and prints its measurements, never the timings themselves."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow  # it runs generate twice and fills a cache of 10 000 rows: about a minute
def test_scale_benchmark_tiny_mode_prints_its_ratios_and_completes_every_prompt(tmp_path: Path):
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "scale.py"), "--tiny", "--keep", str(tmp_path)],
                          capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    ratios = next(line for line in proc.stdout.splitlines() if line.startswith("ratios: "))
    assert re.search(r"rss 2000/200 \d+\.\d+ \(<= 1\.2\)", ratios), ratios
    assert re.search(r"wall 2000/200 \d+\.\d+", ratios) and re.search(r"status \d+\.\d+ s", ratios), ratios
    assert ratios.endswith("outputs complete"), ratios
    for n in (200, 2000):
        assert re.search(rf"^\s+{n} prompts: peak RSS .* outputs {n}/{n}$", proc.stdout, re.M), proc.stdout
    assert re.search(r"failure ledger of 10000 lines: .*no rewrite", proc.stdout), proc.stdout
    assert re.search(r"response cache of 10000 rows: .*distill status \d", proc.stdout), proc.stdout
    assert len(list((tmp_path / "runs" / "n2000" / "generate").glob("data-*.parquet"))) == 2
