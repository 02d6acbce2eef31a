"""A JSON value that satisfies a JSON Schema: what the mock answers for structured outputs.

Covers the subset that OpenAI's structured outputs accept and that the SDK emits for pydantic models:
objects (properties, required, additionalProperties), string/number/integer/boolean/null, arrays with
items, enum, const, anyOf/oneOf (nullable fields are anyOf with null), allOf, $ref into $defs/definitions,
the simple bounds (minimum/maximum, exclusive bounds, multipleOf, minLength/maxLength, minItems/maxItems),
tuples (prefixItems) and string patterns (the shortest text each part of the regular expression allows). Values
are deterministic: the same schema always gives the same JSON.
"""

from __future__ import annotations

import importlib
import math
import re
from collections.abc import Mapping, Sequence
from typing import Any

_MAX_DEPTH = 8  # recursive schemas ($ref to itself) stop here: an empty array, null or {} ends the recursion
# The standard library's own parser of regular expressions (private, but the one re itself compiles with; its
# public alias sre_parse is deprecated).
_regex: Any = importlib.import_module("re._parser")


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
        prefix = schema.get("prefixItems")
        if isinstance(prefix, Sequence):  # a tuple: one value per position
            return [_value(sub, root, hint, depth + 1) for sub in prefix]
        items = schema.get("items", {})
        count = max(int(schema.get("minItems", 0)), 0 if depth >= _MAX_DEPTH else 1)
        if "maxItems" in schema:
            count = min(count, int(schema["maxItems"]))
        return [_value(items, root, hint, depth + 1) for _ in range(count)]
    if kind == "string":
        return _string(schema, hint)
    if kind == "integer":
        value = _number(schema, 1)
        step = schema.get("multipleOf")
        if isinstance(step, int | float) and step > 0 and float(step).is_integer():
            return int(math.ceil(value / step) * step)
        return math.ceil(value) if math.ceil(value) <= schema.get("maximum", math.inf) else math.floor(value)
    if kind == "number":
        value = _number(schema, 1.5)
        step = schema.get("multipleOf")
        return math.ceil(value / step) * step if isinstance(step, int | float) and step > 0 else value
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
    pattern = schema.get("pattern")
    if isinstance(pattern, str):
        return _matching(pattern, int(schema.get("minLength", 0)))
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


def _matching(pattern: str, min_length: int) -> str:
    """A short text in which ``pattern`` is found (JSON Schema patterns are not anchored), at least
    ``min_length`` long where padding keeps it matching.

    Raises:
        SchemaError: the pattern is not a regular expression, or uses what the generator cannot satisfy
            (lookarounds, back references).
    """
    try:
        found = re.compile(pattern)
        text = _emit(_regex.parse(pattern))
    except re.error as exc:
        raise SchemaError(f"pattern {pattern!r} is not a regular expression: {exc}") from None
    if found.search(text) is None:
        raise SchemaError(f"no text was found for pattern {pattern!r}")
    if len(text) < min_length and found.search(padded := text + "x" * (min_length - len(text))):
        return padded
    return text


# A character of each class (\d, \s, \w and their negations).
_CATEGORY = {"CATEGORY_DIGIT": "0", "CATEGORY_NOT_DIGIT": "a", "CATEGORY_SPACE": " ", "CATEGORY_NOT_SPACE": "a",
             "CATEGORY_WORD": "a", "CATEGORY_NOT_WORD": " "}
_CANDIDATES = "a0A_ -~"


def _emit(items: Any) -> str:
    """The shortest text for a parsed regular expression: each repeat at its least, the first branch."""
    out = []
    for op, arg in items:
        name = str(op)
        if name == "LITERAL":
            out.append(chr(arg))
        elif name == "NOT_LITERAL":
            out.append("a" if arg != ord("a") else "b")
        elif name == "ANY":
            out.append("a")
        elif name == "IN":
            out.append(_one_of(arg))
        elif name in ("MAX_REPEAT", "MIN_REPEAT", "POSSESSIVE_REPEAT"):
            least, _, sub = arg
            out.append(_emit(sub) * least)
        elif name == "SUBPATTERN":
            out.append(_emit(arg[-1]))
        elif name == "ATOMIC_GROUP":
            out.append(_emit(arg))
        elif name == "BRANCH":
            out.append(_emit(arg[1][0]))
        elif name == "CATEGORY":
            out.append(_CATEGORY.get(str(arg), "a"))
        elif name != "AT":  # anchors need no text; lookarounds and back references are not generated
            raise SchemaError(f"cannot generate text for {name.lower()} in a pattern")
    return "".join(out)


def _one_of(items: Any) -> str:
    """A character of a character class ``[...]``."""
    members = [(str(op), arg) for op, arg in items]
    if members and members[0][0] == "NEGATE":
        rest = members[1:]
        for char in _CANDIDATES:
            if not any(_covers(name, arg, char) for name, arg in rest):
                return char
        raise SchemaError("no character found outside a negated class")
    for name, arg in members:
        if name == "LITERAL":
            return chr(arg)
        if name == "RANGE":
            return chr(arg[0])
        if name == "CATEGORY":
            return _CATEGORY.get(str(arg), "a")
    raise SchemaError("an empty character class")


def _covers(name: str, arg: Any, char: str) -> bool:
    if name == "LITERAL":
        return bool(arg == ord(char))
    if name == "RANGE":
        return bool(arg[0] <= ord(char) <= arg[1])
    if name == "CATEGORY":
        kind = str(arg)
        test = char.isdigit() if "DIGIT" in kind else char.isspace() if "SPACE" in kind else (
            char.isalnum() or char == "_")
        return test != ("NOT" in kind)
    return False
