"""The arrow schema of generate's shards (`generate/data-*.parquet`): ultrachat_200k's columns plus provenance."""

from __future__ import annotations

import pyarrow as pa

from pipeline.core.arrow import MESSAGES, schema

DIALOGUES = schema(
    ("prompt", pa.string()), ("prompt_id", pa.string()), ("messages", MESSAGES),
    ("source", pa.string()), ("teacher_model", pa.string()),
    # where a self-instruct / self-prompting instruction came from: its seed, its parent, how many steps away
    ("root_prompt_id", pa.string()), ("parent_prompt_id", pa.string()), ("depth", pa.int64()),
    ("rounds", pa.int64()), ("target_rounds", pa.int64()),
    ("stop_reason", pa.string()), ("stop_detail", pa.string()), ("contaminated_by", pa.string()),
    ("prompt_tokens", pa.int64()), ("completion_tokens", pa.int64()),
    ("truecased_turns", pa.int64()), ("dialogue_sha", pa.string()),
)
