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
    decode = getattr(getattr(ssl, "_ssl", None), "_test_decode_cert", None)
    if decode is None:
        return None
    try:
        text = decode(os.fspath(path))["notAfter"]
        month, day, clock, year, _zone = text.split()
        hour, minute, second = (int(x) for x in clock.split(":"))
        days = _days_from_civil(int(year), _MONTHS[month], int(day))
    except (OSError, ssl.SSLError, KeyError, ValueError, TypeError):
        return None
    return float(days * 86400 + hour * 3600 + minute * 60 + second)


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
