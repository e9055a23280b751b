"""Job labels (protocol 1.2): ``KEY=VALUE`` pairs a client attaches to a job at
start, shown in its status and filtered on by ``list``.

A job's labels are a tuple of (key, value) pairs, sorted by key, each key once:
one canonical form, so that equal label sets compare equal. On the wire they
are a map. Every bound is here, so that labels never make a status too large
for a frame nor a list filter costly:

- at most MAX_LABELS per job (and per list filter);
- a key: 1 to MAX_LABEL_KEY bytes of ASCII letters, digits and ``. _ - /``,
  starting with a letter or digit (docker's and Kubernetes' label keys fit);
- a value: 0 to MAX_LABEL_VALUE bytes of UTF-8 without control characters (a
  value is printed for people as it is).
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping

from ._fields import FieldError, check

TYPE_CHECKING = False  # typing is not imported at run time (issue 26: start-up)
if TYPE_CHECKING:
    from typing import Any

#: Labels on one job (and in one list filter): a handful is the common case.
MAX_LABELS = 32
#: The longest key, in bytes.
MAX_LABEL_KEY = 128
#: The longest value, in bytes (UTF-8).
MAX_LABEL_VALUE = 512

_KEY = re.compile(r"[A-Za-z0-9][A-Za-z0-9._/-]*")
_CONTROL = re.compile("[\x00-\x1f\x7f-\x9f\u2028\u2029]")

Labels = tuple[tuple[str, str], ...]


def check_labels(name: str, value: object) -> Labels:
    """``value`` (pairs or a mapping) as canonical labels; FieldError if it breaks
    a bound. ``name`` names the field in the message."""
    if isinstance(value, Mapping):
        value = tuple(value.items())
    check(isinstance(value, tuple | list), f"{name} must be a map of strings")
    assert isinstance(value, tuple | list)
    check(len(value) <= MAX_LABELS, f"{name}: {len(value)} labels, more than {MAX_LABELS}")
    out: dict[str, str] = {}
    for item in value:
        check(isinstance(item, tuple | list) and len(item) == 2,
              f"{name} entries must be (key, value) pairs")
        key, text = item
        check(isinstance(key, str) and isinstance(text, str),
              f"{name}: keys and values must be strings")
        check_label(key, text)
        check(key not in out, f"{name}: label {key!r} repeats")
        out[key] = text
    return tuple(sorted(out.items()))


def check_label(key: str, value: str) -> None:
    """One label's bounds (FieldError)."""
    check(_KEY.fullmatch(key) is not None and len(key) <= MAX_LABEL_KEY,
          f"label key {key[:MAX_LABEL_KEY]!r} must be 1 to {MAX_LABEL_KEY} letters, digits "
          "or . _ - /, starting with a letter or digit")
    try:
        size = len(value.encode())
    except UnicodeError:
        raise FieldError(f"label {key!r}: the value is not valid UTF-8") from None
    check(size <= MAX_LABEL_VALUE,
          f"label {key!r}: a value of {size} bytes is longer than {MAX_LABEL_VALUE}")
    check(_CONTROL.search(value) is None, f"label {key!r}: the value has control characters")


def labels_from_wire(m: Mapping[str, Any], key: str) -> Labels:
    raw = m.get(key)
    if raw is None:
        return ()
    check(isinstance(raw, dict), f"{key} must be a map")
    return check_labels(key, tuple(raw.items()))


def labels_to_wire(labels: Iterable[tuple[str, str]]) -> dict[str, str]:
    return dict(labels)


__all__ = ["MAX_LABELS", "MAX_LABEL_KEY", "MAX_LABEL_VALUE", "Labels", "check_label",
           "check_labels", "labels_from_wire", "labels_to_wire"]
