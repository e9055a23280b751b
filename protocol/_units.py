"""Sizes and rates as people write them: the vocabulary of job limits.

Limits travel on the wire as plain integers (bytes, bytes per second); this
is the one parser of their human form, shared by ``jobd``'s options (caps and
defaults) and ``jobctl``'s (``--memory 256M``, ``--io-read-bps /dev/sda=10M``).
"""

from __future__ import annotations

import re

_SIZE = re.compile(r"^\s*(\d+)\s*([KMGT]?)(i?B)?\s*$", re.IGNORECASE)
_UNITS = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}
#: Digits read at most: int() of a longer string is refused by Python itself
#: (and costs quadratic time before that); any real size is far shorter.
_MAX_DIGITS = 30


def parse_size(text: str) -> int:
    """Parse ``512``, ``64K``, ``10M``, ``1G``, ``1GiB`` (binary units) into bytes.

    Raises ValueError with a one-line message for anything else. The range is
    the caller's to check: a limit's bounds are the protocol's
    (``request_limits``: at most ``MAX_LIMIT_VALUE``), jobd's options have
    their own.
    """
    m = _SIZE.match(text) if len(text) <= _MAX_DIGITS + 8 else None
    if not m:
        raise ValueError(f"not a size: {text!r} (examples: 4096, 64K, 10M, 1G)")
    return int(m.group(1)) * _UNITS[m.group(2).upper()]


_DURATION_PART = re.compile(r"(\d+(?:\.\d+)?)([smhdw]?)")
_SECONDS = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}


def parse_duration(text: str) -> float:
    """Parse ``90``, ``90s``, ``15m``, ``1h30m``, ``12h``, ``30d``, ``2w`` into seconds.

    For retention and list filters (``--retain 30d``, ``--since 2h``,
    ``prune --older-than 1w``). Raises ValueError with a one-line message.
    """
    value = text.strip().lower()
    parts = _DURATION_PART.findall(value) if len(value) <= 40 else []
    if not parts or "".join(n + u for n, u in parts) != value:
        raise ValueError(f"not a duration: {text!r} (examples: 3600, 90s, 10m, 1h30m, 30d)")
    return sum(float(n) * _SECONDS[u] for n, u in parts)


__all__ = ["parse_duration", "parse_size"]
