"""A student whose chat template sft would refuse is refused by `distill validate` and before `distill run` pays."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from chat_families import FAMILIES, build_family_model, load_tokenizer

from pipeline.train.templates import ChatTemplateError, resolve_chat_format

ROOT = Path(__file__).resolve().parent.parent
RAISES = "{{ raise_exception('this template renders no conversation') }}"


def distill(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1"}
    return subprocess.run([sys.executable, "-m", "pipeline.cli", *args], capture_output=True, text=True,
                          timeout=300, env=env)


def test_untrainable_student_fails_validate_with_sfts_message_and_run_writes_nothing(tmp_path):
    student = build_family_model(FAMILIES["chatml"], tmp_path / "student", template=RAISES)
    with pytest.raises(ChatTemplateError) as refusal:
        resolve_chat_format(load_tokenizer(student), str(student))
    sets = ["--set", f"sft.model={student}", "--set", f"storage.root={tmp_path / 'runs'}"]
    quick = str(ROOT / "configs/quickstart.yaml")
    proc = distill("validate", quick, *sets)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert str(refusal.value) in proc.stderr and "Traceback" not in proc.stderr
    proc = distill("run", quick, "--no-prefect", "--run-name", "r", *sets)
    assert proc.returncode != 0 and str(refusal.value) in proc.stderr and "Traceback" not in proc.stderr
    assert not (tmp_path / "runs" / "r").exists()  # refused before the run store opened or a teacher started


def test_sft_stage_with_an_untrainable_template_is_a_message_naming_sft_not_a_traceback(tmp_path):
    student = build_family_model(FAMILIES["chatml"], tmp_path / "student", template=RAISES)
    proc = distill("stage", "sft", str(ROOT / "configs/quickstart.yaml"), "--run-name", "r",
                   "--set", f"sft.model={student}", "--set", f"storage.root={tmp_path / 'runs'}")
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0 and "sft would refuse this student" in out and "what to do:" in out, out
    assert "Traceback" not in out
