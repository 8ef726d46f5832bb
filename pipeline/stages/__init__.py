"""One package per stage; each exposes `run(recipe, store) -> StageReport` in its `stage` module."""
