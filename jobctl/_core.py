"""What the blocking and the async client share: TLS setup and the rules for
reading the server's answers. No IO here: each client only moves bytes."""

from __future__ import annotations

import math
import os
import re
import socket
import ssl
import sys
import time
from collections.abc import Callable, Mapping, Sequence

import protocol as p
from protocol._x509 import SERVER_AUTH, allows

from ._errors import (
    ConfigError,
    ConnectionFailed,
    InvalidArgument,
    ServerError,
    ServerRefused,
    server_error,
)

SOFTWARE = "jobctl 0.1.0"
DEFAULT_PORT = 8000
DEFAULT_ADDRESS = "localhost"
#: How long a connection attempt, handshake and welcome may take.
CONNECT_TIMEOUT = 10.0
#: How long an ordinary request (start, status, list, delete) may wait for its answer.
REQUEST_TIMEOUT = 60.0
#: A stop waits for the job's whole stop sequence (three steps of the server's
#: grace, 2 s by default, plus cleanup); this bounds the wait when the grace is
#: the server's own.
STOP_TIMEOUT = 300.0
#: Bytes asked of the socket per read. A TLS read returns at most one record
#: (16 KiB), and ssl's read allocates what is asked before it shrinks it to
#: what came: asking for much more only costs memory traffic.
RECEIVE_SIZE = 64 * 1024
#: Liveness (issue 21): a server that is stopped (SIGSTOP, a hung host) or whose
#: network path is gone (no FIN, no RST) is noticed within this many seconds
#: while a request is in progress. Three means, each bounded by it: the server's
#: ``tick`` frames (asked for in the hello, every third of it), TCP keepalive
#: (idle connections), TCP_USER_TIMEOUT (data we sent that is never
#: acknowledged). docs/protocol.md, section 4, ``tick``.
LIVENESS_TIMEOUT = 30.0
#: TCP keepalive without a liveness timeout: a server that vanished without a
#: FIN is noticed in ~1 minute.
KEEPALIVE = (30, 10, 3)

#: A W3C Trace Context traceparent: version, trace ID, parent span ID, flags
#: (lower-case hex; a later version may append fields). Version ff is invalid.
TRACEPARENT = re.compile(r"(?!ff)[0-9a-f]{2}-[0-9a-f]{32}-[0-9a-f]{16}-[0-9a-f]{2}(-[^\s]*)?")
#: The longest any request waits for its answer, whatever the grace asked for:
#: a week is "forever" for a person, and stays within what a socket timeout
#: and a Trio deadline can express.
MAX_TIMEOUT = 7 * 86400.0

TYPE_CHECKING = False  # typing is not imported at run time (issue 26: start-up)
if TYPE_CHECKING:
    from typing import Any, TypeVar

    R = TypeVar("R")
    M = TypeVar("M", bound=p.Message)
#: A command line as the clients take it: bytes, or str encoded as the OS does.
Argv = Sequence[bytes | str]
#: An environment as the clients take it: names and values as bytes or str.
Env = Mapping[bytes, bytes] | Mapping[str, str] | Mapping[bytes | str, bytes | str]
#: Labels as the clients take them: a mapping, or (key, value) pairs.
LabelsArg = Mapping[str, str] | Sequence[tuple[str, str]] | None


#: The protocol minor version that brought list filters, counts and prune.
LIST_FILTERS_MINOR = 1
#: The protocol minor version that brought labels and rerun (issue 23).
LABELS_MINOR = 2
#: The protocol minor version that brought interactive jobs (stdin, tty, attach).
INTERACTIVE_MINOR = 2
#: What a stream or output answer yields: chunks (resizes too, when asked for:
#: protocol 1.2), then its End.
StreamEvent = p.OutputChunk | p.Resized | p.End


def require_minor(welcome: p.Welcome, minor: int, what: str) -> None:
    """Refuse locally what the server's protocol version does not know (it would
    ignore new fields, or refuse a new message as a protocol error)."""
    if welcome.minor < minor:
        raise ConfigError(f"the server does not support {what}: it speaks protocol "
                          f"{welcome.version}.{welcome.minor}, {what} needs "
                          f"{p.PROTOCOL_VERSION}.{minor} (a newer jobd)")


def message(kind: Callable[..., M], *args: Any, **kwargs: Any) -> M:
    """``kind(*args, **kwargs)``, a request; a value it refuses is InvalidArgument."""
    try:
        return kind(*args, **kwargs)
    except (p.FieldError, TypeError, ValueError) as exc:
        raise InvalidArgument(f"invalid argument: {exc}") from None


