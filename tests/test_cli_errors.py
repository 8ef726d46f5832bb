"""Errors the stages raise reach the user as a message and an exit code, never as a traceback."""

from __future__ import annotations

import importlib
import os
import pkgutil
import subprocess
import sys
from pathlib import Path

import pipeline
from pipeline.cli.common import as_cli_error
from pipeline.run.errors import DistillFailed

ROOT = Path(__file__).resolve().parent.parent


def pipeline_error_classes() -> list[type[BaseException]]:
    """Every exception class defined in the pipeline package (a new one is covered without editing this)."""
    for mod in pkgutil.walk_packages(pipeline.__path__, "pipeline."):
        if ".tasks." in mod.name or mod.name.endswith("__main__"):
            continue
        importlib.import_module(mod.name)
    seen, todo = [], [BaseException]
    while todo:
        for sub in todo.pop().__subclasses__():
            todo.append(sub)
            if sub.__module__.startswith("pipeline.") and not sub.__module__.startswith("pipeline.cli") \
                    and sub is not DistillFailed and sub not in seen:  # DistillFailed: a message already mapped
                seen.append(sub)
    return seen


def test_every_pipeline_error_class_maps_to_a_message_with_advice_and_a_nonzero_code():
    classes = pipeline_error_classes()
    assert len(classes) >= 15, [c.__name__ for c in classes]
    for cls in classes:
        try:
            exc = cls("stage 'x': something named went wrong")
        except TypeError:
            exc = cls.__new__(cls)
            exc.args = ("stage 'x': something named went wrong",)
        err = as_cli_error(exc)
        assert err is not None, cls
        assert err.exit_code != 0 and "something named went wrong" in err.message, cls
        assert "what to do:" in err.message, cls


def test_unexpected_errors_are_left_to_show_their_traceback():
    assert as_cli_error(KeyError("bug")) is None


def test_bad_prompts_file_fails_generate_with_the_file_and_line_and_no_traceback(tmp_path):
    bad = tmp_path / "prompts.jsonl"
    bad.write_text('{"nope": 1}\n')
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run(
        [sys.executable, "-m", "pipeline.cli", "stage", "generate", str(ROOT / "configs/quickstart.yaml"),
         "--run-name", "bad", "--set", f"storage.root={tmp_path / 'runs'}", "--set", f"prompts.source={bad}"],
        capture_output=True, text=True, timeout=300, env=env)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 2, out
    assert f"{bad} line 1" in out and "what to do:" in out
    assert "Traceback" not in out


def test_a_known_error_in_any_command_is_a_message_and_an_exit_code():
    import click
    from click.testing import CliRunner

    from pipeline.cli import MappedGroup
    from pipeline.train.models import TrainingError

    @click.group(cls=MappedGroup)
    def group() -> None:
        pass

    @group.command()
    def broken() -> None:
        raise TrainingError("dpo: no usable pairs")

    result = CliRunner().invoke(group, ["broken"])
    assert result.exit_code == 1 and "TrainingError: dpo: no usable pairs" in result.output
    assert "what to do:" in result.output and result.exc_info[0] is SystemExit


def test_under_prefect_a_failed_stage_ends_the_flow_run_with_the_mapped_message_and_no_traceback(tmp_path):
    bad = tmp_path / "prompts.jsonl"
    bad.write_text('{"nope": 1}\n')
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1", "PREFECT_HOME": str(tmp_path / "prefect")}
    env.pop("PREFECT_API_URL", None)
    proc = subprocess.run(
        [sys.executable, "-m", "pipeline.cli", "run", str(ROOT / "configs/quickstart.yaml"), "--stages", "generate",
         "--run-name", "bad", "--set", f"storage.root={tmp_path / 'runs'}", "--set", f"prompts.source={bad}"],
        capture_output=True, text=True, timeout=300, env=env)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 2, out
    mapped = f"stage 'generate': DataError: {bad} line 1"
    # the flow run's final state carries the message, and the CLI prints it
    assert f"Finished in state Failed(\"Flow run encountered an exception: DistillFailed: {mapped}" in out, out
    assert f"Error: {mapped}" in out and "what to do:" in out
    assert "Traceback" not in out


def distill_out(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1"}
    return subprocess.run([sys.executable, "-m", "pipeline.cli", *args], capture_output=True, text=True,
                          timeout=600, env=env)


def test_dpo_without_usable_pairs_is_a_training_error_message_naming_dpo(tmp_path):
    proc = distill_out("run", str(ROOT / "configs/quickstart.yaml"), "--no-prefect", "--run-name", "r",
                       "--stages", "generate,sft,sample,feedback,dpo", "--set", f"storage.root={tmp_path}",
                       "--set", "prompts.count=6", "--set", "sft.args.num_train_epochs=1",
                       "--set", "feedback.pairs.min_margin=10")  # no pair can differ by 10 points
    out = proc.stdout + proc.stderr
    assert proc.returncode == 1, out[-3000:]
    assert "Error: stage 'dpo': TrainingError: dpo: no usable pairs" in out and "what to do:" in out, out[-3000:]
    assert "Traceback" not in out


def test_a_budget_cap_stops_generate_with_a_message_and_no_traceback(tmp_path):
    proc = distill_out("stage", "generate", str(ROOT / "configs/quickstart.yaml"), "--run-name", "r",
                       "--set", f"storage.root={tmp_path}", "--set", "prompts.count=20",
                       "--set", "teacher.price_input_per_1k=1000", "--set", "budget.max_cost_usd=0.5")
    out = proc.stdout + proc.stderr
    assert proc.returncode == 1, out[-3000:]
    assert "stage 'generate' failed: stopped early" in out and "budget.max_cost_usd" in out, out[-3000:]
    assert "Traceback" not in out


def test_evaluate_with_an_evaluation_file_of_unknown_shape_names_the_file_and_line(tmp_path):
    bad = tmp_path / "eval.jsonl"
    bad.write_text('{"nope": 1}\n')
    proc = distill_out("stage", "evaluate", str(ROOT / "configs/quickstart.yaml"), "--run-name", "r",
                       "--set", f"storage.root={tmp_path}", "--set", f"evaluate.prompts={bad}")
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0 and f"evaluate would refuse its inputs: {bad} line 1" in out, out[-3000:]
    assert "what to do:" in out and "Traceback" not in out
