"""jobctl's detach keys: parsing and recognising them in typed input."""

from __future__ import annotations

import pytest

from jobctl._errors import ConfigError
from jobctl._interactive import _scan, describe_keys, parse_detach_keys


@pytest.mark.parametrize(("spec", "keys"), [
    ("ctrl-],d", b"\x1dd"), ("ctrl-p,ctrl-q", b"\x10\x11"), ("CTRL-A", b"\x01"),
    ("", b""), ("x", b"x"),
])
def test_parse(spec: str, keys: bytes) -> None:
    assert parse_detach_keys(spec) == keys


@pytest.mark.parametrize("spec", ["ctrl-!", "ctrl-ab", "alt-x", "é", ",", "ctrl-"])
def test_bad_keys_are_a_clear_error(spec: str) -> None:
    with pytest.raises(ConfigError, match="--detach-keys"):
        parse_detach_keys(spec)


def test_describe() -> None:
    assert describe_keys(b"\x1dd") == "Ctrl-] then d"


KEYS = b"\x1dd"


def test_the_sequence_detaches_and_what_came_before_goes_to_the_job() -> None:
    assert _scan(b"ls\r\x1dd", KEYS, 0) == (b"ls\r", 0, True)


def test_split_across_reads() -> None:
    assert _scan(b"abc\x1d", KEYS, 0) == (b"abc", 1, False)
    assert _scan(b"d", KEYS, 1) == (b"", 0, True)


def test_a_prefix_not_followed_by_the_rest_is_sent_as_typed() -> None:
    assert _scan(b"\x1dx", KEYS, 0) == (b"\x1dx", 0, False)
    assert _scan(b"x", KEYS, 1) == (b"\x1dx", 0, False)
    assert _scan(b"\x1d\x1dd", KEYS, 0) == (b"\x1d", 0, True)
