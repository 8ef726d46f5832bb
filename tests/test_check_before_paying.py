"""A student whose chat template sft would refuse is refused by `distill validate` and before `distill run` pays."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from chat_families import FAMILIES, build_family_model, load_tokenizer
from loopback import LoopbackChat, completion
from starlette.responses import JSONResponse

from pipeline.core.recipe import load_recipe
from pipeline.run.checks import check_settings
from pipeline.run.errors import StageFailed
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
    with CountingTeacher() as teacher:
        proc = distill("run", quick, "--no-prefect", "--run-name", "r", *sets,
                       "--set", f"teacher.base_url={teacher.base_url}", "--set", "teacher.model=m")
        assert teacher.requests == 0  # refused before generate sent a request
    assert proc.returncode != 0 and str(refusal.value) in proc.stderr and "Traceback" not in proc.stderr
    assert not (tmp_path / "runs" / "r").exists()  # refused before the run store opened or a teacher started


class CountingTeacher(LoopbackChat):
    """A teacher on loopback that answers every request and counts them."""

    def __init__(self) -> None:
        self.requests = 0

        async def handler(request):
            self.requests += 1
            return JSONResponse(completion("3 + 4 = 7"))

        super().__init__(handler)


def test_the_counting_teacher_does_count_what_a_run_sends(tmp_path):
    with CountingTeacher() as teacher:
        proc = distill("stage", "generate", str(ROOT / "configs/quickstart.yaml"), "--run-name", "r",
                       "--set", f"storage.root={tmp_path}", "--set", "prompts.count=2",
                       "--set", f"teacher.base_url={teacher.base_url}", "--set", "teacher.model=m")
        assert teacher.requests > 0, proc.stdout + proc.stderr


def quickstart(*overrides: str):
    return load_recipe(ROOT / "configs/quickstart.yaml", list(overrides))


def test_an_unresolvable_accelerate_config_is_refused_only_for_training_stages_on_several_gpus():
    rec = quickstart("compute.num_gpus=2", "compute.accelerate_config=nope.yaml")
    with pytest.raises(StageFailed, match="compute.accelerate_config: 'nope.yaml'"):
        check_settings(rec, ["sft"])
    check_settings(rec, ["generate", "sample", "feedback", "evaluate"])
    check_settings(quickstart("compute.num_gpus=1", "compute.accelerate_config=nope.yaml"), ["sft", "dpo"])


def test_an_evaluation_file_of_unknown_shape_is_refused_with_its_line_only_when_evaluate_runs(tmp_path):
    bad = tmp_path / "eval.jsonl"
    bad.write_text('{"nope": 1}\n')
    rec = quickstart(f"evaluate.prompts={bad}")
    with pytest.raises(StageFailed, match=f"{bad} line 1: expected one of"):
        check_settings(rec, ["evaluate"])
    check_settings(rec, ["generate", "sft"])


def test_a_local_pool_member_or_evaluated_model_whose_template_cannot_render_is_refused_by_key(tmp_path):
    model = build_family_model(FAMILIES["chatml"], tmp_path / "m", template=RAISES)
    member = f"{{name: local, backend: transformers, model: {model}, max_tokens: 8}}"
    rec = quickstart(f"sample.pool=[{member}]", "sample.k=1")
    with pytest.raises(StageFailed, match=r"sample.pool\[0\] \(local\): model .*this template renders no"):
        check_settings(rec, ["sample"])
    rec = quickstart(f"evaluate.models=[base, {model}]")
    with pytest.raises(StageFailed, match=r"evaluate.models\[1\]: model .*this template renders no"):
        check_settings(rec, ["evaluate"])
    check_settings(rec, ["generate"])
    good = build_family_model(FAMILIES["chatml"], tmp_path / "good")
    check_settings(quickstart(f"evaluate.models=[base, {good}]"), ["evaluate"])


def test_sft_stage_with_an_untrainable_template_is_a_message_naming_sft_not_a_traceback(tmp_path):
    student = build_family_model(FAMILIES["chatml"], tmp_path / "student", template=RAISES)
    proc = distill("stage", "sft", str(ROOT / "configs/quickstart.yaml"), "--run-name", "r",
                   "--set", f"sft.model={student}", "--set", f"storage.root={tmp_path / 'runs'}")
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0 and "sft would refuse this student" in out and "what to do:" in out, out
    assert "Traceback" not in out
