"""The server's TLS context: TLS 1.3 only, client certificates required."""

from __future__ import annotations

import ssl
from pathlib import Path


class TLSConfigError(Exception):
    """A certificate, key, CA or CRL file cannot be used."""


def make_server_context(certificate: Path, key: Path, ca: Path, crl: Path | None = None
                        ) -> ssl.SSLContext:
    """Build the context every connection is served with.

    ``ssl.create_default_context(Purpose.CLIENT_AUTH)`` would leave
    ``verify_mode = CERT_NONE`` and never ask for a client certificate, so the
    context is built by hand: only the ``-C`` CA is trusted, a certificate is
    required, and nothing below TLS 1.3 is offered.
    """
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    ctx.maximum_version = ssl.TLSVersion.TLSv1_3
    ctx.verify_mode = ssl.CERT_REQUIRED
    # No session resumption: every connection shows its certificate (a resumed session
    # skips the check, so an expired or revoked certificate would keep getting in).
    # In TLS 1.3, OP_NO_TICKET alone only switches OpenSSL to stateful tickets, which
    # it still sends (two per connection) and honours; num_tickets = 0 sends none.
    ctx.options |= ssl.OP_NO_TICKET
    ctx.num_tickets = 0
    try:
        ctx.load_cert_chain(str(certificate), str(key))
    except (OSError, ssl.SSLError) as exc:
        raise TLSConfigError(f"cannot load certificate {certificate} with key {key}: "
                             f"{_reason(exc)}") from None
    try:
        ctx.load_verify_locations(cafile=str(ca))
    except (OSError, ssl.SSLError) as exc:
        raise TLSConfigError(f"cannot load CA {ca}: {_reason(exc)}") from None
    if crl is not None:
        try:
            ctx.load_verify_locations(cafile=str(crl))
        except (OSError, ssl.SSLError) as exc:
            raise TLSConfigError(f"cannot load CRL {crl}: {_reason(exc)}") from None
        ctx.verify_flags |= ssl.VERIFY_CRL_CHECK_LEAF
    return ctx


def _reason(exc: BaseException) -> str:
    if isinstance(exc, ssl.SSLError) and exc.reason:
        return str(exc.reason).lower().replace("_", " ")
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror
    return str(exc)


def describe_tls_error(exc: BaseException | None) -> str:
    """A short reason for a failed handshake, for the event log."""
    while exc is not None and not isinstance(exc, ssl.SSLError | OSError):
        exc = exc.__cause__ or exc.__context__
    if exc is None:
        return "connection closed during handshake"
    if isinstance(exc, ssl.SSLError):
        return getattr(exc, "verify_message", None) or _reason(exc)
    return _reason(exc)
