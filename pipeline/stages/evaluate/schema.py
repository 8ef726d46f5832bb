"""The arrow schemas of evaluate's shards: answers, single gradings and pairwise verdicts."""

from __future__ import annotations

import pyarrow as pa

from pipeline.core.arrow import schema

ANSWERS_SCHEMA = schema(
    ("answer_id", pa.string()), ("item_id", pa.string()), ("model", pa.string()), ("spec", pa.string()),
    ("model_path", pa.string()), ("category", pa.string()), ("turns", pa.list_(pa.string())),
    ("answers", pa.list_(pa.string())), ("finish_reasons", pa.list_(pa.string())),
    ("completion_tokens", pa.int64()), ("correct", pa.float64()), ("check_error", pa.string()),
)
SINGLE_SCHEMA = schema(
    ("judgment_id", pa.string()), ("item_id", pa.string()), ("model", pa.string()), ("category", pa.string()),
    ("turn", pa.int64()), ("rating", pa.float64()), ("explanation", pa.string()), ("attempts", pa.int64()),
)
PAIRWISE_SCHEMA = schema(
    ("judgment_id", pa.string()), ("item_id", pa.string()), ("model", pa.string()), ("baseline", pa.string()),
    ("category", pa.string()), ("verdict_first", pa.string()), ("verdict_second", pa.string()),
    ("score", pa.float64()), ("identical", pa.bool_()), ("explanation_first", pa.string()),
    ("explanation_second", pa.string()), ("attempts", pa.int64()),
)
SCHEMAS = {"answers": ANSWERS_SCHEMA, "single": SINGLE_SCHEMA, "pairwise": PAIRWISE_SCHEMA}
