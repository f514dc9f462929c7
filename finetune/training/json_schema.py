"""The JSON-schema subset that function parameters use, checked without a schema library: `type` (one or a list),
`properties`, `required`, `additionalProperties: false`, `enum`, `items`, `anyOf` / `oneOf`. Other keywords
(`description`, `format`, `pattern`, bounds, ...) are not checked: a value is never refused for what this does not
read."""

from __future__ import annotations

from typing import Any

_TYPE_CHECKS = {
    "object": lambda v: isinstance(v, dict),
    "array": lambda v: isinstance(v, list),
    "string": lambda v: isinstance(v, str),
    # JSON has one number type: 3.0 is an integer, true is not a number
    "integer": lambda v: not isinstance(v, bool) and (isinstance(v, int) or (isinstance(v, float) and v.is_integer())),
    "number": lambda v: not isinstance(v, bool) and isinstance(v, (int, float)),
    "boolean": lambda v: isinstance(v, bool),
    "null": lambda v: v is None,
}


def schema_problem(value: Any, schema: Any, where: str = "arguments") -> str | None:
    """The first way `value` breaks `schema`, in words naming where (`arguments.city`), or None when it fits."""
    if not isinstance(schema, dict):
        return None  # `true`, `{}` or a malformed schema accepts anything
    types = schema.get("type")
    if types is not None:
        wanted = [types] if isinstance(types, str) else list(types)
        known = [t for t in wanted if t in _TYPE_CHECKS]
        if known and not any(_TYPE_CHECKS[t](value) for t in known):
            return f"{where} is {_json_type(value)}, not {' or '.join(known)}"
    if "enum" in schema and isinstance(schema["enum"], list) and value not in schema["enum"]:
        return f"{where} is {value!r}, not one of {schema['enum']}"
    for keyword in ("anyOf", "oneOf"):
        options = schema.get(keyword)
        if isinstance(options, list) and options and all(schema_problem(value, o, where) for o in options):
            return f"{where} fits none of the {keyword} schemas"
    if isinstance(value, dict):
        properties = schema.get("properties") if isinstance(schema.get("properties"), dict) else {}
        for key in schema.get("required") or []:
            if key not in value:
                return f"{where} lacks the required key {key!r}"
        for key, item in value.items():
            if key in properties:
                if problem := schema_problem(item, properties[key], f"{where}.{key}"):
                    return problem
            elif schema.get("additionalProperties") is False:
                return f"{where} has the key {key!r}, which the schema does not allow"
    if isinstance(value, list) and isinstance(schema.get("items"), dict):
        for i, item in enumerate(value):
            if problem := schema_problem(item, schema["items"], f"{where}[{i}]"):
                return problem
    return None


def _json_type(value: Any) -> str:
    for name in ("null", "boolean", "integer", "number", "string", "array", "object"):
        if _TYPE_CHECKS[name](value):
            return {"null": "null", "integer": "an integer", "array": "an array", "object": "an object"}.get(
                name, f"a {name}"
            )
    return type(value).__name__
