"""Training plumbing without training: TRL configs, templates, pairs, checkpoints, launch command, staging."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import yaml

from pipeline.core import environment
from pipeline.core.recipe import ComputeConfig, DPOStageConfig, recipe_from_dict
from pipeline.core.store import RunStore
from pipeline.stages.dpo.stage import to_explicit_preference
from pipeline.stages.sft.stage import dialogue_problem
from pipeline.train import configs, launch, models, outputs, templates

REPO = Path(__file__).resolve().parents[1]


def test_trl_config_takes_recipe_args_over_defaults_and_cpu_settings_over_both() -> None:
    from trl import SFTConfig

    args = configs.build_trl_config(SFTConfig, "sft", {"learning_rate": 1e-3, "bf16": True, "warmup_ratio": 0.2},
                                   {"learning_rate": 2e-5, "num_train_epochs": 2}, Path("/tmp/x"), "cpu")
    assert args.learning_rate == 1e-3 and args.num_train_epochs == 2
    assert args.use_cpu and not args.bf16 and not getattr(args, models.checkpointing_field())
    assert args.warmup_steps == 0.2  # warmup_ratio (gone in transformers 5) is the fraction form of warmup_steps
    assert args.output_dir == "/tmp/x"


def test_unknown_trl_arg_names_the_key_and_suggests_the_field() -> None:
    from trl import DPOConfig

    with pytest.raises(models.TrainingError, match=r"dpo\.args\.betta: unknown TRL DPOConfig field; did you mean beta\?"):
        configs.build_trl_config(DPOConfig, "dpo", {"betta": 0.1}, {}, Path("/tmp/x"), "cpu")


def test_dpo_shorthands_fold_into_args() -> None:
    section = DPOStageConfig(beta=0.05, loss_type=["sigmoid", "sft"], args={"learning_rate": 1e-6})
    assert section.trl_args() == {"beta": 0.05, "loss_type": ["sigmoid", "sft"], "learning_rate": 1e-6}


def test_pairs_become_trl_explicit_prompt_chosen_rejected() -> None:
    user = {"role": "user", "content": "What is 2 + 2?"}
    record = {"chosen": [user, {"role": "assistant", "content": "4"}],
              "rejected": [user, {"role": "assistant", "content": "5"}]}
    assert to_explicit_preference(record) == {"prompt": [user], "chosen": [{"role": "assistant", "content": "4"}],
                                              "rejected": [{"role": "assistant", "content": "5"}]}
    other = {"role": "user", "content": "What is 3 + 3?"}
    assert "different conversations" in to_explicit_preference(
        {"chosen": record["chosen"], "rejected": [other, {"role": "assistant", "content": "5"}]})
    assert "same answer" in to_explicit_preference({"chosen": record["chosen"], "rejected": record["chosen"]})


def test_dialogues_without_an_assistant_answer_are_rejected_with_a_reason() -> None:
    assert dialogue_problem([{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]) is None
    assert dialogue_problem([{"role": "user", "content": "hi"}]) == "no assistant turn with content"
    assert "unknown role" in dialogue_problem([{"role": "bot", "content": "x"}])


def test_student_without_generation_markers_is_refused_unless_its_template_may_be_replaced(tmp_path: Path) -> None:
    from trl.chat_template_utils import is_chat_template_stop_token_trained

    from pipeline.tasks.toy.task import corpus
    from pipeline.train.student import CHAT_TEMPLATE, train_tokenizer

    tokenizer = train_tokenizer(corpus(50, 0))
    own = templates.resolve_chat_format(tokenizer, "tiny")  # the built-in student's template carries markers
    assert (own.variant, own.training, own.native) == ("own-markers", CHAT_TEMPLATE, CHAT_TEMPLATE)
    tokenizer.chat_template = "{% for m in messages %}{{ m['content'] }}\n{% endfor %}"  # no end-of-turn token
    with pytest.raises(models.TrainingError, match="tiny: .*no training variant .*nothing after answer 1 is a special"):
        templates.resolve_chat_format(tokenizer, "tiny")
    fmt = templates.resolve_chat_format(tokenizer, "tiny", replace=True)
    assert fmt.origin == "replaced" and is_chat_template_stop_token_trained(tokenizer, fmt.training)


def test_unknown_student_option_is_an_error() -> None:
    from pipeline.core.recipe import RecipeError

    with pytest.raises(RecipeError, match=r"sft\.student\.hiden_size: unknown key"):
        recipe_from_dict({"task": "toy", "sft": {"student": {"hiden_size": 32}}})


def test_resume_picks_the_newest_complete_checkpoint(tmp_path: Path) -> None:
    for step, complete in ((5, True), (10, True), (15, False)):  # 15 was cut off mid-save
        (tmp_path / f"checkpoint-{step}").mkdir()
        if complete:
            (tmp_path / f"checkpoint-{step}" / "trainer_state.json").write_text("{}")
    assert outputs.last_checkpoint(tmp_path) == str(tmp_path / "checkpoint-10")
    assert outputs.checkpoint_step(outputs.last_checkpoint(tmp_path)) == 10
    assert outputs.last_checkpoint(tmp_path / "missing") is None


def test_accelerate_command_launches_this_package_with_the_shipped_config() -> None:
    compute = ComputeConfig(num_gpus=4, accelerate_config="deepspeed_zero3")
    cmd = launch.accelerate_command("pipeline.stages.dpo", Path("/tmp/r.json"), "s3://bucket/runs/x", compute)
    assert cmd[:3] == [sys.executable, "-m", "accelerate.commands.launch"]
    assert cmd[cmd.index("--config_file") + 1] == str(REPO / "configs/accelerate/deepspeed_zero3.yaml")
    assert cmd[cmd.index("--num_processes") + 1] == "4"
    assert cmd[cmd.index("-m", 3):] == ["-m", "pipeline.stages.dpo", "--recipe", "/tmp/r.json",
                                         "--run", "s3://bucket/runs/x"]
    default = launch.accelerate_command("pipeline.stages.sft", Path("r.json"), "runs/x", ComputeConfig(num_gpus=2))
    assert default[default.index("--config_file") + 1].endswith("configs/accelerate/multi_gpu.yaml")
    with pytest.raises(models.TrainingError, match="compute.accelerate_config: 'nope.yaml'"):
        launch.accelerate_config_path(ComputeConfig(num_gpus=2, accelerate_config="nope.yaml"))


def test_recipes_name_accelerate_configs_relative_to_the_repo_from_any_directory(
        monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.chdir(tmp_path)
    compute = ComputeConfig(num_gpus=8, accelerate_config="configs/accelerate/fsdp.yaml")
    assert launch.accelerate_config_path(compute) == REPO / "configs/accelerate/fsdp.yaml"


def test_student_path_is_relative_to_the_recipe_and_a_hub_id_stays_an_id(tmp_path: Path) -> None:
    from pipeline.core.recipe import load_recipe

    (tmp_path / "students" / "mine").mkdir(parents=True)
    recipe_file = tmp_path / "r.yaml"
    recipe_file.write_text("task: toy\nsft: {model: students/mine}\n")
    assert load_recipe(recipe_file).sft.model == str(tmp_path / "students" / "mine")
    recipe_file.write_text("task: toy\nsft: {model: Qwen/Qwen2.5-0.5B}\n")
    assert load_recipe(recipe_file).sft.model == "Qwen/Qwen2.5-0.5B"


def test_only_the_parent_of_a_multi_gpu_run_launches(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(environment.LAUNCHED, raising=False)
    assert not launch.should_launch(ComputeConfig(num_gpus=1))
    assert launch.should_launch(ComputeConfig(num_gpus=8))
    monkeypatch.setenv(environment.LAUNCHED, "1")
    assert not launch.should_launch(ComputeConfig(num_gpus=8))


@pytest.mark.parametrize("name", ["multi_gpu.yaml", "deepspeed_zero3.yaml", "fsdp.yaml"])
def test_shipped_accelerate_configs_load_in_accelerate(name: str) -> None:
    from accelerate.commands.config.config_args import load_config_from_file

    config = load_config_from_file(str(REPO / "configs" / "accelerate" / name))
    assert config.num_machines == 1 and config.mixed_precision == "bf16"


def test_failed_launch_names_the_stage_and_shows_the_log_tail(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    crash = "import sys; print('loading shards'); print('CUDA out of memory on rank 3'); sys.exit(7)"
    monkeypatch.setattr(launch, "accelerate_command", lambda *a: [sys.executable, "-c", crash])
    recipe = recipe_from_dict({"task": "toy", "storage": {"root": str(tmp_path)}, "compute": {"num_gpus": 2}})
    with pytest.raises(models.TrainingError) as err:
        launch.launch_stage("sft", recipe, RunStore(tmp_path, "r"), entry="pipeline.stages.sft")
    assert "stage 'sft'" in str(err.value) and "exited with code 7" in str(err.value)
    assert "CUDA out of memory on rank 3" in str(err.value)


def test_remote_store_trains_in_a_local_dir_and_uploads_it() -> None:
    store = RunStore("memory://bucket/runs", "remote-run")
    with models.local_stage_dir(store, "sft") as local:
        assert store.is_local is False and local.is_dir()
        (local / "model").mkdir()
        (local / "model" / "config.json").write_text("{}")
        (local / "metrics.json").write_text(yaml.safe_dump({"loss": 1.0}))
    assert store.fs.exists(store.join("sft", "model", "config.json"))
    assert store.fs.exists(store.join("sft", "metrics.json"))
    assert not local.exists()
    assert Path(models.local_model(store, "sft"), "config.json").is_file()


@pytest.mark.slow
def test_multi_gpu_path_runs_the_stage_in_an_accelerate_launched_process(tmp_path: Path) -> None:
    """On CPU accelerate starts one process, but the path is the multi-GPU one: launch, rank, report."""
    import json

    from test_train_toyworld import toy_recipe, write_dialogues

    from pipeline.run.runner import open_run, run_stage

    config = tmp_path / "cpu.yaml"
    config.write_text(yaml.safe_dump({"compute_environment": "LOCAL_MACHINE", "distributed_type": "MULTI_CPU",
                                      "mixed_precision": "no", "num_machines": 1, "num_processes": 2,
                                      "use_cpu": True}))
    recipe = toy_recipe(tmp_path, prompts={"source": "task", "count": 16},
                        sft={"model": "builtin:tiny", "args": {"max_steps": 2, "per_device_train_batch_size": 4}},
                        compute={"num_gpus": 2, "accelerate_config": str(config)})
    store = open_run(recipe, "launched")
    write_dialogues(store, recipe)
    report = run_stage("sft", recipe, store)
    metrics = json.loads(Path(store.join("sft", "metrics.json")).read_text())
    assert metrics["launched"] is True and metrics["global_step"] == 2
    assert report.counts == {"input": 16, "output": 16, "failed": 0}
    assert Path(store.join("sft", "model", "README.md")).is_file()
