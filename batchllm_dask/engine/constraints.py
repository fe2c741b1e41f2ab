"""What an output constraint is: its canonical form in `SamplingParams`, and its grammar.

A request may carry one of three constraints (the vLLM names):

- `json_schema`: a JSON schema (a dict, its JSON text, or a pydantic model class), kept in
  `SamplingParams` as compact JSON text so that the params stay hashable, picklable and small;
- `regex`: a regular expression the whole completion must match;
- `choice`: the completion is exactly one of these strings, kept as a tuple.

`grammar_of(kind, value)` turns one into an llguidance grammar; `check` compiles it once so a
bad constraint is a `ValueError` naming its field when the `SamplingParams` is made, before any
work starts.  No torch here: the accessor calls this on the client.

JSON is written in one layout, the one `json.dumps` writes by default (`", "` between items,
`": "` after keys, no other whitespace), so a model cannot spend its tokens on whitespace; a
schema's top-level `"x-guidance"` key may change that (llguidance's own option).  Objects accept
only the properties they list unless the schema says `additionalProperties` (as OpenAI's and
xgrammar's strict modes do): an ETL column set is closed, and a random or hurried model would
otherwise invent keys.
"""
from __future__ import annotations

import json
from functools import lru_cache
from typing import Any

CONSTRAINT_FIELDS = ("json_schema", "regex", "choice")
JSON_LAYOUT = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}


def schema_text(value: Any) -> str | None:
    """A JSON schema as compact JSON text (key order kept: it is the order fields are written in)."""
    if value is None:
        return None
    if isinstance(value, type) and hasattr(value, "model_json_schema"):  # a pydantic model class
        value = value.model_json_schema()
    elif isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError as exc:
            raise ValueError(f"json_schema: a string must be JSON text of a schema ({exc})") from None
    if not isinstance(value, dict):
        raise ValueError(f"json_schema: must be a dict, JSON text or a pydantic model class, "
                         f"got {type(value).__name__}")
    try:
        return json.dumps(value, separators=(",", ":"), ensure_ascii=False)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"json_schema: not serializable as JSON ({exc})") from None


def choice_tuple(value: Any) -> tuple[str, ...] | None:
    """The choices as a tuple of distinct non-empty strings."""
    if value is None:
        return None
    if isinstance(value, str) or not hasattr(value, "__iter__"):
        raise ValueError(f"choice: must be a list of strings, got {type(value).__name__}")
    choices = tuple(value)
    if not choices or not all(isinstance(c, str) and c for c in choices):
        raise ValueError(f"choice: must be a non-empty list of non-empty strings, got {list(choices)!r}")
    if len(set(choices)) != len(choices):
        raise ValueError(f"choice: has duplicates: {list(choices)!r}")
    return choices


def check(kind: str, value: Any) -> None:
    """Compile the constraint's grammar; a `ValueError` naming the field if the grammar library refuses it."""
    if kind == "regex" and (not isinstance(value, str) or not value):
        raise ValueError(f"regex: must be a non-empty string, got {value!r}")
    error = _grammar_error(kind, value)
    if error:
        raise ValueError(f"{kind}: {error}")


@lru_cache(maxsize=256)
def _grammar_error(kind: str, value: str | tuple[str, ...]) -> str:
    from llguidance import LLMatcher
    return LLMatcher.validate_grammar(grammar_of(kind, value)).strip()


@lru_cache(maxsize=256)
def grammar_of(kind: str, value: str | tuple[str, ...]) -> str:
    """The llguidance grammar (its serialized form) of a canonical constraint."""
    from llguidance import LLMatcher
    if kind == "json_schema":
        return LLMatcher.grammar_from_json_schema(closed_objects(json.loads(value)), defaults=JSON_LAYOUT)
    if kind == "regex":
        return LLMatcher.grammar_from_regex(value)
    if kind == "choice":  # Lark string literals take JSON's escapes
        return LLMatcher.grammar_from_lark("start: " + " | ".join(json.dumps(c) for c in value))
    raise ValueError(f"unknown constraint kind {kind!r}; known: {CONSTRAINT_FIELDS}")


_NAMED_SCHEMAS = ("properties", "patternProperties", "$defs", "definitions", "dependentSchemas")
_DATA = ("enum", "const", "default", "examples", "required", "x-guidance")  # values, not schemas


def closed_objects(schema: Any) -> Any:
    """A copy of the schema where every object schema that lists properties and says nothing of
    additionalProperties gets `additionalProperties: false`."""
    if isinstance(schema, list):
        return [closed_objects(s) for s in schema]
    if not isinstance(schema, dict):
        return schema
    out: dict[str, Any] = {}
    for key, value in schema.items():
        if key in _NAMED_SCHEMAS and isinstance(value, dict):
            out[key] = {name: closed_objects(sub) for name, sub in value.items()}
        else:
            out[key] = value if key in _DATA else closed_objects(value)
    if isinstance(out.get("properties"), dict) and "additionalProperties" not in out:
        out["additionalProperties"] = False
    return out
