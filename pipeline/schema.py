"""Explicit pyarrow schemas of the core tables (DESIGN.md, "Tables").

Every Parquet file the pipeline writes carries one of these schemas and, in its file metadata,
`r1v.table` and `r1v.schema_version`. A stage that adds columns extends a schema with `extend()`.
Bump a table's version when its columns change: the version is part of every stage fingerprint,
so stale outputs are recomputed instead of being read with the wrong layout.
"""

from __future__ import annotations

import pyarrow as pa

SCHEMA_VERSIONS: dict[str, int] = {
    "problems": 1,
    "quarantine": 1,
    "chains": 1,
    "sft": 1,
    "retry": 1,
    "train_log": 1,
    "predictions": 1,
    "failed": 1,
}

IMAGE = pa.struct(
    [
        pa.field("bytes", pa.binary()),
        pa.field("format", pa.string()),
        pa.field("width", pa.int32()),
        pa.field("height", pa.int32()),
    ]
)
IMAGES = pa.list_(IMAGE)

PROBLEMS = pa.schema(
    [
        pa.field("problem_id", pa.string(), nullable=False),
        pa.field("question", pa.string(), nullable=False),
        pa.field("images", IMAGES),
        pa.field("answer", pa.string(), nullable=False),
        pa.field("choices", pa.list_(pa.string())),
        pa.field("answer_text", pa.string()),  # a choice gold's option text
        pa.field("answer_type", pa.string(), nullable=False),
        pa.field("source", pa.string()),
        pa.field("subject", pa.string()),
        pa.field("difficulty", pa.int32()),
        pa.field("needs_image", pa.bool_()),
        pa.field("source_ref", pa.string()),
    ]
)

# Rows a stage could not process: the original row (as JSON, images left out), where it came from, why.
QUARANTINE = pa.schema(
    [
        pa.field("source", pa.string()),
        pa.field("source_ref", pa.string()),
        pa.field("reason", pa.string(), nullable=False),
        pa.field("error", pa.string()),
        pa.field("row_json", pa.string()),
    ]
)

SAMPLING = pa.struct(
    [
        pa.field("temperature", pa.float64()),
        pa.field("top_p", pa.float64()),
        pa.field("max_tokens", pa.int64()),
        pa.field("repetition_penalty", pa.float64()),
        pa.field("seed", pa.int64()),
    ]
)

CHAINS = pa.schema(
    [
        pa.field("chain_id", pa.string(), nullable=False),
        pa.field("problem_id", pa.string(), nullable=False),
        pa.field("round", pa.int32(), nullable=False),
        pa.field("teacher", pa.string(), nullable=False),
        pa.field("sample_idx", pa.int32(), nullable=False),
        pa.field("seed", pa.int64()),
        pa.field("prompt", pa.string()),
        pa.field("completion", pa.string()),
        pa.field("reasoning", pa.string()),
        pa.field("response", pa.string()),
        pa.field("finish_reason", pa.string()),
        pa.field("prompt_tokens", pa.int64()),
        pa.field("completion_tokens", pa.int64()),
        pa.field("sampling", SAMPLING),
        pa.field("latency_s", pa.float64()),
        pa.field("error", pa.string()),
        pa.field("simulated", pa.bool_()),
    ]
)

MESSAGE = pa.struct([pa.field("role", pa.string()), pa.field("content", pa.string())])

SFT = pa.schema(
    [
        pa.field("sample_id", pa.string(), nullable=False),
        pa.field("problem_id", pa.string(), nullable=False),
        pa.field("chain_id", pa.string()),
        pa.field("round", pa.int32()),
        pa.field("messages", pa.list_(MESSAGE), nullable=False),
        pa.field("images", IMAGES),
        pa.field("quality", pa.float64()),
    ]
)


def extend(base: pa.Schema, *fields: pa.Field) -> pa.Schema:
    """`base` plus `fields` (a field with a name already in `base` replaces it in place)."""
    schema = base
    for f in fields:
        idx = schema.get_field_index(f.name)
        schema = schema.set(idx, f) if idx >= 0 else schema.append(f)
    return schema


def conform(table: pa.Table, schema: pa.Schema) -> pa.Table:
    """Reorder/cast `table` to `schema`; missing nullable columns become nulls.

    Raises ValueError naming the column when a non-nullable one is missing or a cast fails.
    """
    cols = []
    for f in schema:
        if f.name in table.column_names:
            col = table.column(f.name)
            if not col.type.equals(f.type):
                try:
                    col = col.cast(f.type)
                except (pa.ArrowInvalid, pa.ArrowNotImplementedError) as e:
                    raise ValueError(f"column {f.name!r}: cannot cast {col.type} to {f.type}: {e}") from e
        elif f.nullable:
            col = pa.nulls(table.num_rows, f.type)
        else:
            raise ValueError(f"column {f.name!r} is required by the schema but missing")
        cols.append(col)
    return pa.Table.from_arrays(cols, schema=schema.remove_metadata())
