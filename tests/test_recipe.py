"""Recipe validation: shipped configs pass; bad input names the file and key path and writes nothing."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from pipeline.core.recipe import RecipeError, load_recipe

DISTILL = [sys.executable, "-m", "pipeline.cli"]


def distill(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([*DISTILL, *args], cwd=cwd, capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize("name", ["quickstart.yaml", "zephyr-7b-beta.yaml"])
def test_shipped_recipes_validate(repo_root: Path, tmp_path: Path, name: str):
    res = distill("validate", str(repo_root / "configs" / name), cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    assert "valid recipe" in res.stdout
    assert list(tmp_path.iterdir()) == []  # validate writes nothing


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("teacher:\n  modle: gpt-4\n", "teacher.modle: unknown key"),
        ("sft:\n  args: 3\n", "sft.args: Input should be a valid dictionary"),
        ("generate:\n  max_rounds: many\n", "generate.max_rounds"),
        ("prompts:\n  source: no/such/prompts.jsonl\n", "prompts.source"),
        ("teacher:\n  model: [gpt\n  x: 1\n", "line 3"),
        ("generate:\n  self_instruct:\n    rouge_threshold: 2\n", "generate.self_instruct.rouge_threshold"),
        ("sample:\n  k: 3\n  pool:\n    - {name: a, backend: openai, model: m}\n", "k (3) cannot exceed"),
        ("- just\n- a list\n", "expected a mapping"),
    ],
)
def test_bad_recipe_exits_nonzero_naming_file_and_key(tmp_path: Path, text: str, expected: str):
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    res = distill("run", str(path), cwd=tmp_path)
    assert res.returncode == 2
    assert str(path.name) in res.stderr and expected in res.stderr, res.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.yaml"]  # nothing half-written


def test_missing_recipe_file_is_named(tmp_path: Path):
    with pytest.raises(RecipeError, match="nope.yaml: recipe file not found"):
        load_recipe(tmp_path / "nope.yaml")


def test_overrides_set_nested_keys_and_parse_yaml_values(repo_root: Path):
    rec = load_recipe(repo_root / "configs/quickstart.yaml",
                      ["teacher.model=gpt-4o", "dpo.beta=0.05", "generate.filters.dedup=false",
                       "sft.args.learning_rate=1e-4"])
    assert rec.teacher.model == "gpt-4o"
    assert rec.dpo.beta == 0.05
    assert rec.generate.filters.dedup is False
    assert rec.sft.args["learning_rate"] == 1e-4


def test_override_of_unknown_key_is_an_error(repo_root: Path):
    with pytest.raises(RecipeError, match=r"teacher\.nmae: unknown key"):
        load_recipe(repo_root / "configs/quickstart.yaml", ["teacher.nmae=x"])
    with pytest.raises(RecipeError, match="expected KEY.PATH=VALUE"):
        load_recipe(repo_root / "configs/quickstart.yaml", ["teacher.model"])


def test_relative_prompt_paths_resolve_against_the_recipe_folder(tmp_path: Path):
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "p.jsonl").write_text('{"prompt": "hi"}\n')
    (tmp_path / "r.yaml").write_text("teacher:\n  base_url: http://127.0.0.1:8000/v1\nprompts:\n  source: data/p.jsonl\n")
    rec = load_recipe(tmp_path / "r.yaml")
    assert rec.prompts.source == str((tmp_path / "data" / "p.jsonl").resolve())


def test_every_command_has_help(tmp_path: Path):
    for cmd in ["validate", "run", "stage", "status", "report", "teacher", "build-student", "deploy", "serve"]:
        res = distill(cmd, "--help", cwd=tmp_path)
        assert res.returncode == 0 and "Usage:" in res.stdout, (cmd, res.stderr)


@pytest.mark.parametrize(
    ("override", "expected"),
    [
        ("sft.args.lerning_rate=0.001", "sft.args.lerning_rate: unknown TRL SFTConfig field; did you mean learning_rate?"),
        ("dpo.args.max_length=lots", "dpo.args.max_length: 'lots' is not a valid value"),
        ("dpo.args.beta=-1", "dpo.args"),
        ("dpo.args.output_dir=/tmp/x", "dpo.args.output_dir"),
    ],
)
def test_validate_checks_trl_arguments_as_trl_reads_them(repo_root: Path, tmp_path: Path, override: str,
                                                         expected: str):
    res = distill("validate", str(repo_root / "configs" / "quickstart.yaml"), "--set", override, cwd=tmp_path)
    assert res.returncode == 2, res.stdout
    assert expected in res.stderr and "quickstart.yaml" in res.stderr, res.stderr
    assert list(tmp_path.iterdir()) == []


def test_trl_numbers_written_as_text_become_numbers(repo_root: Path):
    from trl import SFTConfig

    from pipeline.train.configs import checked_args

    assert checked_args(SFTConfig, "sft", {"learning_rate": "2e-5", "lr_scheduler_type": "cosine"}) == {
        "learning_rate": 2e-5, "lr_scheduler_type": "cosine"}


@pytest.mark.parametrize("text", ["", "# only a comment\n", "{}\n"])
def test_an_empty_recipe_is_an_error(tmp_path: Path, text: str):
    path = tmp_path / "empty.yaml"
    path.write_text(text)
    res = distill("validate", str(path), cwd=tmp_path)
    assert res.returncode == 2 and "empty.yaml: the recipe is empty" in res.stderr, res.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["empty.yaml"]


def test_a_task_or_checker_that_cannot_be_found_is_named(tmp_path: Path):
    path = tmp_path / "r.yaml"
    path.write_text("task: no_such_task\nprompts: {source: task}\n")
    with pytest.raises(RecipeError, match="task: no task named 'no_such_task'; registered tasks: .*toy"):
        load_recipe(path)
    path.write_text("task: toy\nprompts: {source: task}\nevaluate: {checker: 'nowhere.at_all:check'}\n")
    with pytest.raises(RecipeError, match="evaluate.checker: cannot import 'nowhere.at_all'"):
        load_recipe(path)
    path.write_text("prompts: {source: task}\nteacher: {base_url: 'http://x/v1'}\n")
    with pytest.raises(RecipeError, match="prompts.source is 'task' but the recipe names no task"):
        load_recipe(path)
    path.write_text("task: toy\nprompts: {source: task}\nteacher: {builtin: {error_rate: 3}}\n")
    with pytest.raises(RecipeError, match="teacher.builtin.error_rate: Input should be less than or equal to 1"):
        load_recipe(path)
