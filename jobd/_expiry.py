"""jobd's warning that its certificate or its CA is about to expire.

jobd warns in its log SERVER_WARN_DAYS before its own certificate or its CA
expires, then daily. The date comes from :func:`protocol._x509.pem_not_after`
(a walk through the certificate's DER: no ``cryptography`` in the daemon).
"""

from __future__ import annotations

import os
from collections.abc import Mapping

from protocol._x509 import pem_not_after

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
        end = pem_not_after(path)
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
