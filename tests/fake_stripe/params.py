"""The wire format: Stripe's bracketed form bodies, and how endpoints read their parameters."""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from decimal import Decimal
from typing import Any, TypeVar, cast
from urllib.parse import parse_qsl

from tests.fake_stripe.rules import MAX_SIGNIFICANT_DIGITS, _bad_param, _invalid, _missing

_FORM_KEY = re.compile(r"^([^\[\]]+)((?:\[[^\[\]]*\])*)$")
_NUMBER = re.compile(r"^-?\d+(\.\d+)?$")
T = TypeVar("T")


def decode_form(text: str) -> dict[str, Any]:
    """Stripe's form encoding (`payload[customer]=x`, `expand[0]=items`) as nested dicts/lists."""
    root: dict[str, Any] = {}
    for key, value in parse_qsl(text, keep_blank_values=True):
        match = _FORM_KEY.match(key)
        if match is None:
            raise _bad_param(f"Invalid parameter name: {key}", key)
        parts = [match.group(1), *re.findall(r"\[([^\[\]]*)\]", match.group(2))]
        node = root
        for depth, part in enumerate(parts):
            name = part or str(len(node))  # `a[]=x` appends, like Rails-style encoders
            if depth == len(parts) - 1:
                if name in node:
                    raise _bad_param(f"Received the parameter {key} twice.", key)
                node[name] = value
                break
            child = node.setdefault(name, {})
            if not isinstance(child, dict):
                raise _bad_param(f"Invalid hash: {key} mixes a value and a hash.", key)
            node = child
    return cast(dict[str, Any], _listify(root))


def _listify(node: Any) -> Any:
    """Turns dicts keyed 0..n into lists, as Stripe reads `expand[0]`, `expand[1]`."""
    if not isinstance(node, dict):
        return node
    values = {key: _listify(value) for key, value in node.items()}
    if values and all(key.isdigit() for key in values):
        return [values[key] for key in sorted(values, key=int)]
    return values


def _only(params: Mapping[str, Any], *allowed: str) -> None:
    """Stripe refuses parameters an endpoint does not take."""
    for name in params:
        if name not in allowed:
            raise _bad_param(f"Received unknown parameter: {name}", name, "parameter_unknown")


def _integer(params: Mapping[str, Any], name: str) -> int:
    """A required non-negative integer parameter."""
    value = params.get(name)
    if value is None:
        raise _bad_param(f"Missing required param: {name}.", name, "parameter_missing")
    if not isinstance(value, str) or not value.isdigit():
        raise _bad_param(
            f"Invalid non-negative integer: {value}", name, "parameter_invalid_integer"
        )
    return int(value)


def _string(params: Mapping[str, Any], name: str) -> str:
    """A required string parameter."""
    value = params.get(name)
    if value is None or value == "":
        raise _bad_param(f"Missing required param: {name}.", name, "parameter_missing")
    if not isinstance(value, str):
        raise _bad_param(f"Invalid string: {name} must be a string.", name)
    return value


def _list_page(url: str, objects: Sequence[dict[str, Any]], params: Mapping[str, Any]) -> Any:
    """A Stripe list object: `limit` (1..100, default 10) objects after `starting_after`."""
    limit = _integer(params, "limit") if "limit" in params else 10
    if not 1 <= limit <= 100:
        raise _bad_param("Invalid limit: must be between 1 and 100.", "limit")
    start = 0
    if "starting_after" in params:
        ids = [found["id"] for found in objects]
        if params["starting_after"] not in ids:
            raise _missing("object", str(params["starting_after"]), param="starting_after")
        start = ids.index(params["starting_after"]) + 1
    page = list(objects[start : start + limit])
    return {"object": "list", "data": page, "has_more": start + limit < len(objects), "url": url}


def _find(table: Mapping[str, T], noun: str, object_id: str, param: str = "id") -> T:
    """An object by id, or Stripe's resource_missing."""
    if object_id not in table:
        raise _missing(noun, object_id, param)
    return table[object_id]


def _meter_value(payload: Mapping[str, str], key: str) -> Decimal:
    """The payload's value: a whole or decimal number of at most 15 significant digits."""
    raw = payload.get(key)
    if raw is None:
        raise _invalid(f"Missing {key} in payload.", param=f"payload[{key}]")
    digits = raw.lstrip("-").replace(".", "").lstrip("0")
    if not _NUMBER.match(raw) or len(digits) > MAX_SIGNIFICANT_DIGITS:
        message = f"Invalid {key}: {raw!r} must be a number of at most 15 significant digits."
        raise _invalid(message, param=f"payload[{key}]")
    return Decimal(raw)