def _encode(what: str, value: object) -> bytes:
    if not isinstance(value, bytes | str):
        raise InvalidArgument(f"invalid argument: {what} must be bytes or str, "
                              f"not {type(value).__name__}")
    try:
        return os.fsencode(value)
    except UnicodeError:
        raise InvalidArgument(f"invalid argument: {what} {value!r} cannot be encoded") from None


def labels_arg(labels: Mapping[str, str] | Sequence[tuple[str, str]] | None,
               welcome: p.Welcome) -> tuple[tuple[str, str], ...]:
    """Labels as the protocol takes them, for a server that knows them (1.2)."""
    if not labels:
        return ()
    require_minor(welcome, LABELS_MINOR, "labels")
    items = tuple(labels.items()) if isinstance(labels, Mapping) else tuple(labels)
    try:
        return p.check_labels("labels", items)
    except p.FieldError as exc:
        raise InvalidArgument(f"invalid argument: {exc}") from None


def start_request(argv: Argv, cwd: bytes | str | None, env: Env | None,
                  limits: p.Limits | None, env_merge: bool = False, *,
                  stdin: bool = False, tty: p.Terminal | None = None,
                  labels: tuple[tuple[str, str], ...] = ()) -> p.Start:
    """The start message both clients send: str arguments, cwd, env names and
    values encoded as the OS does (``os.fsencode``)."""
    if isinstance(argv, bytes | str):
        raise InvalidArgument("invalid argument: argv must be a sequence of arguments, "
                              "not a single string")
    return message(p.Start, argv=tuple(_encode("argv entry", a) for a in argv),
                   cwd=_encode("cwd", cwd) if cwd is not None else None,
                   env=tuple((_encode("env name", k), _encode("env value", v))
                             for k, v in env.items()) if env is not None else None,
                   limits=limits, env_merge=env_merge, traceparent=current_traceparent(),
                   stdin=stdin, tty=tty, labels=labels)


def check_interactive(welcome: p.Welcome, stdin: bool, tty: p.Terminal | None) -> None:
    """A start with stdin or a terminal needs a server of protocol 1.2: an older
    one would ignore the fields and start the job with /dev/null."""
    if stdin or tty is not None:
        require_minor(welcome, INTERACTIVE_MINOR, "interactive jobs (stdin, a terminal)")


def stop_request(job: int, grace: float | None) -> p.Stop:
    """The stop message both clients send."""
    return message(p.Stop, job, grace, traceparent=current_traceparent())


def current_traceparent() -> str | None:
    """The caller's trace context, as a W3C ``traceparent``, for start and stop requests.

    The current OpenTelemetry span, if the program uses OpenTelemetry and a span
    is current; else ``$TRACEPARENT``, the context a parent process hands to its
    children (how a traced shell script reaches ``jobctl``); else None.

    OpenTelemetry is never imported here: a program that has not imported it
    has no span, so looking in ``sys.modules`` is enough, and jobctl's start-up
    stays free of it.
    """
    trace = sys.modules.get("opentelemetry.trace")
    if trace is not None:
        try:
            ctx = trace.get_current_span().get_span_context()
            if ctx.is_valid:
                return f"00-{ctx.trace_id:032x}-{ctx.span_id:016x}-{int(ctx.trace_flags):02x}"
        except Exception:  # a broken tracing setup must never fail a request
            pass
    value = os.environ.get("TRACEPARENT", "")
    return value if TRACEPARENT.fullmatch(value) and len(value) <= p.MAX_TRACEPARENT else None


def write_all(fd: int, data: bytes | bytearray | memoryview) -> None:
    """Write all of ``data`` to ``fd``."""
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]


def write_chunk(chunk: p.OutputChunk) -> None:
    """Write a chunk to this process's stdout or stderr (its fd), all of it."""
    write_all(chunk.fd, chunk.data)


def check_merge(env_merge: bool, welcome: p.Welcome) -> bool:
    """``env_merge``, if this server understands it (protocol 1.1): an older one
    would take the variables as the whole environment."""
    if env_merge and welcome.minor < 1:
        raise InvalidArgument(f"the server ({welcome.software}, protocol "
                              f"{welcome.version}.{welcome.minor}) cannot add variables to "
                              "its environment for jobs: give the whole environment")
    return env_merge


def stop_timeout(grace: float | None) -> float:
    """How long a stop may wait for its answer: the job's whole stop sequence."""
    if grace is None:
        return STOP_TIMEOUT
    return min(3 * grace + REQUEST_TIMEOUT, MAX_TIMEOUT)


