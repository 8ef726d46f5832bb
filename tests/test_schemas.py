"""One arrow schema per stage output: shards of a stage agree on their types, so `datasets` loads any of them.

Without one, a feedback shard in which an aspect is rated N/A throughout gets a `null`-typed column and the
next a `double` one, which `datasets.load_dataset("parquet", ...)` refuses ("Couldn't cast array of type double
to null").
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import datasets
import pyarrow.parquet as pq
import pytest
from loopback import LoopbackChat, completion
from starlette.requests import Request
from starlette.responses import JSONResponse

from pipeline.backends.answers import COMPLETIONS_SCHEMA as COMPLETIONS
from pipeline.core.recipe import recipe_from_dict
from pipeline.core.sources import prompt_id
from pipeline.core.store import RunStore, StageState, StoreError
from pipeline.run.registry import fingerprint
from pipeline.run.runner import open_run, run_stage
from pipeline.stages.feedback.schema import pairs_schema

POEMS = [f"Write a two-line poem about the colour {c}." for c in ("red", "blue", "green", "grey")]
SUMS = [f"What is {a} plus {a + 1}?" for a in range(4)]


def _load(store: RunStore, stage: str, name: str) -> datasets.Dataset:
    return datasets.load_dataset("parquet", data_files=f"{store.join(stage)}/{name}-*.parquet", split="train")


def test_shards_without_a_schema_break_datasets_and_with_one_they_load(tmp_path: Path) -> None:
    rows = [[{"pair_id": "a", "chosen_honesty": None}], [{"pair_id": "b", "chosen_honesty": 4.0}]]
    loose = RunStore(tmp_path, "loose")
    for shard in rows:
        with loose.shard_writer("feedback", "pairs", id_key="pair_id") as writer:
            writer.extend(shard)
    with pytest.raises(datasets.exceptions.DatasetGenerationError) as failure:
        _load(loose, "feedback", "pairs")
    assert "Couldn't cast array of type double to null" in str(failure.value.__cause__)

    typed = RunStore(tmp_path, "typed")
    for shard in rows:
        with typed.shard_writer("feedback", "pairs", id_key="pair_id", schema=pairs_schema(["honesty"])) as writer:
            writer.extend(shard)
    ds = _load(typed, "feedback", "pairs")
    assert ds["chosen_honesty"] == [None, 4.0] and ds.features["chosen_honesty"].dtype == "float64"


def test_a_record_with_a_column_the_schema_lacks_is_refused_not_dropped(tmp_path: Path) -> None:
    store = RunStore(tmp_path, "run")
    with store.shard_writer("sample", "completions", id_key="completion_id", schema=COMPLETIONS) as writer:
        with pytest.raises(StoreError, match=r"columns \['surprise'\] that the stage's schema does not declare"):
            writer.add({"completion_id": "x", "surprise": 1})
        writer.add({"completion_id": "y"})
    assert [r["completion_id"] for r in store.read_records("sample", "completions")] == ["y"]


class ScriptedRater(LoopbackChat):
    """A loopback rater: honesty is N/A for poems (UltraFeedback's rule for creative writing), and every answer
    that says 'good' is rated 5, every 'bad' one 2."""

    def __init__(self) -> None:
        async def chat(request: Request) -> JSONResponse:
            body = await request.json()
            text = "\n".join(m["content"] for m in body["messages"])
            aspect = re.search(r"^Aspect: (.+)$", text, re.M).group(1).strip()
            instruction = text.split("## Instruction", 1)[1].split("## Answers", 1)[0]
            blocks = []
            for number, answer in re.findall(r"<text (\d+)>\s*(.*?)\s*</text \1>", text, re.S):
                na = aspect == "honesty" and "poem" in instruction
                rating = "N/A" if na else ("5" if "good" in answer else "2")
                blocks.append(f"#### Output for Text {number}\nRating: {rating}\nRationale: as scripted.")
            return JSONResponse(completion("\n\n".join(blocks), body["model"]))

        super().__init__(chat)


def _answers(store: RunStore, prompts: list[str]) -> None:
    """The sample stage's output as it writes it: a good and a bad answer to every prompt."""
    rows: list[dict[str, Any]] = []
    for p in prompts:
        for i, quality in enumerate(("good", "bad")):
            rows.append({"completion_id": f"{prompt_id(p)}-{i}", "prompt_id": prompt_id(p), "prompt": p,
                         "prompt_source": "prompts.jsonl", "model": f"m{i}", "model_path": f"m{i}",
                         "completion": f"A {quality} answer.", "sample_index": 0})
    with store.shard_writer("sample", "completions", id_key="completion_id", schema=COMPLETIONS) as writer:
        writer.extend(rows)


def test_feedback_pairs_load_with_datasets_when_one_shard_rates_an_aspect_na_throughout(tmp_path: Path) -> None:
    prompts_file = tmp_path / "prompts.jsonl"
    prompts_file.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in POEMS + SUMS))
    with ScriptedRater() as rater:
        recipe = recipe_from_dict({
            "name": "na", "prompts": {"source": str(prompts_file)},
            # one request at a time: the four poems are rated first and fill the first shard
            "teacher": {"base_url": rater.base_url, "api_key_env": None, "max_concurrency": 1},
            "feedback": {"aspects": ["honesty", "helpfulness"], "shard_size": len(POEMS)},
            "storage": {"root": str(tmp_path / "runs")}})
        store = open_run(recipe, "na")
        _answers(store, POEMS + SUMS)
        store.set_stage_state("sample", StageState(fingerprint=fingerprint("sample", recipe), status="completed"))
        report = run_stage("feedback", recipe, store)
    assert report.status == "completed" and report.counts["output"] == len(POEMS + SUMS)
    first, second = (pq.read_table(p) for p in store.shard_paths("feedback", "pairs"))
    assert first.column("chosen_honesty").null_count == len(POEMS)  # all N/A, yet typed as a rating
    assert first.schema.field("chosen_honesty").type == second.schema.field("chosen_honesty").type == "double"
    pairs = _load(store, "feedback", "pairs")
    assert len(pairs) == len(POEMS + SUMS) and pairs.features["chosen_honesty"].dtype == "float64"
    assert sorted(x is None for x in pairs["chosen_honesty"]) == [False] * len(SUMS) + [True] * len(POEMS)
    assert set(pairs[0]["chosen"][0]) == {"role", "content"}  # ultrafeedback_binarized's message lists
    ratings = _load(store, "feedback", "ratings")
    assert ratings.num_rows == 2 * 2 * len(POEMS + SUMS)
    assert {r["na"] for r in ratings if r["aspect"] == "honesty"} == {True, False}
