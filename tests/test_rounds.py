"""On-policy rounds (dpo.rounds): keys, fingerprints that chain, the round's view of the store, estimates; and a
tiny toy run through two rounds, killed inside round 2's sampling and its DPO, that resumes to the same pairs
and model as an uninterrupted run and pays no request twice beyond the ones in flight at each kill."""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from pipeline.core.recipe import RecipeError, load_recipe, recipe_from_dict
from pipeline.core.rounds import RoundStore, round_store, split_key
from pipeline.core.sources import iter_unique_prompts
from pipeline.core.store import RunStore
from pipeline.run.estimate import estimate
from pipeline.run.registry import fingerprint, parse_stages, stage_inputs
from pipeline.run.rounds import round_recipe
from pipeline.run.runner import plan
from pipeline.tasks.toy.teacher_server import ToyTeacher, ToyTeacherConfig

ROOT = Path(__file__).resolve().parents[1]
ROUNDS = ROOT / "configs" / "quickstart-rounds.yaml"
CLI = [sys.executable, "-m", "pipeline.cli"]


def fps(*overrides: str, path: Path = ROUNDS) -> dict[str, str]:
    recipe = load_recipe(path, list(overrides))
    memo: dict[str, str] = {}
    return {key: fingerprint(key, recipe, memo) for key in plan(recipe)}


def test_rounds_are_keys_after_round_one_and_their_inputs_chain() -> None:
    recipe = load_recipe(ROUNDS)
    assert plan(recipe)[6:] == ["sample@2", "feedback@2", "dpo@2", "evaluate@2",
                                "sample@3", "feedback@3", "dpo@3", "evaluate@3"]
    assert stage_inputs("sample@3", recipe) == ["dpo@2"]  # the policy is the previous round's model
    assert stage_inputs("evaluate@3", recipe) == ["dpo@3", "dpo@2"]
    own = load_recipe(ROUNDS, ["dpo.train_on=round"])
    assert stage_inputs("dpo@2", own) == ["sft", "dpo", "feedback@2"]
    assert set(stage_inputs("dpo@3", recipe)) == {"sft", "dpo@2", "feedback@3", "feedback", "feedback@2"}
    assert parse_stages("dpo@2,generate,sample@2") == ["generate", "sample@2", "dpo@2"]
    with pytest.raises(ValueError, match="a round >= 2"):
        split_key("generate@2")


def test_round_settings_move_no_round_one_fingerprint_and_a_round_change_moves_only_later_rounds() -> None:
    three = fps()
    assert fps("dpo.rounds=1") == {k: v for k, v in three.items() if "@" not in k}
    five = fps("dpo.rounds=5")
    assert {k: five[k] for k in three} == three  # raising the maximum redoes nothing
    previous = fps("dpo.reference=previous")
    assert {k for k in three if three[k] != previous[k]} == {"dpo@2", "evaluate@2", "sample@3", "feedback@3",
                                                            "dpo@3", "evaluate@3"}
    quickstart = ROOT / "configs" / "quickstart.yaml"
    assert fps(path=quickstart) == fps("dpo.rounds=1", path=quickstart)  # an explicit 1 is today's run