def exit_status(status: p.JobStatus) -> int:
    """A job's status as a shell's exit status (what ``jobctl run`` and ``wait``
    exit with, SPEC §9): its exit code; 128+N when a signal N ended it; 1 when
    it never ran (or was lost); 0 while it runs."""
    if status.state is p.JobState.RUNNING:
        return 0
    if status.signal is not None:
        import signal

        try:
            return 128 + signal.Signals[status.signal].value
        except KeyError:
            return 1  # a signal this system does not know: failed, as far as we can tell
    if status.exit_code is not None:
        return status.exit_code
    return 1


def format_address(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def load_client_certificate(ctx: ssl.SSLContext, certificate: str | os.PathLike[str],
                            key: str | os.PathLike[str]) -> None:
    """Load the client's certificate and key into ``ctx``; a clear ConfigError if
    either is missing or they do not load."""
    for what, path in (("certificate", certificate), ("key", key)):
        if not os.path.isfile(path):
            raise ConfigError(f"cannot read {what} {os.fspath(path)}: no such file")
    try:
        ctx.load_cert_chain(certificate, key)
    except (OSError, ssl.SSLError) as exc:
        from protocol._pem import mismatch

        raise ConfigError(f"cannot load certificate {os.fspath(certificate)} "
                          f"with key {os.fspath(key)}: "
                          f"{mismatch(certificate, key) or tls_reason(exc)}") from None
    check_own_dates(certificate)


def check_own_dates(certificate: str | os.PathLike[str], now: float | None = None) -> None:
    """Refuse, before connecting, a client certificate outside its dates: the server
    would refuse it with an alert that names the cause poorly (a not-yet-valid one
    gets "bad certificate"). Exit status 3, as the server's refusal was."""
    from protocol._x509 import pem_validity, utc

    dates = pem_validity(certificate)
    if dates is None:
        return
    now = time.time() if now is None else now
    not_before, not_after = dates
    if now < not_before:
        raise ConnectionFailed(f"your certificate {os.fspath(certificate)} is not valid until "
                               f"{utc(not_before)} (is this machine's clock right?)")
    if now > not_after:
        raise ConnectionFailed(f"your certificate {os.fspath(certificate)} expired on "
                               f"{utc(not_after)}: renew it (jobctl cert renew "
                               f"{os.fspath(certificate)}) and have the request signed")


def client_context(certificate: str | os.PathLike[str], key: str | os.PathLike[str],
                   ca: str | os.PathLike[str]) -> ssl.SSLContext:
    """TLS 1.3 only, the server verified against ``ca`` and its name checked."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)  # check_hostname and CERT_REQUIRED
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    # A host name is matched against subjectAltName only, never the subject's CN.
    ctx.hostname_checks_common_name = False
    if not os.path.isfile(ca):
        raise ConfigError(f"cannot read CA certificate {os.fspath(ca)}: no such file")
    load_client_certificate(ctx, certificate, key)
    try:
        ctx.load_verify_locations(cafile=ca)
    except (OSError, ssl.SSLError) as exc:
        raise ConfigError(f"cannot load CA certificate {os.fspath(ca)}: "
                          f"{tls_reason(exc)}") from None
    return ctx


def check_server_purpose(der: bytes | None) -> None:
    """Require the serverAuth EKU on the server's certificate, after the handshake.

    OpenSSL refuses a server certificate whose EKU lists other purposes only, but
    takes one without the extension for any purpose: then a client certificate
    of the same CA could pose as the server.
    """
    if not allows(der, SERVER_AUTH):
        raise ConnectionFailed("TLS handshake failed: the server certificate is not for "
                               "server authentication (no serverAuth extended key usage)")


def host_name(name: str) -> str | bytes:
    """A host name or address as ``getaddrinfo`` and ``wrap_socket`` take it.

    An ASCII name goes as bytes: the ``idna`` codec they apply to a str would
    leave it unchanged, and importing that codec (with ``stringprep``) costs
    every run of jobctl 1.5 ms.
    """
    return name.encode("ascii") if name.isascii() else name


def tls_reason(exc: BaseException) -> str:
    if isinstance(exc, ssl.SSLCertVerificationError):
        return f"certificate verify failed ({exc.verify_message})"
    if isinstance(exc, ssl.SSLError) and exc.reason:
        return str(exc.reason).lower().replace("_", " ")
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror.lower()
    return str(exc) or type(exc).__name__


def connect_error(address: str, port: int, exc: BaseException) -> ConnectionFailed:
    where = format_address(address, port)
    if isinstance(exc, socket.gaierror):
        return ConnectionFailed(f"cannot connect to {where}: cannot resolve {address}")
    if isinstance(exc, TimeoutError):
        return ConnectionFailed(f"cannot connect to {where}: timed out")
    return ConnectionFailed(f"cannot connect to {where}: {tls_reason(exc)}")


def handshake_error(exc: BaseException) -> ConnectionFailed:
    return ConnectionFailed(f"TLS handshake failed: {tls_reason(exc)}")


#: What each alert a server sends about the client's certificate means. OpenSSL
#: answers a revoked certificate with "certificate revoked", an expired one (or an
#: expired CRL on the server) with "certificate expired", a not-yet-valid or
#: malformed one with "bad certificate", a CA it does not trust with "unknown ca".
ALERT_HINTS = {
    "unknown ca": "is the client certificate issued by the server's CA?",
    "certificate revoked": "the client certificate was revoked: ask the CA for a new one",
    "certificate expired": "the client certificate has expired, or the server's CRL has: "
                           "renew it, or tell the server's operator",
    "bad certificate": "the server cannot use the client certificate: not yet valid by "
                       "its clock, or malformed?",
    "certificate required": "no client certificate was sent",
    "unsupported certificate": "the client certificate is not for client authentication",
    "decrypt error": "the client certificate does not match its key, or is forged?",
}
ALERT_HINT_DEFAULT = "is the client certificate valid and issued by the server's CA?"


def refused_before_welcome(exc: BaseException | None) -> ServerRefused:
    """The server closed or alerted after the TLS 1.3 handshake, before its welcome.

    In TLS 1.3 the client's handshake completes before the server has checked
    the client's certificate: a rejected certificate shows up here, as an
    alert or a bare EOF on the first read.
    """
    if isinstance(exc, ssl.SSLError) and exc.reason:
        alert = str(exc.reason).lower().replace("_", " ")
        for prefix in ("sslv3 alert ", "tlsv13 alert ", "tlsv1 alert "):
            alert = alert.replace(prefix, "")
        hint = ALERT_HINTS.get(alert, ALERT_HINT_DEFAULT)
        return ServerRefused(f"server refused the connection: TLS alert: {alert} ({hint})")
    return ServerRefused("server refused the connection: it closed before its welcome "
                         "(client certificate rejected?)")


def check_liveness(liveness: float | None) -> float | None:
    """A liveness timeout as the clients take it: None or 0 turns it off."""
    if liveness is None or liveness == 0:
        return None
    if not (isinstance(liveness, int | float) and math.isfinite(liveness)
            and 0 < liveness <= MAX_TIMEOUT):
        raise InvalidArgument(f"invalid argument: liveness_timeout must be a number of "
                              f"seconds in (0, {MAX_TIMEOUT:g}], or None, not {liveness!r}")
    return float(liveness)


def hello(liveness: float | None) -> p.Hello:
    """The client's hello; with a liveness timeout, asking for ticks every third of it."""
    if liveness is None:
        return p.Hello(software=SOFTWARE)
    return p.Hello(software=SOFTWARE,
                   tick_interval=min(liveness / 3, p.MAX_TICK_INTERVAL))


def idle_timeout(welcome: p.Welcome, liveness: float | None) -> float | None:
    """How long a client waits for the next bytes while a request is in progress,
    before it calls the server gone: the liveness timeout, if the server ticks
    (and at least two of its ticks); None if it does not (an older server)."""
    if liveness is None or welcome.tick_interval is None:
        return None
    return max(liveness, 2 * welcome.tick_interval)


def silent(idle: float) -> ConnectionFailed:
    return ConnectionFailed(f"connection lost: the server sent nothing for {idle:g}s "
                            "(is it stopped, or the network path gone?)")


def set_keepalive(sock: Any, liveness: float | None = None) -> None:
    """TCP keepalive, TCP_USER_TIMEOUT and TCP_NODELAY.

    With a liveness timeout T, keepalive probes start after T/3 idle, every T/6,
    four of them (a dead path is noticed within T), and data we sent that is not
    acknowledged within T breaks the connection (TCP_USER_TIMEOUT: keepalive
    does not probe while data is in flight). Without one, KEEPALIVE.

    Without TCP_NODELAY, the hello that follows the client's last handshake
    flight waits for that flight's ACK (Nagle), which the server delays by
    40 ms because it has nothing to send until the hello arrives: every
    connection would take 40 ms longer than its handshake.
    """
    if liveness is None:
        idle, interval, count = KEEPALIVE
    else:
        idle, interval, count = max(1, int(liveness / 3)), max(1, int(liveness / 6)), 4
    try:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE, idle)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPINTVL, interval)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPCNT, count)
        if liveness is not None:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_USER_TIMEOUT,
                            max(1, int(liveness * 1000)))
    except (OSError, AttributeError):
        pass


