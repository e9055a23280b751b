"""Expiry dates read without cryptography, and when jobd's warnings are due."""

from __future__ import annotations

import datetime
from pathlib import Path

import trustme

from jobctl._expiry import not_after
from jobd._expiry import REPEAT_SECONDS, expiry_warnings


def cert(tmp_path: Path, days: float) -> Path:
    now = datetime.datetime.now(datetime.UTC)
    end = (now + datetime.timedelta(days=days)).replace(microsecond=0)
    leaf = trustme.CA().issue_cert("x.example", not_after=end)
    path = tmp_path / f"{days}.pem"
    leaf.cert_chain_pems[0].write_to_path(str(path))
    return path


def test_not_after_is_the_certificates_date(tmp_path: Path) -> None:
    path = cert(tmp_path, 100)
    end = datetime.datetime.now(datetime.UTC) + datetime.timedelta(days=100)
    assert not_after(path) is not None
    assert abs(not_after(path) - end.timestamp()) < 120  # type: ignore[operator]
    assert not_after(tmp_path / "missing.pem") is None


def test_warnings_from_14_days_then_daily(tmp_path: Path) -> None:
    far, near = cert(tmp_path, 100), cert(tmp_path, 10)
    now = datetime.datetime.now(datetime.UTC).timestamp()
    due, wake = expiry_warnings({"certificate": far, "ca": far}, now)
    assert due == [] and wake == REPEAT_SECONDS  # checked again tomorrow
    due, wake = expiry_warnings({"certificate": near, "ca": far}, now)
    assert [(d["which"], d["expired"]) for d in due] == [("certificate", False)]
    assert 9 <= due[0]["days_left"] <= 10  # type: ignore[operator]
    # 14.5 days left: wake when the 14-day window opens (in half a day), not a day later.
    _, wake = expiry_warnings({"ca": cert(tmp_path, 14.5)}, now)
    assert 0.45 * 86400 < wake <= 0.5 * 86400
