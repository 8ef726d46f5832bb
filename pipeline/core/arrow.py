"""Arrow types the stages' schemas share: a chat conversation as the field's datasets store it."""

from __future__ import annotations

import pyarrow as pa

# ultrachat_200k / ultrafeedback_binarized: a list of {content, role} structs
MESSAGES = pa.list_(pa.struct([("content", pa.string()), ("role", pa.string())]))


def schema(*fields: tuple[str, pa.DataType]) -> pa.Schema:
    """A schema whose columns are all nullable (a missing value is null, never a different type)."""
    return pa.schema([pa.field(name, kind, nullable=True) for name, kind in fields])
