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


__all__ = ["parse_size"]
