"""`distill export`: a quickstart run's dialogues and pairs as one DatasetDict in the field's splits, with a card,
loadable by `datasets` and trainable with TRL as it comes off the disk."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import datasets
import pytest
import yaml
from click.testing import CliRunner

from pipeline.cli import main
from pipeline.core.store import RunStore, StageState
from pipeline.export.dataset import to_ultrafeedback_scale
from pipeline.export.splits import is_test

QUICKSTART = Path(__file__).resolve().parents[1] / "configs" / "quickstart.yaml"
SMALL = ["prompts.count=60", "generate.max_rounds=2", "sft.args.num_train_epochs=4", "evaluate.heldout_count=10"]
SFT_COLUMNS = ["prompt", "prompt_id", "messages"]
PREFS_COLUMNS = ["prompt", "prompt_id", "chosen", "rejected", "messages", "score_chosen", "score_rejected"]


def _distill(*args: str) -> Any:
    return CliRunner().invoke(main, list(args), catch_exceptions=False)


@pytest.fixture(scope="module")
def quickstart(tmp_path_factory: pytest.TempPathFactory) -> RunStore:
    """The quickstart recipe, made small, run up to feedback without Prefect."""
    root = tmp_path_factory.mktemp("runs")
    sets = [arg for item in [*SMALL, f"storage.root={root}"] for arg in ("--set", item)]
    result = _distill("run", str(QUICKSTART), "--no-prefect", "--run-name", "qs", "--stages",
                      "generate,sft,sample,feedback", *sets)
    assert result.exit_code == 0, result.output
    return RunStore.open_existing(str(root / "qs"))


@pytest.fixture(scope="module")
def exported(quickstart: RunStore, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("export") / "qs-data"
    result = _distill("export", quickstart.url, str(out), "--test-share", "0.25", "--license", "cc-by-nc-4.0")
    assert result.exit_code == 0, result.output
    assert "train_prefs" in result.output and "README.md" in result.output
    return out


def test_export_has_the_six_splits_disjoint_by_prompt_id(quickstart: RunStore, exported: Path) -> None:
    ds = datasets.load_from_disk(str(exported))
    assert list(ds) == ["train_sft", "test_sft", "train_gen", "test_gen", "train_prefs", "test_prefs"]
    for name, split in ds.items():
        assert split.column_names == (PREFS_COLUMNS if name.endswith("prefs") else SFT_COLUMNS), name
        assert split.num_rows > 0, name
    ids = {name: set(split["prompt_id"]) for name, split in ds.items()}
    train = ids["train_sft"] | ids["train_gen"] | ids["train_prefs"]
    test = ids["test_sft"] | ids["test_gen"] | ids["test_prefs"]
    assert not train & test
    assert all(is_test(pid, 0.25) for pid in test) and not any(is_test(pid, 0.25) for pid in train)

    # every dialogue of the run once, in sft and (cut before its last answer) in gen
    dialogues = {r["prompt_id"]: r for r in quickstart.read_records("generate")}
    assert ids["train_sft"] | ids["test_sft"] == ids["train_gen"] | ids["test_gen"] == set(dialogues)
    assert ds["train_sft"].num_rows + ds["test_sft"].num_rows == quickstart.stage_state("generate").counts["output"]
    for sft, gen in ((ds["train_sft"], ds["train_gen"]), (ds["test_sft"], ds["test_gen"])):
        whole = {r["prompt_id"]: r["messages"] for r in sft}
        for row in gen:
            assert row["messages"][-1]["role"] == "user" and row["messages"] == whole[row["prompt_id"]][:len(row["messages"])]
            assert whole[row["prompt_id"]][len(row["messages"])]["role"] == "assistant"
    assert ds["train_sft"]["prompt_id"] == sorted(ds["train_sft"]["prompt_id"])  # an order that can be reproduced

    # prefs: every pair of the run, scores on ultrafeedback_binarized's 1-10 scale
    pairs = list(quickstart.read_records("feedback", "pairs"))
    exported_pairs = list(ds["train_prefs"]) + list(ds["test_prefs"])
    assert len(exported_pairs) == len(pairs) == quickstart.stage_state("feedback").counts["output"]
    by_key = {(p["prompt_id"], p["chosen"][-1]["content"], p["rejected"][-1]["content"]): p for p in pairs}
    for row in exported_pairs:
        pair = by_key[(row["prompt_id"], row["chosen"][-1]["content"], row["rejected"][-1]["content"])]
        assert row["score_chosen"] == pytest.approx(to_ultrafeedback_scale(pair["score_chosen"]))
        assert 1 <= row["score_rejected"] < row["score_chosen"] <= 10
        assert row["messages"] == row["chosen"] and row["chosen"][0] == {"role": "user", "content": row["prompt"]}


def test_export_is_reproducible_and_never_overwrites_by_accident(quickstart: RunStore, exported: Path,
                                                                 tmp_path: Path) -> None:
    again = tmp_path / "again"
    assert _distill("export", quickstart.url, str(again), "--test-share", "0.25").exit_code == 0
    first, second = datasets.load_from_disk(str(exported)), datasets.load_from_disk(str(again))
    assert {k: v.to_list() for k, v in first.items()} == {k: v.to_list() for k, v in second.items()}
    before = (exported / "README.md").read_text()
    refused = _distill("export", quickstart.url, str(exported))
    assert refused.exit_code == 2 and "exists" in refused.output and "--overwrite" in refused.output
    assert (exported / "README.md").read_text() == before
    other_seed = _distill("export", quickstart.url, str(again), "--split-seed", "7", "--overwrite")
    assert other_seed.exit_code == 0
    assert set(datasets.load_from_disk(str(again))["test_sft"]["prompt_id"]) != set(first["test_sft"]["prompt_id"])
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary directory left behind


def test_the_card_states_recipe_endpoints_counts_filters_decontamination_and_licence(exported: Path) -> None:
    card = (exported / "README.md").read_text()
    meta = yaml.safe_load(card.split("---")[1])
    assert meta["license"] == "cc-by-nc-4.0" and "text-generation" in meta["task_categories"]
    for heading in ("## Splits", "## Endpoints", "## Counts per stage", "## Filters", "## Decontamination",
                    "## Recipe"):
        assert heading in card, heading
    assert "| train_prefs |" in card and "1-10 scale" in card and "toy-teacher" in card
    assert "the task's built-in teacher on loopback" in card
    assert "| generate | completed |" in card and "disclaimer" in card  # the quickstart teacher writes some
    assert "No evaluation set was checked for overlap" in card
    recipe = yaml.safe_load(card.split("## Recipe", 1)[1].split("```yaml", 1)[1].split("```", 1)[0])
    assert recipe["name"] == "quickstart" and recipe["feedback"]["pairs"]["min_margin"] == 0.5


def test_exported_splits_train_with_trl_as_the_handbook_loads_them(quickstart: RunStore, exported: Path,
                                                                  tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import DPOConfig, DPOTrainer, SFTConfig, SFTTrainer

    ds = datasets.load_from_disk(str(exported))
    model_dir = quickstart.join("sft", "model")
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    common = {"max_steps": 3, "per_device_train_batch_size": 4, "use_cpu": True, "bf16": False, "report_to": "none",
              "gradient_checkpointing": False, "save_strategy": "no", "logging_steps": 1}
    # alignment-handbook's dataset_mixture: `columns: [messages]` for SFT, `[chosen, rejected]` for DPO
    sft = SFTTrainer(model=AutoModelForCausalLM.from_pretrained(model_dir), processing_class=tokenizer,
                     args=SFTConfig(output_dir=str(tmp_path / "sft"), assistant_only_loss=True, max_length=128,
                                    **common),
                     train_dataset=ds["train_sft"].select_columns(["messages"]),
                     eval_dataset=ds["test_sft"].select_columns(["messages"]))
    result = sft.train()
    assert result.global_step == 3 and math.isfinite(result.training_loss)
    assert math.isfinite(sft.evaluate()["eval_loss"])
    dpo = DPOTrainer(model=AutoModelForCausalLM.from_pretrained(model_dir),
                     ref_model=AutoModelForCausalLM.from_pretrained(model_dir), processing_class=tokenizer,
                     args=DPOConfig(output_dir=str(tmp_path / "dpo"), max_length=128, **common),
                     train_dataset=ds["train_prefs"].select_columns(["chosen", "rejected"]))
    result = dpo.train()
    assert result.global_step == 3 and math.isfinite(result.training_loss)


def test_stage_shards_of_a_run_load_with_datasets_parquet(quickstart: RunStore) -> None:
    for stage, name in (("generate", "data"), ("sample", "completions"), ("feedback", "pairs"),
                        ("feedback", "ratings")):
        loaded = datasets.load_dataset("parquet", data_files=f"{quickstart.join(stage)}/{name}-*.parquet",
                                       split="train")
        assert loaded.num_rows == quickstart.count_records(stage, name) > 0, (stage, name)


def test_push_to_hub_arguments_are_checked_before_anything_is_written(quickstart: RunStore, tmp_path: Path,
                                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    bad = _distill("export", quickstart.url, str(tmp_path / "a"), "--push-to-hub", "not a repo")
    assert bad.exit_code == 2 and "expected a dataset repository as OWNER/NAME" in bad.output
    bad = _distill("export", quickstart.url, str(tmp_path / "b"), "--push-to-hub", "me/bad..name")
    assert bad.exit_code == 2 and "not a valid repository id" in bad.output
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    offline = _distill("export", quickstart.url, str(tmp_path / "c"), "--push-to-hub", "me/distilled")
    assert offline.exit_code == 2 and "HF_HUB_OFFLINE is set" in offline.output
    assert not list(tmp_path.iterdir())


def test_a_run_without_finished_dialogues_is_not_exported(tmp_path: Path) -> None:
    store = RunStore(tmp_path / "runs", "half")
    store.write_json(store.manifest_path, {"run_name": "half", "recipe": {}, "stages": {}})
    store.set_stage_state("generate", StageState(fingerprint="f", status="failed"))
    result = _distill("export", store.url, str(tmp_path / "out"))
    assert result.exit_code == 2 and "generate stage of this run is failed" in result.output
    assert not (tmp_path / "out").exists()


def test_the_card_never_carries_credentials_from_an_endpoint_url() -> None:
    from pipeline.export.card import endpoints, redact_url

    assert redact_url("https://user:sk-SECRET@api.example.com:8443/v1?api_key=sk-X#frag") == \
        "https://api.example.com:8443/v1"
    assert redact_url("builtin") == "builtin"
    listed = endpoints({"teacher": {"base_url": "https://u:sk-SECRET@api.example.com/v1", "model": "gpt"},
                        "sample": {"pool": [{"name": "m", "backend": "openai", "model": "x",
                                             "base_url": "http://k:sk-SECRET@10.0.0.1:8000/v1"}]}})
    assert "sk-SECRET" not in str(listed) and listed[0]["endpoint"] == "https://api.example.com/v1"
