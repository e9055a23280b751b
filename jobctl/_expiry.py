"""jobctl's warning that the client certificate is about to expire."""

from __future__ import annotations

import sys
import time

from jobd._expiry import not_after

#: Warn this many days ahead: a week leaves time to request and sign a new one.
WARN_DAYS = 7


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
