"""The arrow schemas of feedback's shards: ratings (one row per answer and aspect) and pairs
(ultrafeedback_binarized's columns, provenance, and each aspect's rating of both answers)."""

from __future__ import annotations

import pyarrow as pa

from pipeline.core.arrow import MESSAGES, schema

RATINGS = schema(
    ("rating_id", pa.string()), ("item_id", pa.string()), ("source", pa.string()), ("prompt_id", pa.string()),
    ("completion_id", pa.string()), ("model", pa.string()), ("aspect", pa.string()),
    ("rating", pa.float64()),  # null when the rater said N/A
    ("na", pa.bool_()), ("type", pa.string()), ("rationale", pa.string()), ("position", pa.int64()),
    ("shown", pa.int64()), ("order", pa.int64()),  # which of feedback.orders the rating was given in
    ("attempt", pa.int64()), ("score", pa.float64()), ("judge_model", pa.string()),
    ("raw", pa.string()),
)

_PAIR_COLUMNS = (
    ("pair_id", pa.string()), ("prompt", pa.string()), ("prompt_id", pa.string()), ("chosen", MESSAGES),
    ("rejected", MESSAGES), ("messages", MESSAGES), ("score_chosen", pa.float64()), ("score_rejected", pa.float64()),
    ("chosen_model", pa.string()), ("rejected_model", pa.string()), ("chosen_completion_id", pa.string()),
    ("rejected_completion_id", pa.string()), ("source", pa.string()), ("strategy", pa.string()),
    ("rated_answers", pa.int64()),
)


def pairs_schema(aspects: list[str]) -> pa.Schema:
    """The pairs' columns for these rated aspects (`overall` included when the critique is asked for): a rating
    the rater gave as N/A is null, in a float64 column whatever the shard holds."""
    per_aspect = [(f"{side}_{aspect}", pa.float64()) for aspect in aspects for side in ("chosen", "rejected")]
    return schema(*_PAIR_COLUMNS, *per_aspect)
