"""Training progress for `pipeline.core.progress`: a trainer callback that reports optimizer steps, so the sft
and dpo stages update a Prefect progress artifact as the data stages do."""

from __future__ import annotations

from typing import Any

from pipeline.core.progress import ProgressSink, has_sink, progress


class StepReporter:
    """Reports `global_step` of `max_steps` to a progress sink (a resumed run starts where its checkpoint is)."""

    def __init__(self, stage: str):
        self.stage = stage
        self.sink: ProgressSink | None = None
        self.reported = 0

    def begin(self, state: Any) -> None:
        if state.is_world_process_zero:
            self.sink = progress(self.stage, state.max_steps or None, "step")

    def step(self, state: Any) -> None:
        if self.sink is not None and state.global_step > self.reported:
            self.sink.update(state.global_step - self.reported)
            self.reported = state.global_step

    def end(self) -> None:
        if self.sink is not None:
            self.sink.close()
            self.sink = None


def training_callbacks(stage: str) -> list[Any]:
    """The step reporter as a TrainerCallback when something listens (a Prefect flow); none in the terminal,
    where TRL draws its own bar."""
    if not has_sink():
        return []
    from transformers import TrainerCallback  # imported only where a trainer is being built

    reporter = StepReporter(stage)

    class StepProgress(TrainerCallback):
        def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            reporter.begin(state)

        def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            reporter.step(state)

        def on_train_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            reporter.end()

    return [StepProgress()]