def test_fresh_round_prompts_are_a_new_draw_of_a_task_and_the_next_rows_of_a_file(tmp_path: Path) -> None:
    three, fresh = fps("dpo.round_prompts=same"), fps()  # the shipped recipe draws fresh prompts
    # round 1 and every model trained before round 2 keep their fingerprints; every later round moves
    assert {k for k in three if three[k] != fresh[k]} == {k for k in three if "@" in k}
    recipe = load_recipe(ROUNDS)
    drawn = {r: [p.prompt for p in iter_unique_prompts(round_recipe(recipe, r).sample.prompts or recipe.prompts,
                                                        recipe.task)] for r in (1, 2, 3)}
    assert [len(v) for v in drawn.values()] == [400, 400, 400]
    assert drawn[1] == [p.prompt for p in iter_unique_prompts(recipe.prompts, recipe.task)]  # round 1 as before
    assert drawn[1] != drawn[2] != drawn[3] and len(set(drawn[1]) | set(drawn[2])) > 500  # new prompts each round
    rows = tmp_path / "prompts.jsonl"
    rows.write_text("".join(json.dumps({"prompt": f"Question number {i}?"}) + "\n" for i in range(10)))
    data = {**yaml.safe_load(ROUNDS.read_text()), "task": None, "prompts": {"source": str(rows), "limit": 4},
            "evaluate": {"models": ["base", "sft", "dpo"], "baseline": "sft"}}
    data["teacher"] = {"base_url": "http://127.0.0.1:9/v1", "model": "m", "api_key_env": None}
    data["dpo"] = {**data["dpo"], "round_prompts": "fresh"}
    recipe = recipe_from_dict(data)
    slices = [[p.prompt for p in iter_unique_prompts(round_recipe(recipe, r).sample.prompts or recipe.prompts)]
              for r in (1, 2, 3)]
    assert slices == [[f"Question number {i}?" for i in range(a, b)] for a, b in ((0, 4), (4, 8), (8, 10))]
    del data["prompts"]["limit"]
    with pytest.raises(RecipeError, match=r"dpo.round_prompts: fresh .* set prompts.limit"):
        recipe_from_dict(data)


def test_rounds_need_a_policy_member_in_the_pool(tmp_path: Path) -> None:
    with pytest.raises(RecipeError, match="dpo.rounds > 1 needs .* model: policy"):
        load_recipe(ROOT / "configs" / "quickstart.yaml", ["dpo.rounds=2"])


def test_a_rounds_view_writes_its_stages_under_its_round_and_keeps_the_rest(tmp_path: Path) -> None:
    run = RunStore(tmp_path, "r")
    two = round_store(run, 2)
    assert isinstance(two, RoundStore) and round_store(two, 1) is run
    assert two.join("dpo", "model") == run.join("rounds", "2", "dpo", "model")
    assert two.join("sft", "model") == run.join("sft", "model")
    assert two.join("cache", "teacher.sqlite") == run.join("cache", "teacher.sqlite")
    assert two.state_key("feedback") == "feedback@2" and two.state_key("sft") == "sft"
    assert run.policy() == (run, "sft")
    assert two.policy() == (run, "dpo")
    store, stage = round_store(run, 3).policy()
    assert (store.round, stage, store.join(stage)) == (2, "dpo", run.join("rounds", "2", "dpo"))


def test_the_estimate_counts_every_round_as_if_none_stopped() -> None:
    three, one = estimate(load_recipe(ROUNDS)), estimate(load_recipe(ROUNDS, ["dpo.rounds=1"]))
    later = {k: v["requests"] for k, v in three["stages"].items() if "@" in k}
    assert set(later) == {f"{s}@{r}" for r in (2, 3) for s in ("sample", "feedback", "dpo", "evaluate")}
    assert later["feedback@2"] > 0 and later["evaluate@3"] > 0 and later["sample@2"] > 0  # the teacher, kept
    assert three["total_requests"] == pytest.approx(one["total_requests"] + sum(later.values()))


# -- a tiny run through two rounds -------------------------------------------------------------------------------
TINY = ["prompts.count=24", "generate.max_rounds=1", "sft.args.num_train_epochs=3", "dpo.rounds=2",
        "dpo.args.num_train_epochs=2", "dpo.args.per_device_train_batch_size=4", "evaluate.heldout_count=12"]


def distill(tmp: Path, toy: ToyTeacher, *args: str, wait: bool = True) -> subprocess.CompletedProcess | subprocess.Popen:
    sets = [*TINY, f"storage.root={tmp / 'runs'}", f"teacher.base_url={toy.base_url}"]
    cmd = [*CLI, "run", str(ROUNDS), "--no-prefect", *args, *[f"--set={s}" for s in sets]]
    if not wait:
        return subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return subprocess.run(cmd, capture_output=True, text=True, timeout=900)


