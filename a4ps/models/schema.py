"""The JSON-schema subset decisions are asked in, and its strict validator.

Small on purpose: every backend must be able to *constrain* generation to it, not
only check it afterwards. Supported:

* ``{"type": "object", "properties": {...}, "required": [...]}`` (no extra keys)
* ``{"type": "string", "maxLength": n, "enum": [...]}`` (enum optional)
* ``{"type": "integer" | "number", "minimum": a, "maximum": b}``
* ``{"type": "boolean"}``
* ``{"enum": [...]}`` of strings
* ``{"type": "array", "items": {...}, "maxItems": n}``
* ``{"anyOf": [schema, {"type": "null"}]}`` for an optional value

:func:`validate` returns the value when it conforms and raises
:class:`~a4ps.models.errors.DecisionError` naming the first violation otherwise.
"""
from __future__ import annotations

import json
import math
from typing import Any, Sequence

from a4ps.models.errors import DecisionError, InvalidRequest

_TYPES = ("object", "string", "integer", "number", "boolean", "array", "null")


def check_schema(schema: Any, path: str = "$") -> None:
    """Raise InvalidRequest if ``schema`` uses anything outside the subset."""
    if not isinstance(schema, dict):
        raise InvalidRequest(f"schema at {path} must be a dict, got {type(schema).__name__}")
    if "anyOf" in schema:
        alts = schema["anyOf"]
        if not isinstance(alts, list) or not alts:
            raise InvalidRequest(f"schema at {path}: anyOf must be a non-empty list")
        for i, alt in enumerate(alts):
            check_schema(alt, f"{path}.anyOf[{i}]")
        return
    if "enum" in schema and "type" not in schema:
        values = schema["enum"]
        if not isinstance(values, list) or not values or \
                not all(isinstance(v, str) for v in values):
            raise InvalidRequest(f"schema at {path}: enum must be a non-empty list of strings")
        return
    kind = schema.get("type")
    if kind not in _TYPES:
        raise InvalidRequest(f"schema at {path}: type must be one of {_TYPES}, got {kind!r}")
    if kind == "object":
        props = schema.get("properties")
        if not isinstance(props, dict) or not props:
            raise InvalidRequest(f"schema at {path}: an object needs non-empty 'properties'")
        for key, sub in props.items():
            check_schema(sub, f"{path}.{key}")
        required = schema.get("required", [])
        if not isinstance(required, list) or any(r not in props for r in required):
            raise InvalidRequest(f"schema at {path}: 'required' must list property names")
    elif kind == "array":
        check_schema(schema.get("items"), f"{path}[]")
    elif kind == "string" and "enum" in schema:
        check_schema({"enum": schema["enum"]}, path)


def validate(value: Any, schema: dict[str, Any], path: str = "$") -> Any:
    """``value`` if it conforms to ``schema``; DecisionError naming the problem otherwise."""
    if "anyOf" in schema:
        problems = []
        for alt in schema["anyOf"]:
            try:
                return validate(value, alt, path)
            except DecisionError as e:
                problems.append(str(e))
        raise DecisionError(f"{path}: matches no alternative ({'; '.join(problems)})")
    if "enum" in schema:
        if value not in schema["enum"]:
            raise DecisionError(f"{path}: {value!r} is not one of {schema['enum']}")
        return value
    kind = schema.get("type")
    if kind == "null":
        if value is not None:
            raise DecisionError(f"{path}: expected null, got {value!r}")
        return value
    if kind == "boolean":
        if not isinstance(value, bool):
            raise DecisionError(f"{path}: expected true/false, got {value!r}")
        return value
    if kind in ("integer", "number"):
        ok = isinstance(value, int) if kind == "integer" else isinstance(value, (int, float))
        if not ok or isinstance(value, bool) or (isinstance(value, float) and not math.isfinite(value)):
            raise DecisionError(f"{path}: expected {kind}, got {value!r}")
        lo, hi = schema.get("minimum"), schema.get("maximum")
        if (lo is not None and value < lo) or (hi is not None and value > hi):
            raise DecisionError(f"{path}: {value!r} is outside [{lo}, {hi}]")
        return value
    if kind == "string":
        if not isinstance(value, str):
            raise DecisionError(f"{path}: expected a string, got {value!r}")
        limit = schema.get("maxLength")
        if limit is not None and len(value) > limit:
            raise DecisionError(f"{path}: string longer than {limit} characters")
        return value
    if kind == "array":
        if not isinstance(value, list):
            raise DecisionError(f"{path}: expected a list, got {value!r}")
        limit = schema.get("maxItems")
        if limit is not None and len(value) > limit:
            raise DecisionError(f"{path}: more than {limit} items")
        return [validate(v, schema["items"], f"{path}[{i}]") for i, v in enumerate(value)]
    if kind == "object":
        if not isinstance(value, dict):
            raise DecisionError(f"{path}: expected an object, got {value!r}")
        props = schema["properties"]
        extra = [k for k in value if k not in props]
        if extra:
            raise DecisionError(f"{path}: unexpected keys {extra}")
        missing = [k for k in schema.get("required", []) if k not in value]
        if missing:
            raise DecisionError(f"{path}: missing keys {missing}")
        return {k: validate(v, props[k], f"{path}.{k}") for k, v in value.items()}
    raise DecisionError(f"{path}: unsupported schema {schema!r}")


def check_decision_schema(schema: Any) -> None:
    """:func:`check_schema`, and the top level is an object: a decision is a dict
    (``ModelManager.structured`` returns one; the tool request, judge and votes read keys)."""
    check_schema(schema)
    if schema.get("type") != "object":
        raise InvalidRequest(f"a decision's schema must be an object schema "
                             f"({{\"type\": \"object\", \"properties\": ...}}), got {schema!r}")


def validate_object(value: Any, schema: dict[str, Any]) -> dict[str, Any]:
    """:func:`validate` for a decision's object schema: the conforming dict."""
    out = validate(value, schema)
    if not isinstance(out, dict):
        raise DecisionError(f"$: expected an object, got {value!r}")
    return out


def choice_schema(options: Sequence[str]) -> dict[str, Any]:
    """A closed choice asked of a server that constrains decoding to a JSON schema
    (Ollama's ``format``, OpenAI's ``response_format``): an object whose one field,
    ``choice``, is an enum of the options."""
    return {"type": "object", "properties": {"choice": {"type": "string",
                                                        "enum": list(options)}},
            "required": ["choice"]}


def parse_json_answer(model: str, raw: str) -> Any:
    """A server's decision text as JSON; text that is none is a DecisionError (no
    decision), never a default."""
    try:
        return json.loads(raw)
    except ValueError as e:
        raise DecisionError(f"{model} answered no JSON for a decision: {raw[:80]!r}") from e
