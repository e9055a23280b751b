"""When a certificate expires, without ``cryptography``: for expiry warnings.

jobd warns in its log EXPIRY_WARNING_DAYS before its own certificate or its
CA expires; jobctl warns on stderr within 7 days of its client certificate's
end. Both only need the notAfter date, which the standard library's ssl
module decodes (``_test_decode_cert``, in CPython since 3.2: private, so its
absence only disables the warning). No ASN.1 is parsed here.
"""

from __future__ import annotations

import os
import ssl
from collections.abc import Mapping

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


#: jobd warns this many days before its certificate or its CA expires.
SERVER_WARN_DAYS = 14
#: While a certificate is inside its warning window, the warning repeats this often;
#: outside it, jobd wakes at the window's start (or after this, to see replaced files).
REPEAT_SECONDS = 86400.0


def expiry_warnings(files: Mapping[str, os.PathLike[str] | str], now: float,
                    warn_days: int = SERVER_WARN_DAYS) -> tuple[list[dict[str, object]], float]:
    """The warnings due now (one per file in its window), and seconds until the next check."""
    due: list[dict[str, object]] = []
    wake = REPEAT_SECONDS
    for what, path in files.items():
        end = not_after(path)
        if end is None:
            continue
        window = end - warn_days * 86400
        if now >= window:
            due.append({"which": what, "file": os.fspath(path),
                        "days_left": round((end - now) / 86400, 1),
                        "expired": end <= now})
        else:
            wake = min(wake, window - now)
    return due, max(wake, 1.0)
