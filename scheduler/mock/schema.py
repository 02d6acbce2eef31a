"""A JSON value that satisfies a JSON Schema: what the mock answers for structured outputs.

Covers the subset that OpenAI's structured outputs accept and that the SDK emits for pydantic models:
objects (properties, required, additionalProperties), string/number/integer/boolean/null, arrays with
items, enum, const, anyOf/oneOf (nullable fields are anyOf with null), allOf, $ref into $defs/definitions,
and the simple bounds (minimum/maximum, minLength/maxLength, minItems/maxItems). Values are deterministic:
the same schema always gives the same JSON.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

_MAX_DEPTH = 8  # recursive schemas ($ref to itself) stop here: an empty array, null or {} ends the recursion


class SchemaError(ValueError):
    """The schema cannot be satisfied by the generator (an unresolvable $ref, an unknown type)."""


def instance_of(schema: Mapping[str, Any], hint: str = "mock") -> Any:
    """A value that validates against `schema`; `hint` seeds the strings (e.g. the reply's first words).

    Raises:
        SchemaError: a $ref that does not resolve, or a type the generator does not know.
    """
    return _value(schema, schema, hint, 0)


def _resolve(ref: str, root: Mapping[str, Any]) -> Mapping[str, Any]:
    if not ref.startswith("#"):
        raise SchemaError(f"only local $refs are supported, got {ref!r}")
    node: Any = root
    for part in ref.lstrip("#").strip("/").split("/") if ref != "#" else []:
        part = part.replace("~1", "/").replace("~0", "~")
        if not isinstance(node, Mapping) or part not in node:
            raise SchemaError(f"$ref {ref!r} does not resolve")
        node = node[part]
    if not isinstance(node, Mapping):
        raise SchemaError(f"$ref {ref!r} does not point to a schema")
    return node


def _value(schema: Mapping[str, Any], root: Mapping[str, Any], hint: str, depth: int) -> Any:
    if "$ref" in schema:
        return _value(_resolve(schema["$ref"], root), root, hint, depth + 1)
    if "const" in schema:
        return schema["const"]
    if "enum" in schema:
        return schema["enum"][0]
    for key in ("anyOf", "oneOf"):
        if key in schema:
            branches = list(schema[key])
            # Past the depth limit prefer a null branch, so recursive structures end.
            if depth >= _MAX_DEPTH:
                branches.sort(key=lambda b: b.get("type") != "null")
            else:
                branches.sort(key=lambda b: b.get("type") == "null")
            return _value(branches[0], root, hint, depth + 1)
    if "allOf" in schema:
        merged: dict[str, Any] = {}
        for part in schema["allOf"]:
            part = _resolve(part["$ref"], root) if "$ref" in part else part
            for k, v in part.items():
                if k in ("properties",) and k in merged:
                    merged[k] = {**merged[k], **v}
                elif k == "required" and k in merged:
                    merged[k] = [*merged[k], *v]
                else:
                    merged[k] = v
        return _value(merged, root, hint, depth + 1)
    kind = schema.get("type")
    if isinstance(kind, list):
        kinds = [k for k in kind if k != "null"] if depth < _MAX_DEPTH else ["null"]
        kind = kinds[0] if kinds else "null"
    if kind is None:
        kind = "object" if "properties" in schema else "array" if "items" in schema else "string"
    if kind == "object":
        if depth >= _MAX_DEPTH and not schema.get("required"):
            return {}
        props: Mapping[str, Any] = schema.get("properties", {})
        # Every property, required or not: strict schemas require them all anyway.
        return {name: _value(sub, root, name, depth + 1) for name, sub in props.items()}
    if kind == "array":
        items = schema.get("items", {})
        count = max(int(schema.get("minItems", 0)), 0 if depth >= _MAX_DEPTH else 1)
        if "maxItems" in schema:
            count = min(count, int(schema["maxItems"]))
        return [_value(items, root, hint, depth + 1) for _ in range(count)]
    if kind == "string":
        return _string(schema, hint)
    if kind == "integer":
        value = _number(schema, 1)
        return math.ceil(value) if math.ceil(value) <= schema.get("maximum", math.inf) else math.floor(value)
    if kind == "number":
        return _number(schema, 1.5)
    if kind == "boolean":
        return True
    if kind == "null":
        return None
    raise SchemaError(f"unknown type {kind!r}")


_FORMATS = {
    "date-time": "2026-01-01T00:00:00Z",
    "date": "2026-01-01",
    "time": "00:00:00",
    "email": "mock@example.com",
    "uri": "https://example.com/mock",
    "uuid": "00000000-0000-4000-8000-000000000000",
    "duration": "P1D",
    "ipv4": "192.0.2.1",
    "ipv6": "2001:db8::1",
    "hostname": "example.com",
}


def _string(schema: Mapping[str, Any], hint: str) -> str:
    if schema.get("format") in _FORMATS:
        return _FORMATS[schema["format"]]
    text = f"mock {hint}"
    low = int(schema.get("minLength", 0))
    if len(text) < low:
        text += "x" * (low - len(text))
    if "maxLength" in schema:
        text = text[: int(schema["maxLength"])]
    return text


def _number(schema: Mapping[str, Any], default: float) -> float:
    value = default
    if "minimum" in schema:
        value = max(value, float(schema["minimum"]))
    if "exclusiveMinimum" in schema:
        value = max(value, float(schema["exclusiveMinimum"]) + 1)
    if "maximum" in schema:
        value = min(value, float(schema["maximum"]))
    if "exclusiveMaximum" in schema:
        value = min(value, float(schema["exclusiveMaximum"]) - 1)
    return value
