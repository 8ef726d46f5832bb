"""On-policy rounds (`dpo.rounds`): round 1 is the run's own sample → feedback → dpo → evaluate; round r ≥ 2
repeats them with the previous round's model as the policy. A round's stages are named `stage@r` and write
under `<run>/rounds/<r>/`; everything else (the manifest, generate, sft, the response cache, the spend ledger)
stays the run's."""

from __future__ import annotations

from pipeline.core.store import RunStore

ROUND_STAGES = ("sample", "feedback", "dpo", "evaluate")


def stage_key(stage: str, round_: int) -> str:
    """`sample` in round 1, `sample@2` in round 2."""
    return stage if round_ == 1 or stage not in ROUND_STAGES else f"{stage}@{round_}"


def split_key(key: str) -> tuple[str, int]:
    """`sample@2` -> (`sample`, 2); `sample` -> (`sample`, 1)."""
    stage, _, round_ = key.partition("@")
    if not round_:
        return stage, 1
    if stage not in ROUND_STAGES or not round_.isdigit() or int(round_) < 2:
        raise ValueError(f"'{key}': a round's stage is one of {', '.join(ROUND_STAGES)} with a round >= 2, "
                         "e.g. dpo@2")
    return stage, int(round_)


class RoundStore(RunStore):
    """The run store as round r's stages see it: their own directories are `rounds/<r>/<stage>`."""

    def __init__(self, run: RunStore, round_: int):  # a view: no directory is created
        self.root, self.run_name, self.fs, self.is_local, self.path = (run.root, run.run_name, run.fs,
                                                                       run.is_local, run.path)
        self.run, self.round = run, round_

    def join(self, *parts: str) -> str:
        if parts and parts[0] in ROUND_STAGES:
            return super().join("rounds", str(self.round), *parts)
        return super().join(*parts)

    def state_key(self, stage: str) -> str:
        return stage_key(stage, self.round)

    def policy(self) -> tuple[RunStore, str]:
        """Round r's policy is the model round r − 1 trained."""
        return round_store(self.run, self.round - 1), "dpo"


def round_store(run: RunStore, round_: int) -> RunStore:
    """The store as round `round_` sees it (the run itself for round 1)."""
    run = run.run if isinstance(run, RoundStore) else run
    return run if round_ == 1 else RoundStore(run, round_)


def final_model(run: RunStore) -> str:
    """Where the run's DPO model is: the best kept round's (`rounds/summary.json`), else round 1's."""
    summary = run.read_json(run.join("rounds", "summary.json"), {}) or {}
    return summary.get("best_model") or run.join("dpo", "model")