def kill_when(proc: subprocess.Popen, manifest: Path, key: str, also: Path | None = None) -> None:
    """SIGKILL once stage `key` is running (and `also` exists, where given)."""
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline and proc.poll() is None:
        stages = json.loads(manifest.read_text()).get("stages", {}) if manifest.exists() else {}
        if stages.get(key, {}).get("status") == "running" and (also is None or any(also.parent.glob(also.name))):
            proc.send_signal(signal.SIGKILL)
            proc.wait(timeout=30)
            return
        time.sleep(0.05)
    pytest.fail(f"{key} never ran while watched (exit {proc.poll()})")


def weights(model_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(str(model_dir / "model.safetensors"))


@pytest.fixture(scope="module")
def two_runs(tmp_path_factory: pytest.TempPathFactory):
    """Round 1 once; then round 2 twice from it: uninterrupted in run `a`, killed twice and resumed in `b`."""
    tmp = tmp_path_factory.mktemp("rounds")
    config = ToyTeacherConfig(error_rate=0.3, disclaimer_rate=0.05, drift_rate=0.05)
    with ToyTeacher(config) as toy_a:
        first = distill(tmp, toy_a, "--run-name", "a", "--stages", ",".join(plan(load_recipe(ROUNDS))[:6]))
        assert first.returncode == 0, first.stderr[-3000:]
        shutil.copytree(tmp / "runs" / "a", tmp / "runs" / "b")
        whole = distill(tmp, toy_a, "--run-name", "a")
        assert whole.returncode == 0, whole.stderr[-3000:]
    with ToyTeacher(config) as toy_b:
        b = tmp / "runs" / "b"
        kill_when(distill(tmp, toy_b, "--run-name", "b", wait=False), b / "manifest.json", "sample@2")
        kill_when(distill(tmp, toy_b, "--run-name", "b", wait=False), b / "manifest.json", "dpo@2",
                  b / "rounds" / "2" / "dpo" / "checkpoints" / "checkpoint-*")
        resumed = distill(tmp, toy_b, "--run-name", "b")
        stats_b = toy_b.stats()
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    return tmp / "runs", whole, resumed, stats_b


@pytest.mark.slow
def test_two_rounds_run_in_their_own_directories_and_the_summary_decides(two_runs) -> None:
    runs, whole, _, _ = two_runs
    run = RunStore.open_existing(str(runs / "a"))
    stages = run.read_manifest()["stages"]
    assert {k: stages[k]["status"] for k in plan(load_recipe(ROUNDS, TINY))} == dict.fromkeys(
        plan(load_recipe(ROUNDS, TINY)), "completed")
    for stage in ("sample", "feedback", "dpo", "evaluate"):
        assert (runs / "a" / "rounds" / "2" / stage).is_dir() and (runs / "a" / stage).is_dir()
    summary = json.loads((runs / "a" / "rounds" / "summary.json").read_text())
    assert [e["round"] for e in summary["rounds"]] == [1, 2]
    two = summary["rounds"][1]
    assert two["measure"] == "accuracy" and two["kept"] == (two["lower_bound"] > 0)
    assert summary["best_round"] == (2 if two["kept"] else 1)
    assert two["pairs"] == len(list(round_store(run, 2).read_records("feedback", "pairs")))
    metrics = json.loads((runs / "a" / "rounds" / "2" / "dpo" / "metrics.json").read_text())
    assert metrics["base_model"].endswith("/a/dpo/model") and metrics["reference_model"].endswith("/a/sft/model")
    assert (runs / "a" / "rounds" / "rounds.png").stat().st_size > 1000
    assert "| 2 | accuracy |" in (runs / "a" / "rounds" / "report.md").read_text()
    assert "dpo@2" in whole.stdout and "evaluate@2" in whole.stdout


@pytest.mark.slow
def test_a_run_killed_in_round_two_resumes_to_the_same_pairs_and_model_paying_nothing_twice(two_runs) -> None:
    runs, _, _, stats_b = two_runs
    a, b = (RunStore.open_existing(str(runs / name)) for name in "ab")

    def pairs(store: RunStore) -> list[tuple]:
        return sorted((p["pair_id"], p["chosen"][-1]["content"], p["rejected"][-1]["content"])
                      for p in round_store(store, 2).read_records("feedback", "pairs"))

    assert pairs(a) == pairs(b) and pairs(a)
    one, two = weights(runs / "a" / "rounds" / "2" / "dpo" / "model"), weights(runs / "b" / "rounds" / "2" / "dpo" / "model")
    assert one.keys() == two.keys() and all(torch.equal(one[k], two[k]) for k in one)
    # every request of round 2 was answered once, except those in flight at a kill (the teacher's concurrency)
    repeated = [key for key, n in stats_b["ok_keys"].items() if n > 1]
    assert len(repeated) <= load_recipe(ROUNDS).teacher.max_concurrency
    decided = [{k: v for k, v in e.items() if k != "model"}
               for name in "ab" for e in json.loads((runs / name / "rounds" / "summary.json").read_text())["rounds"]]
    assert decided[:2] == decided[2:]


def _evaluated(tmp_path: Path, answers: list[dict], vs: dict | None = None) -> RunStore:
    """A run whose round 2 evaluate wrote `answers` (and a report with `vs` against the policy)."""
    from pipeline.stages.evaluate.schema import SCHEMAS

    run = RunStore(tmp_path, "r")
    two = round_store(run, 2)
    columns = SCHEMAS["answers"].names
    with two.shard_writer("evaluate", "answers", id_key="answer_id", schema=SCHEMAS["answers"]) as writer:
        for i, row in enumerate(answers):
            writer.add({c: None for c in columns} | {"answer_id": str(i), "turns": [], "answers": [],
                                                        "finish_reasons": [], "completion_tokens": 0} | row)
    report = {"evaluation": {"candidate": "dpo", "baseline": "policy", "baseline_spec": "policy",
                             "models": {"dpo": {"vs_baseline": vs or {}}, "policy": {}}}}
    two.write_json(two.join("evaluate", "report.json"), report)
    return run


def test_a_round_with_ground_truth_is_kept_only_when_its_paired_gain_clears_k_standard_errors(tmp_path: Path) -> None:
    from pipeline.run.rounds import decide_round

    recipe = load_recipe(ROUNDS)
    rows = lambda model, right: [{"item_id": f"i{i}", "model": model, "correct": float(i < right)}  # noqa: E731
                                 for i in range(100)]
    clear = decide_round(_evaluated(tmp_path / "a", rows("dpo", 90) + rows("policy", 80)), recipe, 2)
    assert clear["kept"] and clear["gain"] == pytest.approx(0.10) and clear["lower_bound"] > 0
    noisy = decide_round(_evaluated(tmp_path / "b", rows("dpo", 82) + rows("policy", 80)), recipe, 2)
    assert not noisy["kept"] and noisy["gain"] == pytest.approx(0.02) and "not above 0" in noisy["reason"]


def test_a_round_without_ground_truth_is_kept_by_the_series_win_rate_rule(tmp_path: Path) -> None:
    from pipeline.run.rounds import decide_round

    recipe = load_recipe(ROUNDS)
    judged = [{"item_id": f"i{i}", "model": m, "correct": None} for i in range(10) for m in ("dpo", "policy")]
    win = decide_round(_evaluated(tmp_path / "a", judged, {"n": 40, "win_rate": 0.8, "stderr": 0.05}), recipe, 2)
    assert win["kept"] and win["measure"] == "win_rate" and win["lower_bound"] == pytest.approx(0.7)
    tie = decide_round(_evaluated(tmp_path / "b", judged, {"n": 40, "win_rate": 0.55, "stderr": 0.05}), recipe, 2)
    assert not tie["kept"] and tie["lower_bound"] == pytest.approx(0.45)
