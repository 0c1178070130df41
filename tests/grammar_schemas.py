"""JSON schemas for the structured-output tests: nested objects, arrays, enums, required fields,
each bounded (short strings, few items, small integers), so an answer of random weights under the
grammar closes well within a test's `max_tokens`."""

from __future__ import annotations

from typing import Any

COLORS = ["red", "green", "blue"]


def _leaf(i: int) -> dict[str, Any]:
    kinds: list[dict[str, Any]] = [
        {"type": "string", "maxLength": 4},
        {"type": "integer", "minimum": 0, "maximum": 9},
        {"enum": COLORS},
        {"type": "boolean"},
        {"type": "array", "items": {"type": "integer", "minimum": 0, "maximum": 5}, "maxItems": 2},
    ]
    return kinds[i % len(kinds)]


def schema(i: int) -> dict[str, Any]:
    """Schema number i: an object with a required enum, a nested object with its own required
    field, an array of small objects, and a leaf that varies with i."""
    return {
        "type": "object",
        "properties": {
            "kind": {"enum": ["a", "b", f"c{i}"]},
            "inner": {
                "type": "object",
                "properties": {"ok": {"type": "boolean"}, "value": _leaf(i)},
                "required": ["ok", "value"] if i % 2 else ["value"],
                "additionalProperties": False,
            },
            "items": {
                "type": "array",
                "items": {"type": "object", "properties": {"n": {"type": "integer", "minimum": 0, "maximum": 3}},
                          "required": ["n"], "additionalProperties": False},
                "maxItems": 1 + i % 2,
            },
            "extra": _leaf(i + 2),
        },
        "required": ["kind", "inner", "items"] if i % 3 else ["kind", "inner"],
        "additionalProperties": False,
    }


def response_format(i: int) -> dict[str, Any]:
    return {"type": "json_schema", "json_schema": {"name": f"answer_{i}", "schema": schema(i), "strict": True}}


BAD_SCHEMA = {"type": "object", "properties": {"x": {"type": "string", "pattern": "(?<=a)b"}}}  # look-behind

WEATHER_TOOL = {"type": "function", "function": {
    "name": "get_weather", "description": "The weather in a city",
    "parameters": {"type": "object", "properties": {
        "city": {"type": "string", "maxLength": 6}, "unit": {"enum": ["c", "f"]},
        "days": {"type": "array", "items": {"type": "integer", "minimum": 1, "maximum": 7}, "maxItems": 2}},
        "required": ["city", "unit"], "additionalProperties": False}}}
