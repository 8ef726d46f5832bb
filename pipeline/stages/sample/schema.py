"""The arrow schema of sampled answers (`sample/completions-*.parquet`, and feedback's on-policy samples)."""

from __future__ import annotations

import pyarrow as pa

from pipeline.core.arrow import schema

COMPLETIONS = schema(
    ("completion_id", pa.string()), ("prompt_id", pa.string()), ("prompt", pa.string()),
    ("prompt_source", pa.string()), ("model", pa.string()), ("backend", pa.string()), ("model_path", pa.string()),
    ("principle", pa.string()), ("system_prompt", pa.string()), ("completion", pa.string()),
    ("finish_reason", pa.string()), ("sample_index", pa.int64()), ("seed", pa.int64()),
    ("temperature", pa.float64()), ("top_p", pa.float64()), ("max_tokens", pa.int64()),
    ("prompt_tokens", pa.int64()), ("completion_tokens", pa.int64()),
)
