"""known_servers: the pin file as people edit it, and the check's three answers."""

from __future__ import annotations

from pathlib import Path

import pytest

from jobctl._errors import ConnectionFailed
from jobctl._trust import PinMismatch, Pinning, UnknownServer, fingerprint


def test_pins_are_found_by_address_and_port_among_comments(tmp_path: Path) -> None:
    known = tmp_path / "known_servers"
    cert_a, cert_b = b"certificate a", b"certificate b"
    known.write_text("# my servers\n\n"
                     f"[WEB1.example]:8000 {fingerprint(cert_a).lower()}  # lowercase is fine\n"
                     f"[::1]:8000 {fingerprint(cert_b)}\n")
    Pinning("web1.example", 8000, path=known).check(cert_a)
    Pinning("::1", 8000, path=known).check(cert_b)
    with pytest.raises(UnknownServer):  # another port is another server
        Pinning("::1", 8001, path=known).check(cert_b)
    with pytest.raises(PinMismatch) as raised:
        Pinning("::1", 8000, path=known).check(cert_a)
    message = str(raised.value)
    assert f"{known}:4" in message
    assert fingerprint(cert_a) in message and fingerprint(cert_b) in message
    assert raised.value.exit_status == 3


def test_first_use_records_and_never_replaces(tmp_path: Path,
                                              capsys: pytest.CaptureFixture[str]) -> None:
    known = tmp_path / "dir" / "known_servers"
    Pinning("10.0.0.5", 8000, accept_new=True, path=known).check(b"one")
    assert "trusting server [10.0.0.5]:8000 on first use" in capsys.readouterr().err
    assert known.read_text() == f"[10.0.0.5]:8000 {fingerprint(b'one')}\n"
    assert known.stat().st_mode & 0o777 == 0o600
    with pytest.raises(PinMismatch):
        Pinning("10.0.0.5", 8000, accept_new=True, path=known).check(b"two")
    assert known.read_text() == f"[10.0.0.5]:8000 {fingerprint(b'one')}\n"


def test_no_certificate_is_no_match(tmp_path: Path) -> None:
    with pytest.raises(ConnectionFailed, match="showed no certificate"):
        Pinning("h", 1, accept_new=True, path=tmp_path / "k").check(None)
