"""evaluate reads only the trained models `evaluate.models` and `baseline` name."""

from __future__ import annotations

from pathlib import Path

from pipeline.core.recipe import load_recipe
from pipeline.run.registry import STAGES, fingerprint

QUICKSTART = Path(__file__).resolve().parent.parent / "configs/quickstart.yaml"


def test_default_models_read_sft_then_dpo_so_fingerprints_keep_their_inputs():
    rec = load_recipe(QUICKSTART, [])
    assert STAGES["evaluate"].inputs(rec) == ["sft", "dpo"]


def test_base_and_sft_evaluation_does_not_wait_for_dpo():
    rec = load_recipe(QUICKSTART, ["evaluate.models=[base, sft]"])
    assert STAGES["evaluate"].inputs(rec) == ["sft"]
    dpo_changed = load_recipe(QUICKSTART, ["evaluate.models=[base, sft]", "dpo.beta=0.5"])
    assert fingerprint("evaluate", rec) == fingerprint("evaluate", dpo_changed)


def test_a_dpo_baseline_is_read_even_when_models_omit_it():
    rec = load_recipe(QUICKSTART, ["evaluate.models=[base, sft]", "evaluate.baseline=dpo"])
    assert STAGES["evaluate"].inputs(rec) == ["sft", "dpo"]
