"""A reason that takes more than a fifth of a stage's items is said in the summary with the setting to change."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from pipeline.core.stage import loud_drops

ROOT = Path(__file__).resolve().parent.parent


def test_only_reasons_above_a_fifth_are_warned_and_unknown_ones_get_a_generic_hint():
    warnings = loud_drops("sample", {"truncated_assistant_turn": 1, "odd_reason": 3}, 10)
    assert len(warnings) == 1 and "odd_reason took 3 of 10" in warnings[0] and "sample" in warnings[0]


def test_truncated_turns_in_generate_say_to_raise_max_tokens_in_the_cli_and_stats(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run(
        [sys.executable, "-m", "pipeline.cli", "stage", "generate", str(ROOT / "configs/quickstart.yaml"),
         "--run-name", "short", "--set", f"storage.root={tmp_path}", "--set", "prompts.count=10",
         "--set", "generate.max_tokens=3"], capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr
    assert "truncated_assistant_turn took 10 of 10 items" in proc.stdout
    assert "generate.max_tokens" in proc.stdout
    stats = json.loads((tmp_path / "short/generate/stats.json").read_text())
    assert any("generate.max_tokens" in w for w in stats["warnings"])
