"""Strict field readers for decoded msgpack maps.

Every message is decoded from a ``dict`` whose keys are ``str``. These helpers
read one field, check its type, and raise :class:`FieldError` (turned into a
``bad_request`` by the connection) when it is missing or of the wrong type.
Unknown keys are simply never read: that is the forward-compatibility rule.

An optional field (one read with a default) that holds nil is absent: many
msgpack libraries write nil for a field the program never set, so nil and a
missing key mean the same thing for every optional field of every message.
A required field that holds nil is a wrong type, as before.
"""

from __future__ import annotations

from collections.abc import Mapping

TYPE_CHECKING = False  # typing is not imported at run time (issue 26: start-up)
if TYPE_CHECKING:
    from typing import Any, TypeVar

if TYPE_CHECKING:
    T = TypeVar("T")

_MISSING: Any = object()


class FieldError(ValueError):
    """A field of a message is missing or has the wrong type or value."""


def _get(m: Mapping[str, Any], key: str, default: Any) -> Any:
    value = m.get(key, _MISSING)
    if value is _MISSING or (value is None and default is not _MISSING):
        if default is _MISSING:
            raise FieldError(f"missing field {key!r}")
        return default
    return value


def get_int(m: Mapping[str, Any], key: str, default: Any = _MISSING) -> Any:
    v = _get(m, key, default)
    if v is default and default is not _MISSING:
        return v
    if not isinstance(v, int) or isinstance(v, bool):
        raise FieldError(f"field {key!r} must be an integer")
    return v


def get_float(m: Mapping[str, Any], key: str, default: Any = _MISSING) -> Any:
    v = _get(m, key, default)
    if v is default and default is not _MISSING:
        return v
    if isinstance(v, bool) or not isinstance(v, int | float):
        raise FieldError(f"field {key!r} must be a number")
    return float(v)


def get_str(m: Mapping[str, Any], key: str, default: Any = _MISSING) -> Any:
    v = _get(m, key, default)
    if v is default and default is not _MISSING:
        return v
    if not isinstance(v, str):
        raise FieldError(f"field {key!r} must be a string")
    return v


def get_bytes(m: Mapping[str, Any], key: str, default: Any = _MISSING) -> Any:
    v = _get(m, key, default)
    if v is default and default is not _MISSING:
        return v
    if not isinstance(v, bytes):
        raise FieldError(f"field {key!r} must be binary")
    return v


def get_bool(m: Mapping[str, Any], key: str, default: Any = _MISSING) -> Any:
    v = _get(m, key, default)
    if v is default and default is not _MISSING:
        return v
    if not isinstance(v, bool):
        raise FieldError(f"field {key!r} must be a boolean")
    return v


def get_list(m: Mapping[str, Any], key: str, default: Any = _MISSING) -> Any:
    v = _get(m, key, default)
    if v is default and default is not _MISSING:
        return v
    if not isinstance(v, list | tuple):
        raise FieldError(f"field {key!r} must be an array")
    return v


def get_map(m: Mapping[str, Any], key: str, default: Any = _MISSING) -> Any:
    v = _get(m, key, default)
    if v is default and default is not _MISSING:
        return v
    if not isinstance(v, dict):
        raise FieldError(f"field {key!r} must be a map")
    return v


def check(condition: bool, message: str) -> None:
    """Raise FieldError(message) unless condition holds."""
    if not condition:
        raise FieldError(message)


def check_type(
    name: str, value: object, kind: type | tuple[type, ...], *, optional: bool = False
) -> None:
    """Validate a dataclass field on construction."""
    if value is None and optional:
        return
    if isinstance(value, bool) and kind in (int, float, (int, float)):
        raise FieldError(f"{name} must be {_kind_name(kind)}, not bool")
    if not isinstance(value, kind):
        raise FieldError(f"{name} must be {_kind_name(kind)}, not {type(value).__name__}")


def _kind_name(kind: type | tuple[type, ...]) -> str:
    if isinstance(kind, tuple):
        return " or ".join(k.__name__ for k in kind)
    return kind.__name__
