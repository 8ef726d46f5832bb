"""The top-level `decontamination` section: evaluation sets no prompt that reaches training may overlap."""

from __future__ import annotations

from pydantic import Field, ValidationInfo, field_validator

from pipeline.core.recipe.base import Section, existing_path


class DecontamConfig(Section):
    """Word n-gram overlap with evaluation sets (every turn of every item); used by generate and sample.

    A prompt sharing an `ngram`-word run with an evaluation turn is dropped; where either is shorter than
    `ngram` words (but has at least `min_words`), it is dropped when one appears whole inside the other; and
    always when the two are the same words.
    """

    eval_files: list[str] = Field(default_factory=list)
    ngram: int = Field(13, ge=1)  # lm-evaluation-harness uses 13-grams
    min_words: int = Field(5, ge=1)  # a shorter run ("write a poem") says nothing about contamination

    @field_validator("eval_files")
    @classmethod
    def _files_are_evaluation_sets(cls, files: list[str], info: ValidationInfo) -> list[str]:
        from pipeline.core.evalsets import EvalSetError, cached_eval_rows

        resolved = [existing_path(f, "an evaluation set file", info) for f in files]
        for path in resolved:
            if "://" in path:
                continue  # remote sets are read (and checked) when a stage starts
            try:
                cached_eval_rows(path)  # an unknown shape fails here, before anything is written
            except EvalSetError as exc:
                raise ValueError(str(exc)) from None
        return resolved
