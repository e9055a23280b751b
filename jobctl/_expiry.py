"""jobctl's warning that its client certificate is about to expire.

jobctl warns on stderr within WARN_DAYS of its client certificate's end
(jobd, within 14 days of its own: ``jobd/_expiry.py``). Both read the notAfter
date with :func:`protocol._x509.pem_not_after` (no ``cryptography``).
"""

from __future__ import annotations

import sys
import time

from protocol._x509 import pem_not_after

#: Warn this many days ahead: a week leaves time to request and sign a new one.
WARN_DAYS = 7


def warn_if_expiring(certificate: str, *, now: float | None = None) -> None:
    end = pem_not_after(certificate)
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
