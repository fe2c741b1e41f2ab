"""A JSON schema's top-level fields as typed columns of a `generate` result, beside the raw completion.

    out = ddf.llm.generate("prompt", model=PATH, json_schema=Review)   # Review: a pydantic model
    out[["completion", "rating", "label", "error"]]                      # rating Int64, label str

Each property of the schema's top-level object becomes a column named after it, typed from its
schema (`column_dtypes`): integer -> Int64, number -> Float64, boolean -> boolean, string or an
enum of strings -> str, anything else (arrays, objects, mixed unions) -> object; `$ref` and
nullable unions (`anyOf: [X, null]`, pydantic's `Optional[X]`) are read through.  The dtypes
are nullable because a row's fields are either all from its parsed completion or all null: a
row whose completion does not parse, or whose top-level fields do not fit the schema, gets the
reason in `error` (saying when max_tokens cut it short) and null fields.  Its `finish_reason`
and raw completion are left as they were, so nothing is hidden.  Constrained decoding makes
such rows rare; the check is what lets a pipeline trust the columns.  pandas only: no torch.
"""
from __future__ import annotations

import json
import math
from collections.abc import Iterable
from typing import Any

import pandas as pd

_SCALAR_DTYPES = {"integer": "Int64", "number": "Float64", "boolean": "boolean", "string": "str"}
_INT64 = (-(1 << 63), (1 << 63) - 1)


def column_dtypes(schema_text: str) -> dict[str, str]:
    """Field name -> pandas dtype for the top-level properties of the schema (in schema order)."""
    schema = json.loads(schema_text)
    root = _resolve(schema, schema)
    properties = root.get("properties") if isinstance(root, dict) else None
    if not isinstance(properties, dict):
        return {}
    return {name: _dtype(sub, schema) for name, sub in properties.items()}


def check_field_names(schema_text: str, columns: Iterable[Any]) -> None:
    """ValueError when a field's column would replace a column of the result (input or completion columns)."""
    taken = sorted(set(column_dtypes(schema_text)) & set(columns), key=str)
    if taken:
        raise ValueError(f"json_schema: field(s) {taken} would replace column(s) of the same name in the "
                         "result; rename the input column(s) or the schema's field(s)")


def add_field_columns(columns: dict[str, pd.Series], schema_text: str, output_col: str) -> dict[str, pd.Series]:
    """`columns` (the completion columns of `worker.result_columns`) plus one typed column per field,
    with `error` filled for completed rows whose output does not parse or does not fit."""
    dtypes = column_dtypes(schema_text)
    texts, reasons = columns[output_col], columns["finish_reason"]
    index = texts.index
    values: dict[str, list[Any]] = {name: [] for name in dtypes}
    errors = list(columns["error"])
    for row, (text, reason, tokens) in enumerate(zip(texts, reasons, columns["completion_tokens"])):
        record, problem = (None, None) if reason == "error" else _parse(text, dtypes, reason, tokens)
        if problem is not None:
            errors[row] = problem
        for name in dtypes:
            values[name].append(None if record is None else record.get(name))
    out = dict(columns)
    out["error"] = pd.Series(errors, index=index, dtype=columns["error"].dtype)
    out.update({name: pd.Series(values[name], index=index, dtype=dtype) for name, dtype in dtypes.items()})
    return out


def _parse(text: Any, dtypes: dict[str, str], reason: str, tokens: int) -> tuple[dict | None, str | None]:
    """(the completion as a dict, None), or (None, why it cannot fill the columns)."""
    try:
        record = json.loads(text)
    except (TypeError, ValueError) as exc:
        if reason == "length":
            return None, f"output is not complete JSON: cut short after {tokens} tokens by max_tokens " \
                         f"(or the model's context); raise max_tokens ({exc})"
        return None, f"output does not parse as JSON ({exc})"
    if not isinstance(record, dict):
        return None, f"output is JSON {type(record).__name__}, not an object of the schema's fields"
    for name, dtype in dtypes.items():
        problem = _misfit(record.get(name), dtype)
        if problem:
            return None, f"output field {name!r} {problem}"
    return record, None


def _misfit(value: Any, dtype: str) -> str | None:
    """Why `value` cannot go into a column of `dtype`, or None (null always fits)."""
    if value is None or dtype == "object":
        return None
    if dtype == "Int64":
        ok = isinstance(value, int) and not isinstance(value, bool) and _INT64[0] <= value <= _INT64[1]
        return None if ok else f"is {value!r}, not a 64-bit integer"
    if dtype == "Float64":
        ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
        return None if ok else f"is {value!r}, not a number"
    if dtype == "boolean":
        return None if isinstance(value, bool) else f"is {value!r}, not a boolean"
    return None if isinstance(value, str) else f"is {value!r}, not a string"


def _resolve(sub: Any, root: dict) -> Any:
    """Follow local `$ref`s (`#/$defs/Name`, `#/definitions/Name`)."""
    seen = 0
    while isinstance(sub, dict) and isinstance(sub.get("$ref"), str) and sub["$ref"].startswith("#/") and seen < 32:
        target: Any = root
        for part in sub["$ref"][2:].split("/"):
            target = target.get(part) if isinstance(target, dict) else None
        if target is None:
            return sub
        sub, seen = target, seen + 1
    return sub


def _dtype(sub: Any, root: dict) -> str:
    sub = _resolve(sub, root)
    if not isinstance(sub, dict):
        return "object"
    branches = sub.get("anyOf") or sub.get("oneOf")
    if isinstance(branches, list):
        kinds = {_dtype(b, root) for b in branches if not _is_null(_resolve(b, root))}
        return _merge(kinds)
    if "enum" in sub or "const" in sub:
        values = sub.get("enum", [sub.get("const")])
        return _merge({_value_dtype(v) for v in values if v is not None})
    types = sub.get("type")
    types = [types] if isinstance(types, str) else types if isinstance(types, list) else []
    return _merge({_SCALAR_DTYPES.get(t, "object") for t in types if t != "null"})


def _is_null(sub: Any) -> bool:
    return isinstance(sub, dict) and (sub.get("type") == "null" or sub.get("const", 0) is None)


def _value_dtype(value: Any) -> str:
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, int):
        return "Int64"
    if isinstance(value, float):
        return "Float64"
    return "str" if isinstance(value, str) else "object"


def _merge(kinds: set[str]) -> str:
    """One column dtype for a field that may take any of `kinds` (integers widen to numbers)."""
    if kinds == {"Int64", "Float64"}:
        return "Float64"
    return kinds.pop() if len(kinds) == 1 else "object"
