"""Sizes and rates as people write them: the vocabulary of job limits.

Limits travel on the wire as plain integers (bytes, bytes per second); this
is the one parser of their human form, shared by ``jobd``'s options (caps and
defaults) and ``jobctl``'s (``--memory 256M``, ``--io-read-bps /dev/sda=10M``).
"""

from __future__ import annotations

import re

_SIZE = re.compile(r"^\s*(\d+)\s*([KMGT]?)(i?B)?\s*$", re.IGNORECASE)
_UNITS = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}
#: The largest size either side accepts: what msgpack's int64 carries (and far
#: beyond any memory or disk bandwidth), so a parsed size always encodes.
MAX_SIZE = (1 << 63) - 1
#: Digits read at most: int() of a longer string is refused by Python itself
#: (and costs quadratic time before that); any real size is far shorter.
_MAX_DIGITS = 30


def parse_size(text: str) -> int:
    """Parse ``512``, ``64K``, ``10M``, ``1G``, ``1GiB`` (binary units) into bytes.

    Raises ValueError with a one-line message for anything else, including a
    size beyond :data:`MAX_SIZE`.
    """
    m = _SIZE.match(text) if len(text) <= _MAX_DIGITS + 8 else None
    if not m:
        raise ValueError(f"not a size: {text!r} (examples: 4096, 64K, 10M, 1G)")
    value = int(m.group(1)) * _UNITS[m.group(2).upper()]
    if value > MAX_SIZE:
        raise ValueError(f"size too large: {text!r}")
    return value


__all__ = ["MAX_SIZE", "parse_size"]
