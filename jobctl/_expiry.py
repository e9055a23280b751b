"""Certificate expiry without ``cryptography``, and jobctl's warning.

jobctl warns on stderr within WARN_DAYS of its client certificate's end
(jobd, within 14 days of its own: :mod:`jobd._expiry`). Both only need the
notAfter date, which the standard library's ssl module decodes
(``_test_decode_cert``, in CPython since 3.2: private, so its absence only
disables the warning). No ASN.1 is parsed here. This module imports nothing
of jobd's: jobctl's start-up does not pay for the daemon's package.
"""

from __future__ import annotations

import os
import ssl
import sys
import time

#: Warn this many days ahead: a week leaves time to request and sign a new one.
WARN_DAYS = 7

#: The date format OpenSSL prints notAfter in: "Jun  1 12:00:00 2026 GMT".
_MONTHS = {m: i for i, m in enumerate(
    ("Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec"), 1)}


def not_after(path: str | os.PathLike[str]) -> float | None:
    """The first certificate's notAfter in ``path`` (Unix time), or None if unknown."""
    dates = validity(path)
    return None if dates is None else dates[1]


def validity(path: str | os.PathLike[str]) -> tuple[float, float] | None:
    """The first certificate's (notBefore, notAfter) in ``path`` (Unix times), or
    None if unknown (no such file, not a certificate, no decoder)."""
    decode = getattr(getattr(ssl, "_ssl", None), "_test_decode_cert", None)
    if decode is None:
        return None
    try:
        decoded = decode(os.fspath(path))
        return _time(decoded["notBefore"]), _time(decoded["notAfter"])
    except (OSError, ssl.SSLError, KeyError, ValueError, TypeError):
        return None


def _time(text: str) -> float:
    """OpenSSL's "Jun  1 12:00:00 2026 GMT" as Unix time."""
    month, day, clock, year, _zone = text.split()
    hour, minute, second = (int(x) for x in clock.split(":"))
    days = _days_from_civil(int(year), _MONTHS[month], int(day))
    return float(days * 86400 + hour * 3600 + minute * 60 + second)


def utc(when: float) -> str:
    """A Unix time as ``2026-12-07 18:00 UTC`` (without importing datetime)."""
    days, rest = divmod(int(when), 86400)
    year, month, day = _civil_from_days(days)
    return f"{year:04d}-{month:02d}-{day:02d} {rest // 3600:02d}:{rest % 3600 // 60:02d} UTC"


def _civil_from_days(days: int) -> tuple[int, int, int]:
    """The inverse of :func:`_days_from_civil` (H. Hinnant's algorithm)."""
    days += 719468
    era = days // 146097
    doe = days - era * 146097
    yoe = (doe - doe // 1460 + doe // 36524 - doe // 146096) // 365
    doy = doe - (365 * yoe + yoe // 4 - yoe // 100)
    mp = (5 * doy + 2) // 153
    day = doy - (153 * mp + 2) // 5 + 1
    month = mp + 3 if mp < 10 else mp - 9
    return yoe + era * 400 + (month <= 2), month, day


def _days_from_civil(year: int, month: int, day: int) -> int:
    """Days since 1970-01-01 of a proleptic Gregorian date (H. Hinnant's algorithm);
    computed here because importing datetime costs jobctl's every run."""
    year -= month <= 2
    era = year // 400
    yoe = year - era * 400
    doy = (153 * (month + (-3 if month > 2 else 9)) + 2) // 5 + day - 1
    doe = yoe * 365 + yoe // 4 - yoe // 100 + doy
    return era * 146097 + doe - 719468


def warn_if_expiring(certificate: str, *, now: float | None = None) -> None:
    end = not_after(certificate)
    if end is None:
        return
    left = end - (time.time() if now is None else now)
    if left > WARN_DAYS * 86400:
        return
    if left <= 0:
        return  # the server refuses it at the handshake, and the one error line says why
    days = left / 86400
    when = f"in {days:.0f} days" if days >= 1.5 else f"in {left / 3600:.0f} hours"
    print(f"jobctl: warning: the client certificate {certificate} expires {when}: "
          "request a new one (jobctl cert request) and have it signed", file=sys.stderr)
