"""protocol.parse_size: the one parser of sizes and rates, for jobd and jobctl."""

from __future__ import annotations

import pytest

import protocol as p
from jobd import _config


@pytest.mark.parametrize(("text", "value"), [
    ("512", 512), ("64K", 64 << 10), ("10M", 10 << 20), ("1g", 1 << 30), ("1GiB", 1 << 30),
    (" 2 T ", 2 << 40), ("0", 0), ("8388608T", 8388608 << 40),
])
def test_sizes(text: str, value: int) -> None:
    assert p.parse_size(text) == value


@pytest.mark.parametrize("text", ["", "x", "1.5G", "-1", "1P", "9" * 40, "1 0"])
def test_refused_with_one_line(text: str) -> None:
    with pytest.raises(ValueError) as info:
        p.parse_size(text)
    assert "\n" not in str(info.value)


def test_both_sides_use_the_protocol_parser() -> None:
    assert _config.parse_size is p.parse_size