def check_welcome(event: Any) -> p.Welcome:
    if isinstance(event, p.Welcome):
        return event
    if isinstance(event, p.Error):
        raise ServerRefused(f"server refused the connection: {event.message}", event.code)
    raise refused_before_welcome(None)


def expect(event: Any, kind: type[R]) -> R:
    """The answer to a request: ``kind``, or the server's error raised."""
    if isinstance(event, kind):
        return event
    if isinstance(event, p.Error):
        raise server_error(event.code, event.message)
    if event is p.CLOSED:
        raise ConnectionFailed("connection closed by the server")
    raise ConnectionFailed(f"unexpected answer from the server: {type(event).__name__}")


def lost(exc: BaseException) -> ConnectionFailed:
    if isinstance(exc, p.ProtocolError):
        return ConnectionFailed(f"protocol error: {exc}")
    return ConnectionFailed(f"connection lost: {tls_reason(exc)}")


# -- reconnecting (issue 21) ---------------------------------------------------------

#: How long ``run``, ``stream`` and ``wait`` keep trying to get a broken connection
#: back, by default (``--reconnect-timeout``): long enough for a jobd restart or a
#: network hiccup, short enough that a script learns of a real outage.
RECONNECT_TIMEOUT = 300.0
#: The pause before the first attempt to reconnect, doubled after each failure up to
#: BACKOFF_MAX; each pause is drawn between half and all of it (jitter), so that
#: many clients cut off at once do not come back at once.
BACKOFF_FIRST = 0.25
BACKOFF_MAX = 5.0


