"""The engine's checks of a start's io limits (issue 13 item 2): bounded, linear, and
one limit per device whatever it is called."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from jobd.engine import BadLimits, LimitPolicy
from jobd.engine._limits import devices, resolve
from protocol import MAX_IO_DEVICES, Limits

from .limits_helpers import block_device


def test_resolve_caps_entries_for_engine_callers() -> None:
    """The engine API is not behind the protocol's checks: it caps entries itself, so
    174,700 device names (which froze jobd for 446 s) are refused at once."""
    many = tuple((f"{i:x}", 1) for i in range(174_700))
    with pytest.raises(BadLimits, match="174700 devices, more than 16"):
        resolve(Limits(io_read_bps=many), LimitPolicy())
    ok = tuple((f"/dev/d{i}", 1) for i in range(MAX_IO_DEVICES))
    limits = resolve(Limits(io_write_bps=ok), LimitPolicy())
    assert limits is not None and limits.io_write_bps == ok


def test_resolve_refuses_a_device_named_twice() -> None:
    with pytest.raises(BadLimits, match="--io-read-bps: /dev/sda is given more than once"):
        resolve(Limits(io_read_bps=(("/dev/sda", 1), ("/dev/sdb", 1), ("/dev/sda", 2))),
                LimitPolicy())
    # once per direction: the same device for reading and for writing is fine
    assert resolve(Limits(io_read_bps=(("/dev/sda", 1),), io_write_bps=(("/dev/sda", 1),)),
                   LimitPolicy()) is not None


def test_two_names_of_one_device_are_refused(tmp_path: Path) -> None:
    """A symbolic link and its target are one device (same MAJOR:MINOR): the kernel keeps
    one limit per device, so the request is refused rather than half applied."""
    device = block_device() or next(
        (f"/dev/{n}" for n in sorted(os.listdir("/dev")) if n.startswith("loop")
         and n[4:].isdigit()), None)
    if device is None:
        pytest.skip("this machine has no block device")
    alias = tmp_path / "alias"
    alias.symlink_to(device)
    numbers = devices(Limits(io_read_bps=((device, 1),), io_write_bps=((str(alias), 1),)))
    assert numbers[device] == numbers[str(alias)]
    with pytest.raises(BadLimits, match=f"{alias} and {device} are one device"):
        devices(Limits(io_read_bps=((device, 1), (str(alias), 2))))
