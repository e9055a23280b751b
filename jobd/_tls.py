"""The server's TLS context: TLS 1.3 only, client certificates required."""

from __future__ import annotations

import os
import re
import ssl
import stat
from pathlib import Path

#: The only PEM block a ``--crl`` file may hold. OpenSSL's loader also takes
#: certificates from it, which would make them trusted: a CRL file (public data,
#: often fetched by cron) must only ever revoke, as OpenSSH's RevokedKeys does.
CRL_LABEL = "X509 CRL"
#: Any line that starts a PEM block as OpenSSL's reader sees it (leading blanks
#: included, to be strict): its label must be CRL_LABEL.
_PEM_BEGIN = re.compile(rb"^[ \t]*-----BEGIN ([^\r\n]*?)-----[ \t\r]*$", re.MULTILINE)
#: Any mention of a BEGIN marker, to catch one the pattern above would not parse.
_ANY_BEGIN = re.compile(rb"-----BEGIN")
#: A CRL file larger than this is refused (a CRL of 100,000 revocations is ~4 MB).
MAX_CRL_BYTES = 64 << 20


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
    check_key_private(key)
    try:
        ctx.load_cert_chain(str(certificate), str(key))
    except (OSError, ssl.SSLError) as exc:
        from protocol._pem import mismatch

        raise TLSConfigError(f"cannot load certificate {certificate} with key {key}: "
                             f"{mismatch(certificate, key) or _reason(exc)}") from None
    try:
        ctx.load_verify_locations(cafile=str(ca))
    except (OSError, ssl.SSLError) as exc:
        raise TLSConfigError(f"cannot load CA {ca}: {_reason(exc)}") from None
    if crl is not None:
        load_crls(ctx, crl)
        ctx.verify_flags |= ssl.VERIFY_CRL_CHECK_LEAF
    return ctx


def check_key_private(key: Path) -> None:
    """Refuse a key file that group or others may access, as sshd does, with the fix.

    Checked on the file the path leads to (symlinks followed), at start and on each
    reload; any group or other permission bit counts (a key others may write is as
    bad as one they may read).
    """
    try:
        mode = os.stat(key).st_mode
    except OSError as exc:
        raise TLSConfigError(f"cannot load key {key}: {_reason(exc)}") from None
    if stat.S_ISREG(mode) and mode & 0o077:
        raise TLSConfigError(
            f"permissions {stat.S_IMODE(mode):04o} for server key {key} are too open "
            f"(group or others may access it): run chmod 600 {key}")


def load_crls(ctx: ssl.SSLContext, crl: Path) -> None:
    """Load the CRLs of ``crl`` into ``ctx``, refusing a file that holds anything else.

    ``load_verify_locations(cafile=)`` is the only way ``ssl`` loads a CRL, and it
    loads certificates too (as trust anchors). So the file is read once, checked to
    hold only ``X509 CRL`` PEM blocks (at least one), and exactly those checked
    bytes are handed to OpenSSL through a memfd: a file replaced between the check
    and the load cannot slip a certificate in.
    """
    try:
        with open(crl, "rb") as f:
            data = f.read(MAX_CRL_BYTES + 1)
    except OSError as exc:
        raise TLSConfigError(f"cannot load CRL {crl}: {_reason(exc)}") from None
    if len(data) > MAX_CRL_BYTES:
        raise TLSConfigError(f"cannot load CRL {crl}: larger than {MAX_CRL_BYTES >> 20} MiB")
    labels = [m.group(1).decode("ascii", "replace") for m in _PEM_BEGIN.finditer(data)]
    others = sorted({label for label in labels if label != CRL_LABEL})
    if others or len(labels) != len(_ANY_BEGIN.findall(data)):
        if not others:
            held = "a BEGIN line that is not a whole PEM header"
        elif certs := [label for label in others if "CERTIFICATE" in label]:
            held = f"a certificate (BEGIN {certs[0]})"
        else:
            held = f"something other than CRLs (BEGIN {others[0]})"
        raise TLSConfigError(
            f"cannot load CRL {crl}: it holds {held}; a CRL file may only hold "
            f"CRLs (BEGIN {CRL_LABEL}), so that it can only ever revoke")
    if not labels:
        raise TLSConfigError(f"cannot load CRL {crl}: no CRL in it "
                             f"(expected PEM blocks BEGIN {CRL_LABEL})")
    fd = os.memfd_create("jobd-crl", os.MFD_CLOEXEC)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]
        ctx.load_verify_locations(cafile=f"/proc/self/fd/{fd}")
    except (OSError, ssl.SSLError) as exc:
        raise TLSConfigError(f"cannot load CRL {crl}: {_reason(exc)}") from None
    finally:
        os.close(fd)


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