def check_reconnect(timeout: float | None) -> float | None:
    """A reconnect timeout as the clients take it: None or 0 turns reconnecting off."""
    if timeout is None or timeout == 0:
        return None
    if not (isinstance(timeout, int | float) and math.isfinite(timeout)
            and 0 < timeout <= MAX_TIMEOUT):
        raise InvalidArgument(f"invalid argument: reconnect must be a number of seconds "
                              f"in (0, {MAX_TIMEOUT:g}], or None, not {timeout!r}")
    return float(timeout)


def retriable(exc: BaseException) -> bool:
    """Whether a failure may go away by itself: the connection broke or could not be
    made (the server restarts, the network comes back), or the server said it is
    busy or unavailable. Not a refused certificate, a missing job or a bad request."""
    if isinstance(exc, ServerRefused):
        return exc.code in (p.ErrorCode.UNAVAILABLE, p.ErrorCode.LIMIT_EXCEEDED)
    if isinstance(exc, ConnectionFailed):
        return True
    return isinstance(exc, ServerError) and exc.code is p.ErrorCode.UNAVAILABLE


class Outage:
    """The policy of one follow that reconnects: when to try again, when to give up.

    ``lost(exc, now, heard)`` after each failure: the pause before the next
    attempt, or the failure raised (not retriable, or ``timeout`` seconds have
    passed since the connection broke and the server was not heard from since).
    ``progress()`` whenever the server answered: the next break starts a new
    outage. No IO and no clock of its own: both clients drive it.
    """

    def __init__(self, timeout: float) -> None:
        self.timeout = timeout
        self.since: float | None = None
        self.attempts = 0
        self._pause = BACKOFF_FIRST

    def progress(self) -> None:
        self.since = None
        self.attempts = 0
        self._pause = BACKOFF_FIRST

    def lost(self, exc: BaseException, now: float, heard: float | None = None) -> float:
        """``heard``: when the server last sent anything; after the outage began,
        the connection had come back, and this is a new outage."""
        if not retriable(exc):
            raise exc
        if self.since is None or (heard is not None and heard > self.since):
            self.progress()
            self.since = now
        left = self.since + self.timeout - now
        if left <= 0:
            raise ConnectionFailed(f"{exc} (gave up reconnecting after "
                                   f"{self.timeout:g}s)") from None
        self.attempts += 1
        import random  # only a reconnect needs it (issue 26: start-up)

        pause = self._pause * (0.5 + random.random() / 2)
        self._pause = min(2 * self._pause, BACKOFF_MAX)
        return min(pause, left)
