"""Fingerprints: a change to a stage's section changes it and everything downstream, nothing upstream."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from pipeline.core.recipe import load_recipe
from pipeline.run.registry import STAGE_NAMES, fingerprint


def _fps(repo_root: Path, *overrides: str) -> dict[str, str]:
    rec = load_recipe(repo_root / "configs/quickstart.yaml", list(overrides))
    return {name: fingerprint(name, rec) for name in STAGE_NAMES}


@pytest.mark.parametrize(
    ("override", "changed"),
    [
        ("generate.max_rounds=5", {"generate", "sft", "sample", "feedback", "dpo", "evaluate"}),
        ("sft.args.learning_rate=1e-4", {"sft", "sample", "feedback", "dpo", "evaluate"}),
        ("feedback.pairs.min_margin=1.0", {"feedback", "dpo", "evaluate"}),
        ("dpo.beta=0.05", {"dpo", "evaluate"}),
        ("evaluate.heldout_count=10", {"evaluate"}),
        ("teacher.model=other-teacher", {"generate", "sft", "sample", "feedback", "dpo", "evaluate"}),
        # how the teacher is reached and paid for does not change what it says
        ("teacher.max_concurrency=3", set()),
        ("teacher.price_input_per_1k=0.5", set()),
        ("storage.root=/elsewhere", set()),
    ],
)
def test_change_propagates_downstream_only(repo_root: Path, override: str, changed: set[str]):
    base, new = _fps(repo_root), _fps(repo_root, override)
    assert {s for s in STAGE_NAMES if base[s] != new[s]} == changed


def _fps_in_a_new_process(repo_root: Path, hash_seed: str) -> dict[str, str]:
    code = ("import json, sys; from pipeline.core.recipe import load_recipe; "
            "from pipeline.run.registry import STAGE_NAMES, fingerprint; "
            "r = load_recipe(sys.argv[1]); print(json.dumps({s: fingerprint(s, r) for s in STAGE_NAMES}))")
    env = {**os.environ, "PYTHONHASHSEED": hash_seed, "PYTHONPATH": str(repo_root)}
    out = subprocess.run([sys.executable, "-c", code, str(repo_root / "configs/quickstart.yaml")], env=env,
                         capture_output=True, text=True, check=True, timeout=120).stdout
    return json.loads(out)


def test_fingerprints_are_the_same_in_other_processes_whatever_their_hash_seed(repo_root: Path):
    # a set iterated into the payload, or a hash() of a string, would differ between these processes
    here = _fps(repo_root)
    assert _fps_in_a_new_process(repo_root, "1") == here
    assert _fps_in_a_new_process(repo_root, "2") == here


def test_equivalent_spellings_of_a_setting_give_one_fingerprint(repo_root: Path):
    # the quickstart sets dpo.beta and dpo.loss_type: the same values under dpo.args train the same model
    assert _fps(repo_root, "dpo.beta=null", "dpo.args.beta=0.1") == _fps(repo_root)
    assert _fps(repo_root, "dpo.loss_type=null", "dpo.args.loss_type=[sigmoid, sft]") == _fps(repo_root)
    assert _fps(repo_root, "dpo.beta=null", "dpo.args.beta=0.05") != _fps(repo_root)


def test_starting_the_builtin_teacher_does_not_change_fingerprints(repo_root: Path):
    from pipeline.run.runner import teacher_endpoint
    from pipeline.teacher.serving import endpoint_url

    rec = load_recipe(repo_root / "configs/quickstart.yaml")
    with teacher_endpoint(rec) as live:
        assert endpoint_url(live.teacher).startswith("http://127.0.0.1:")
        assert {s: fingerprint(s, live) for s in STAGE_NAMES} == {s: fingerprint(s, rec) for s in STAGE_NAMES}
        assert live.snapshot() == rec.snapshot()


def test_toy_teacher_options_are_part_of_the_teacher_identity(repo_root: Path):
    base, new = _fps(repo_root), _fps(repo_root, "teacher.builtin.error_rate=0.1")
    assert base["generate"] != new["generate"] and base["feedback"] != new["feedback"]


ALL = set(STAGE_NAMES)


@pytest.mark.parametrize(
    ("role", "changed"),
    [
        ("judge", {"evaluate"}),
        ("rater", {"feedback", "dpo", "evaluate"}),
        ("assistant", ALL),
        ("user_simulator", ALL),
        ("instruction_writer", set()),  # the quickstart runs no self-instruct
    ],
)
def test_a_role_moved_to_another_endpoint_changes_only_the_stages_that_play_it(repo_root: Path, role: str,
                                                                                 changed: set[str]):
    other = "endpoints.alt.model=another-model"
    base, new = _fps(repo_root, other), _fps(repo_root, other, f"roles.{role}=alt")
    assert {s for s in STAGE_NAMES if base[s] != new[s]} == changed


def test_an_endpoints_limits_prices_and_batch_mode_do_not_change_what_it_says(repo_root: Path):
    moved = ("endpoints.alt.model=another-model", "roles.judge=alt")
    base = _fps(repo_root, *moved)
    for override in ("endpoints.alt.batch=true", "endpoints.alt.price_output_per_1k=0.06",
                     "endpoints.alt.max_concurrency=2", "budget.max_cost_usd=10", "teacher.batch=true"):
        assert _fps(repo_root, *moved, override) == base, override
