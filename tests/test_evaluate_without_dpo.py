"""With feedback failed (a rater that never answers usably), evaluate still compares base and sft when
`evaluate.models` asks for them; asking for dpo names the missing stage, why it is missing and the way out."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from loopback import LoopbackChat, completion
from starlette.responses import JSONResponse

ROOT = Path(__file__).resolve().parent.parent


class UselessRater(LoopbackChat):
    """A rater that answers every request with text no rating parser can read."""

    def __init__(self) -> None:
        self.requests = 0

        async def handler(request):
            self.requests += 1
            return JSONResponse(completion("I would rather not rate these answers."))

        super().__init__(handler)


def distill(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1"}
    return subprocess.run([sys.executable, "-m", "pipeline.cli", *args], capture_output=True, text=True,
                          timeout=600, env=env)


@pytest.fixture(scope="module")
def failed_feedback(tmp_path_factory):
    """A tiny quickstart run whose feedback failed: (recipe path, run dir, the CLI's output)."""
    tmp = tmp_path_factory.mktemp("nodpo")
    with UselessRater() as rater:
        data = yaml.safe_load((ROOT / "configs/quickstart.yaml").read_text())
        data["endpoints"] = {"useless": {"base_url": rater.base_url, "model": "m", "api_key_env": None}}
        data["roles"] = {"rater": "useless"}
        data["prompts"]["count"] = 8
        data["sft"]["args"]["num_train_epochs"] = 2
        data["sample"]["pool"] = [m for m in data["sample"]["pool"] if m["name"] in ("sft-greedy", "base")]
        data["sample"]["k"] = 2
        data["feedback"]["sources"] = ["pool"]
        data["evaluate"].update(heldout_count=6, models=["base", "sft"], baseline="base")
        data["storage"]["root"] = str(tmp / "runs")
        recipe = tmp / "recipe.yaml"
        recipe.write_text(yaml.safe_dump(data))
        proc = distill("run", str(recipe), "--no-prefect", "--run-name", "r",
                       "--stages", "generate,sft,sample,feedback")
        assert rater.requests > 0, proc.stdout + proc.stderr
        yield recipe, tmp / "runs" / "r", proc.stdout + proc.stderr


def test_feedback_that_fails_every_item_says_so_loudly_in_the_cli_and_its_stats(failed_feedback):
    _, run, out = failed_feedback
    assert "stage 'feedback' failed: 8 of 8 items failed" in out and "Traceback" not in out
    assert "WARNING: unusable instruction_following rating" in out and "structured: auto" in out
    assert "WARNING pipeline: feedback: unusable" in out  # logged too, for the Prefect run log
    assert any("unusable" in w for w in json.loads((run / "feedback/stats.json").read_text())["warnings"])


def test_evaluate_of_base_and_sft_completes_and_compares_them_without_dpo(failed_feedback):
    recipe, run, _ = failed_feedback
    proc = distill("stage", "evaluate", str(recipe), "--run-name", "r")
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
    report = json.loads((run / "evaluate/report.json").read_text())
    models = report["evaluation"]["models"]
    assert set(models) == {"base", "sft"}
    assert models["sft"]["vs_baseline"]["baseline"] == "base" and models["sft"]["vs_baseline"]["n"] > 0


def test_evaluating_dpo_after_failed_feedback_names_dpo_why_and_the_models_setting(failed_feedback):
    recipe, run, _ = failed_feedback
    proc = distill("stage", "evaluate", str(recipe), "--run-name", "r", "--set", "evaluate.models=[base, sft, dpo]")
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0 and "Traceback" not in out
    assert "'dpo', which is pending" in out and "evaluate.models" in out and "feedback failed" in out, out


def test_status_and_the_prefect_run_summary_show_the_stages_warnings(failed_feedback):
    from pipeline.core.store import RunStore
    from pipeline.flows.artifacts import run_summary_markdown
    from pipeline.run.status import status_rows

    _, run, _ = failed_feedback
    proc = distill("status", str(run))
    assert proc.returncode == 0 and "feedback: WARNING: unusable instruction_following rating" in proc.stdout
    store = RunStore.open_existing(str(run))
    markdown = run_summary_markdown(store, status_rows(store))
    assert "### Warnings" in markdown and "- feedback: WARNING: unusable instruction_following" in markdown


def test_a_judge_that_never_answers_usably_is_said_loudly_in_evaluates_summary(failed_feedback):
    recipe, run, _ = failed_feedback
    proc = distill("stage", "evaluate", str(recipe), "--run-name", "r", "--set", "roles.judge=useless")
    out = proc.stdout + proc.stderr
    assert "Traceback" not in out, out[-3000:]
    # the stage's own summary, before the status table (which lists stats.json's warnings again)
    evaluate_line = proc.stdout[proc.stdout.index("evaluate: base:"):proc.stdout.index("\nrun r ")]
    assert "WARNING: single judgment: no rating in [[N]] form" in evaluate_line, out[-3000:]
    assert "structured: auto" in evaluate_line
    assert json.loads((run / "evaluate/stats.json").read_text())["warnings"]
