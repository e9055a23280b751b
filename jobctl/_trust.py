"""Trust on first use: pin a server's certificate when no CA is configured.

Theory of operation
-------------------
With no CA (no ``-C``, no ``JOBCTL_CA``, no default ``ca.pem``), jobctl cannot
verify the server's certificate against anything, so it does what ssh does
with host keys. The TLS context asks for the server's certificate but does
not verify it (``CERT_NONE``, no host name check); instead, right after the
handshake and before a single byte of the protocol is sent (not even the
hello), :meth:`Pinning.check` compares the certificate's SHA-256 fingerprint
with the pin recorded for that address and port in ``known_servers``:

- the same: go on;
- a different one: refuse loudly (exit 3), with both fingerprints and the
  file and line of the pin, and never replace the pin;
- none yet: with ``--trust-on-first-use``, record it (and say so on stderr);
  on a terminal, the command line asks first (:class:`UnknownServer`
  carries the fingerprint) and connects again once the pin is recorded;
  otherwise refuse (exit 3), explaining.

The client certificate is still sent and still required by the server: TOFU
replaces only the CA's verification of the server.

``known_servers`` has one pin per line, ``[ADDRESS]:PORT SHA256-FINGERPRINT``,
blank lines and ``#`` comments allowed. The address is the one given to
jobctl (lowercased), as ssh keys known_hosts by the name typed.
"""

from __future__ import annotations

import hashlib
import os
import ssl
import sys
from pathlib import Path

from ._core import load_client_certificate
from ._errors import ConfigError, ConnectionFailed

#: A known_servers file larger than this is not one (and is not read whole).
MAX_FILE = 4 * 1024 * 1024


def default_path() -> Path:
    base = os.environ.get("XDG_CONFIG_HOME") or str(Path.home() / ".config")
    return Path(base) / "jobctl" / "known_servers"


def fingerprint(der: bytes) -> str:
    """SHA-256 of the DER certificate, as ``openssl x509 -noout -fingerprint -sha256``."""
    return ":".join(f"{b:02X}" for b in hashlib.sha256(der).digest())


def server_key(address: str, port: int) -> str:
    return f"[{address.lower()}]:{port}"


class UnknownServer(ConnectionFailed):
    """No pin for this server yet, and nobody said to trust it on first use."""

    def __init__(self, message: str, pinning: Pinning, fingerprint: str):
        super().__init__(message)
        self.pinning = pinning
        self.fingerprint = fingerprint


class PinMismatch(ConnectionFailed):
    """The server shows another certificate than the one pinned for it."""


class Pinning:
    """The pin check for one server (``address``, ``port``) in ``path``."""

    def __init__(self, address: str, port: int, *, accept_new: bool = False,
                 path: Path | None = None):
        self.address = address
        self.port = port
        self.accept_new = accept_new
        self.path = path if path is not None else default_path()
        self.key = server_key(address, port)

    def context(self, certificate: str | os.PathLike[str], key: str | os.PathLike[str]
                ) -> ssl.SSLContext:
        """TLS 1.3, the client certificate loaded, the server's checked by :meth:`check`."""
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        ctx.minimum_version = ssl.TLSVersion.TLSv1_3
        ctx.check_hostname = False  # the pin is per address and port, not per name
        ctx.verify_mode = ssl.CERT_NONE  # replaced by check(), before any request
        load_client_certificate(ctx, certificate, key)
        return ctx

    def lookup(self) -> tuple[str, int] | None:
        """The pinned fingerprint and its line number, if any."""
        try:
            with open(self.path, "rb") as f:
                data = f.read(MAX_FILE + 1)
        except FileNotFoundError:
            return None
        except OSError as exc:
            raise ConfigError(f"cannot read {self.path}: {exc.strerror or exc}") from None
        if len(data) > MAX_FILE:
            raise ConfigError(f"{self.path} is larger than {MAX_FILE} bytes")
        for number, raw in enumerate(data.decode(errors="replace").splitlines(), 1):
            words = raw.split("#", 1)[0].split()
            if len(words) >= 2 and words[0].lower() == self.key:
                return words[1].upper(), number
        return None

    def record(self, fp: str) -> int:
        """Append the pin; return its line number."""
        self.path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        line = f"{self.key} {fp}\n".encode()
        try:
            fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW,
                         0o600)
            try:
                os.write(fd, line)  # one write with O_APPEND: concurrent pins never interleave
            finally:
                os.close(fd)
        except OSError as exc:
            raise ConfigError(f"cannot record the pin in {self.path}: "
                              f"{exc.strerror or exc}") from None
        found = self.lookup()
        return found[1] if found else 0

    def check(self, der: bytes | None) -> None:
        """Accept the server's certificate or raise (exit 3). Runs before any request."""
        if not der:
            raise ConnectionFailed(f"server {self.key} showed no certificate")
        fp = fingerprint(der)
        found = self.lookup()
        if found is not None:
            pinned, line = found
            if pinned == fp:
                return
            raise PinMismatch(
                f"@@@ WARNING: THE CERTIFICATE OF SERVER {self.key} HAS CHANGED @@@\n"
                "Someone could be intercepting this connection (man in the middle), or the\n"
                "server was given a new certificate. Nothing was sent to it.\n"
                f"  pinned:  SHA256 {pinned}\n"
                f"  offered: SHA256 {fp}\n"
                f"The pin is {self.path}:{line}. If you know the change is expected, remove "
                "that line and connect again.")
        if self.accept_new:
            line = self.record(fp)
            print(f"jobctl: trusting server {self.key} on first use: SHA256 {fp} "
                  f"(pinned in {self.path}:{line})", file=sys.stderr)
            return
        raise UnknownServer(
            f"server {self.key} is not known (no CA certificate: -C/--certificate-authority, "
            f"JOBCTL_CA or {self.path.parent}/ca.pem; no pin in {self.path}): its "
            f"certificate's SHA256 fingerprint is {fp}; if that is the server's, connect "
            "again with --trust-on-first-use",
            self, fp)


def ask(exc: UnknownServer) -> bool:
    """On a terminal: show the fingerprint and ask, as ssh does; record the pin on yes."""
    pin = exc.pinning
    sys.stderr.write(
        f"The authenticity of server {pin.key} can't be established (no CA configured).\n"
        f"Its certificate's SHA256 fingerprint is {exc.fingerprint}.\n"
        "Are you sure you want to trust it and continue connecting (yes/no)? ")
    sys.stderr.flush()
    answer = sys.stdin.readline().strip().lower()
    if answer not in ("yes", "y"):
        return False
    line = pin.record(exc.fingerprint)
    print(f"jobctl: pinned server {pin.key} in {pin.path}:{line}", file=sys.stderr)
    return True


def interactive() -> bool:
    return sys.stdin.isatty() and sys.stderr.isatty()
