"""The TLS server: accepts connections, authenticates them, answers requests.

Theory of operation
-------------------

``serve()`` owns three things, nested so that shutdown runs inside out:
the job manager (its nursery owns every job: jobs outlive connections), the
handler nursery (one task per connection), and the accept loop.

Each connection is a :class:`_Session`. The TLS handshake and the client's
hello share one deadline (``--handshake-timeout``). The peer's verified
certificate names the caller (CN) and the role (OU); a certificate without
exactly one role is answered with an error frame instead of the welcome.

After the welcome a session runs two tasks. The *reader* owns the receive
side of the TLS stream: it feeds bytes to the sans-IO
:class:`protocol.ServerConnection` and hands each request to the *responder*
through a channel of size 1. Because the reader keeps reading while a stream
response is being written, a client that goes away is noticed at once, even
when the job is silent: the reader cancels the response in flight. Bytes that
arrive while a response is under way are a protocol error (one request at a
time), answered with an error frame before the connection closes.

Writes go through ``_send`` behind one lock. A slow reader on the other end
makes only its own ``send_all`` wait; the job's output keeps going to disk and
other followers read the log at their own pace.

Shutdown (SIGTERM/SIGINT, :meth:`Server.request_shutdown`): the listeners
close, the manager stops every job with the stop sequence, every follower
ends so every open stream gets its end frame with the final status, the
handlers get a moment to flush, and then everything is cancelled.
"""

from __future__ import annotations

import contextlib
import errno
import math
import os
import resource
import shlex
import socket
import ssl
import time
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import trio

import protocol as p
from jobd import __version__
from jobd._admission import (
    FD_RESERVE,
    Admission,
    Limits,
    Ticket,
    connection_limit,
    descriptors_in_use,
    nofile_soft_limit,
)
from jobd._auth import (
    POLICY,
    Action,
    Identity,
    IdentityError,
    Role,
    Scope,
    check_client_purpose,
    identity_from_cert,
)
from jobd._config import ServerConfig
from jobd._expiry import expiry_warnings
from jobd._log import EventLog, route_engine_logs
from jobd._telemetry import NULL, Telemetry
from jobd._tls import TLSConfigError, describe_tls_error, make_server_context
from jobd.engine import (
    BadLimits,
    BadPosition,
    EngineConfig,
    EngineError,
    InvalidState,
    JobManager,
    JobNotFound,
    LimitExceeded,
    LimitPolicy,
    Unenforceable,
    open_job_manager,
)

SOFTWARE = f"jobd {__version__}"
#: Bytes asked of the TLS stream per read: one TLS record is at most 16 KiB.
RECEIVE_SIZE = 64 * 1024
#: Target size of one page of a list response, well under the frame limit
#: (statuses are sized by their real encoding; the first always goes in).
LIST_PAGE_BYTES = 256 * 1024
#: Most jobs read from the database for one list page: a bound on one page's work
#: (each row costs about 30 us to decode and check, plus its share of the frame),
#: so that a page stays well under 20 ms (bench/README.md, *History*).
LIST_PAGE_ROWS = 200
#: A status larger than this cannot come from a request this jobd accepts (the
#: request bounds of protocol/_bounds.py keep every status under ~410 KiB): it
#: is a record an older jobd stored. ``list`` shows it shortened
#: (:func:`_shortened`) rather than fail for everyone.
LIST_ENTRY_MAX = p.MAX_FRAME_SIZE // 2
#: How much of a shortened status's argv ``list`` shows: entries and bytes.
SHORT_ARGV = (64, 4096)
#: How long a connection closing (close_notify, error frame) may take.
CLOSE_TIMEOUT = 2.0
#: After the jobs are stopped at shutdown, open streams get this long to
#: write their end frames before the handlers are cancelled.
SHUTDOWN_FLUSH_TIMEOUT = 5.0
#: accept() failing for want of descriptors (or kernel memory): jobd waits this
#: long before it tries again, doubling up to ACCEPT_BACKOFF_MAX, and logs the
#: pause once. A retry cannot wait for "a descriptor was freed" (any close in the
#: process frees one), so it backs off as trio's serve_listeners does, quietly.
ACCEPT_BACKOFF_MIN = 0.05
ACCEPT_BACKOFF_MAX = 1.0
#: At most one accept-paused line per this many seconds (see _accept_loop).
ACCEPT_PAUSE_LOG_INTERVAL = 60.0
ACCEPT_RESOURCE_ERRNOS = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM})
#: TCP keepalive: a peer that vanished without a FIN is noticed in ~1 minute.
KEEPALIVE = (30, 10, 3)  # idle seconds, interval seconds, probes


#: Variables systemd hands to jobd itself; a job must not inherit them (a job
#: writing to NOTIFY_SOCKET could claim to be the daemon).
DAEMON_ONLY_ENV = frozenset({b"NOTIFY_SOCKET", b"LISTEN_FDS", b"LISTEN_PID", b"LISTEN_FDNAMES",
                             b"WATCHDOG_USEC", b"WATCHDOG_PID"})


def job_environment() -> dict[bytes, bytes]:
    """The environment a job gets when its start request names none: jobd's own,
    less what belongs to the daemon alone."""
    return {k: v for k, v in os.environb.items() if k not in DAEMON_ONLY_ENV}


class Denied(Exception):
    """The caller's role does not allow the request."""


@dataclass
class Server:
    """What ``serve`` reports through ``task_status.started()``."""

    addresses: list[tuple[str, int]]
    manager: JobManager
    _shutdown: trio.Event = field(default_factory=trio.Event)
    _reload: Callable[[], bool] | None = None

    @property
    def port(self) -> int:
        return self.addresses[0][1]

    def request_shutdown(self) -> None:
        self._shutdown.set()

    def reload_tls(self) -> bool:
        """Reload certificate, key, CA and CRL for new connections (SIGHUP)."""
        return self._reload() if self._reload is not None else False


def format_address(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


async def _open_listeners(address: str, port: int) -> list[trio.SocketListener]:
    """Bind every address ``address`` resolves to, all on one port.

    With port 0 the OS picks a port for the first address and the others
    reuse it, so "localhost" means one port on 127.0.0.1 and ::1 alike.
    """
    infos = await trio.socket.getaddrinfo(address or None, port, type=socket.SOCK_STREAM,
                                          flags=socket.AI_PASSIVE)
    listeners: list[trio.SocketListener] = []
    seen: set[tuple[Any, ...]] = set()
    try:
        for family, type_, proto, _, sockaddr in infos:
            if (family, sockaddr[0]) in seen:
                continue
            seen.add((family, sockaddr[0]))
            sock = trio.socket.socket(family, type_, proto)
            try:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                if family == socket.AF_INET6:
                    # "::" alone also serves IPv4 (dual stack); beside an IPv4
                    # address of the same name each socket keeps to its family.
                    v6only = any(info[0] == socket.AF_INET for info in infos)
                    sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, int(v6only))
                if port == 0 and listeners:
                    sockaddr = (sockaddr[0], listeners[0].socket.getsockname()[1], *sockaddr[2:])
                await sock.bind(sockaddr)
                sock.listen(socket.SOMAXCONN)
            except BaseException:
                sock.close()
                raise
            listeners.append(trio.SocketListener(sock))
    except BaseException:
        for listener in listeners:
            listener.socket.close()
        raise
    return listeners


async def serve(
    config: ServerConfig,
    *,
    log: EventLog | None = None,
    telemetry: Telemetry = NULL,
    task_status: trio.TaskStatus[Server] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve until :meth:`Server.request_shutdown`, then shut down gracefully.

    Raises :class:`TLSConfigError` (bad certificate files) and ``OSError``
    (cannot bind) before anything is served.
    """
    log = log if log is not None else EventLog(config.log_format, config.log_level)
    route_engine_logs(log)
    tls = [make_server_context(config.certificate, config.key, config.ca, config.crl)]

    def reload() -> bool:
        try:
            tls[0] = make_server_context(config.certificate, config.key, config.ca, config.crl)
        except TLSConfigError as exc:
            log.error("reload-failed", reason=str(exc), note="old certificates stay in use")
            return False
        log.info("reloaded", certificate=str(config.certificate), ca=str(config.ca),
                 crl=str(config.crl) if config.crl else None)
        return True

    def on_job_event(kind: str, status: p.JobStatus) -> None:
        telemetry.job_event(kind, status)
        argv = shlex.join(os.fsdecode(a) for a in status.argv)
        if kind == "started":
            log.info("job-started", id=status.id, owner=status.owner, pid=status.pid, argv=argv)
        else:
            log.info(f"job-{kind}", id=status.id, owner=status.owner, status=status.describe())

    engine_config = EngineConfig(
        state_dir=config.state_dir, stop_grace=config.stop_grace,
        output_cap=config.output_cap, on_event=on_job_event,
        limits=config.limits or LimitPolicy(), cgroup_root=config.cgroup_root,
        retain=config.retain, retain_count=config.retain_count,
        max_log_space=config.max_log_space,
        max_log_space_per_user=config.max_log_space_per_user)
    async with open_job_manager(engine_config) as manager:
        listeners = await _open_listeners(config.address, config.port)
        addresses = [listener.socket.getsockname()[:2] for listener in listeners]
        server = Server(addresses=addresses, manager=manager, _reload=reload)
        state = _ServerState(config, log, manager, lambda: tls[0])
        state.telemetry = telemetry
        telemetry.watch(manager, config.state_dir)
        log.debug("admission", **vars(state.admission.limits))
        if state.max_connections < config.max_connections:
            log.warning("connection-limit-lowered", configured=config.max_connections,
                        limit=state.max_connections,
                        nofile=resource.getrlimit(resource.RLIMIT_NOFILE)[0],
                        reason="the file descriptor limit cannot hold more; "
                        "raise it (ulimit -n, LimitNOFILE=) to allow more")
        async with trio.open_nursery() as handlers:
            async with trio.open_nursery() as acceptors:
                await acceptors.start(
                    _serve_listeners, state.handle, listeners, handlers, log
                )
                acceptors.start_soon(_watch_expiry, config, log)  # issue 15
                log.info("cgroups", **manager.cgroup_layout())
                log.info("listening", address=" ".join(format_address(h, pt) for h, pt in
                                                        addresses),
                         state_dir=str(config.state_dir))
                task_status.started(server)
                await server._shutdown.wait()
                log.info("shutdown", reason="requested", running=sum(
                    1 for s in manager.running() if s.running))
                acceptors.cancel_scope.cancel()
            for listener in listeners:
                await listener.aclose()
            state.begin_closing()
            await manager.shutdown()
            with trio.move_on_after(SHUTDOWN_FLUSH_TIMEOUT) as flush:
                await state.idle()
            if flush.cancelled_caught:
                log.warning("shutdown-flush-timeout", responses=state.busy,
                            reason=f"responses still in progress after "
                            f"{SHUTDOWN_FLUSH_TIMEOUT:g}s are cut off")
            handlers.cancel_scope.cancel()
        log.info("stopped")


async def _watch_expiry(config: ServerConfig, log: EventLog) -> None:
    """Warn in the log from 14 days before the server certificate or the CA expires,
    then daily; files replaced (and reloaded) are read again at each check."""
    files = {"certificate": config.certificate, "ca": config.ca}
    while True:
        due, wake = expiry_warnings(files, time.time())
        for warning in due:
            log.warning("certificate-expiring", **warning)
        await trio.sleep(wake)


async def _serve_listeners(
    handler: Callable[[trio.SocketStream], Any],
    listeners: Sequence[trio.SocketListener],
    handler_nursery: trio.Nursery,
    log: EventLog,
    *,
    task_status: trio.TaskStatus[list[trio.SocketListener]] = trio.TASK_STATUS_IGNORED,
) -> None:
    """One accept loop per listener (trio.serve_listeners, but quiet on EMFILE)."""
    async with trio.open_nursery() as nursery:
        for listener in listeners:
            nursery.start_soon(_accept_loop, listener, handler, handler_nursery, log)
        task_status.started(list(listeners))


async def _accept_loop(listener: trio.SocketListener,
                       handler: Callable[[trio.SocketStream], Any],
                       handler_nursery: trio.Nursery, log: EventLog) -> None:
    """Accept and hand each connection to ``handler`` in ``handler_nursery``.

    Out of descriptors (EMFILE, ENFILE) or kernel memory, accept() fails at once,
    as often as it is called: trio's serve_listeners logs a traceback for each try
    (ten a second). Here a pause is one log line, the retries back off, and one
    more line says when connections are accepted again. At the edge of the limit
    accept() may fail and succeed by turns: pauses that begin within
    ACCEPT_PAUSE_LOG_INTERVAL of the last one logged are only counted, and the
    next line logged says how many there were. Connections wait in the kernel's
    backlog meanwhile.
    """
    backoff = ACCEPT_BACKOFF_MIN
    paused_by: str | None = None  # the pause under way, if any
    logged = False  # was it logged (then its end is too)
    last_logged = -math.inf
    unlogged = 0  # pauses since the last one logged
    while True:
        try:
            stream = await listener.accept()
        except OSError as exc:
            if exc.errno not in ACCEPT_RESOURCE_ERRNOS:
                raise
            if paused_by is None:
                paused_by = os.strerror(exc.errno or 0).lower()
                now = trio.current_time()
                logged = now - last_logged >= ACCEPT_PAUSE_LOG_INTERVAL
                if logged:
                    log.error("accept-paused", reason=paused_by, unlogged_pauses=unlogged or None,
                              note="connections wait in the backlog until descriptors are free")
                    last_logged, unlogged = now, 0
                else:
                    unlogged += 1
            await trio.sleep(backoff)
            backoff = min(2 * backoff, ACCEPT_BACKOFF_MAX)
            continue
        if paused_by is not None:
            if logged:
                log.info("accept-resumed", after=paused_by)
            paused_by = None
            backoff = ACCEPT_BACKOFF_MIN
        handler_nursery.start_soon(handler, stream)


class _ServerState:
    """State shared by every connection: counts, config, the current TLS context."""

    def __init__(self, config: ServerConfig, log: EventLog, manager: JobManager,
                 tls: Callable[[], ssl.SSLContext]):
        self.config = config
        self.log = log
        self.manager = manager
        self.tls = tls
        self.admission = Admission(Limits.derive(
            config.max_connections, config.admin_reserved_connections,
            config.max_connections_per_identity, config.max_handshakes_per_source))
        self.max_connections = self.admission.limits.connections
        self.busy = 0  # responses in progress
        self.closing = False
        #: Sessions waiting for the peer (hello phase, or idle between requests):
        #: at shutdown each gets ``unavailable`` "server is shutting down".
        self.waiting: set[_Session] = set()
        self.job_env = job_environment()
        self.telemetry: Telemetry = NULL
        self._idle = trio.Event()
        self._idle.set()

    def response_started(self) -> None:
        self.busy += 1
        if self._idle.is_set():
            self._idle = trio.Event()

    def response_ended(self) -> None:
        self.busy -= 1
        if self.busy == 0:
            self._idle.set()

    async def idle(self) -> None:
        await self._idle.wait()

    @contextlib.asynccontextmanager
    async def starting(self, identity: Identity) -> AsyncIterator[None]:
        """Around a start: refused when the descriptors left would eat into the
        admin's reserve (non-admin) or the last few (anyone; see jobd._admission)."""
        if nofile_soft_limit() is not None:
            in_use = await trio.to_thread.run_sync(descriptors_in_use)
            short = self.admission.descriptors_short(
                in_use, admin=identity.role is Role.ADMIN)
            if short is not None:  # logged as start-refused, as every refused start
                raise _Refusal(p.ErrorCode.UNAVAILABLE, short)
        self.admission.starts_in_progress += 1
        try:
            yield
        finally:
            self.admission.starts_in_progress -= 1

    def begin_closing(self) -> None:
        """No new requests: every session waiting for its peer is told and closed."""
        self.closing = True
        for session in list(self.waiting):
            session.interrupt_wait()

    async def handle(self, tcp: trio.SocketStream) -> None:
        try:
            host, port = tcp.socket.getpeername()[:2]
        except OSError:
            await tcp.aclose()
            return
        peer = format_address(host, port)
        ticket = Ticket(source=host)
        refused = self.admission.begin_handshake(ticket)
        if refused is not None:
            self.log.warning("connection-refused", peer=peer, reason=refused)
            self.telemetry.connection_dropped(peer, "busy", refused)
            await tcp.aclose()
            return
        _set_keepalive(tcp)
        try:
            session = _Session(self, trio.SSLStream(tcp, self.tls(), server_side=True), peer,
                               ticket)
            await session.run()
        except* Exception as group:
            # One connection must never take the daemon down: log and drop it.
            for exc in group.exceptions:
                self.log.error("connection-failed", peer=peer, reason=repr(exc))
        finally:
            self.admission.release(ticket)


def _set_keepalive(tcp: trio.SocketStream) -> None:
    with contextlib.suppress(OSError, AttributeError):
        tcp.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
        idle, interval, count = KEEPALIVE
        tcp.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE, idle)
        tcp.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPINTVL, interval)
        tcp.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPCNT, count)


class _Session:
    """One client connection: handshake, identity, then requests in sequence."""

    def __init__(self, server: _ServerState, stream: trio.SSLStream[trio.SocketStream],
                 peer: str, ticket: Ticket):
        self.server = server
        self.ticket = ticket
        self.log = server.log
        self.manager = server.manager
        self.stream = stream
        self.peer = peer
        self.conn = p.ServerConnection()
        self.identity: Identity | None = None
        self._send_lock = trio.StrictFIFOLock()
        self._response_scope: trio.CancelScope | None = None
        self._wait_scope: trio.CancelScope | None = None
        self._owes_goodbye = False
        self._streaming = False
        self.tel = server.telemetry.connection(peer)

    # -- plumbing -------------------------------------------------------------

    async def _send(self, data: bytes) -> None:
        async with self._send_lock:
            await self.stream.send_all(data)

    async def _receive_event(self) -> Any:
        """Next event from the peer (hello phase only; later the reader task does this)."""
        while True:
            event = self.conn.next_event()
            if event is not p.NEED_DATA:
                return event
            self.conn.receive_data(await self.stream.receive_some(RECEIVE_SIZE))

    async def _close(self, final: bytes = b"") -> None:
        with trio.CancelScope(shield=True), trio.move_on_after(CLOSE_TIMEOUT):
            if final:
                with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError,
                                         trio.BusyResourceError):
                    await self._send(final)
            await self.stream.aclose()

    async def _flush_tls_alert(self) -> None:
        """Send the alert OpenSSL queued when the handshake failed.

        trio's SSLStream drops it (python-trio/trio#3413), so the client would
        see a bare EOF instead of "unknown ca" or "certificate required".
        """
        outgoing = getattr(self.stream, "_outgoing", None)
        pending = outgoing.read() if isinstance(outgoing, ssl.MemoryBIO) else b""
        if pending:
            with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError, OSError):
                await self.stream.transport_stream.send_all(pending)

    @contextlib.contextmanager
    def _waiting_for_peer(self) -> Iterator[trio.CancelScope]:
        """A scope around a wait for the client's next frame that shutdown cancels."""
        with trio.CancelScope() as scope:
            self._wait_scope = scope
            self.server.waiting.add(self)
            if self.server.closing:
                self.interrupt_wait()
            try:
                yield scope
            finally:
                self.server.waiting.discard(self)
                self._wait_scope = None

    def interrupt_wait(self) -> None:
        """Shutdown: stop waiting for the peer and say goodbye. Until the session
        ends it counts as a response in progress, so that the handlers are not
        cancelled before the goodbye is sent."""
        if self._wait_scope is None:
            return
        if not self._owes_goodbye:
            self._owes_goodbye = True
            self.server.response_started()
        self._wait_scope.cancel()

    async def _refuse_shutting_down(self) -> None:
        self.log.debug("connection-closed", peer=self.peer, who=self._who(),
                       reason="server is shutting down")
        self.tel.refused("shutting_down", "server is shutting down")  # unless welcomed
        await self._close(self.conn.send(
            p.Error(p.ErrorCode.UNAVAILABLE, "server is shutting down")))

    # -- the connection's life --------------------------------------------------

    async def run(self) -> None:
        try:
            if await self._handshake():
                await self._serve_requests()
        finally:
            await self._close()
            if self._owes_goodbye:
                self.server.response_ended()
            self.tel.closed()

    async def _handshake(self) -> bool:
        """TLS, identity, hello and welcome, under one deadline. True when welcomed."""
        with trio.move_on_after(self.server.config.handshake_timeout):
            try:
                await self.stream.do_handshake()
            except trio.BrokenResourceError as exc:
                reason = describe_tls_error(exc.__cause__)
                self.log.warning("connection-refused", peer=self.peer, reason=reason)
                self.tel.refused("tls", reason)
                with trio.CancelScope(shield=True), trio.move_on_after(CLOSE_TIMEOUT):
                    await self._flush_tls_alert()
                return False
            refusal: tuple[p.ErrorCode, str] | None = None
            name = "-"
            try:
                check_client_purpose(self.stream.getpeercert(binary_form=True))
                self.identity = identity_from_cert(self.stream.getpeercert())
                name = self.identity.name
            except IdentityError as exc:
                refusal = (p.ErrorCode.PERMISSION_DENIED, str(exc))
                self.log.warning("identity-refused", peer=self.peer, reason=str(exc),
                                 subject=_subject(self.stream.getpeercert()))
                self.tel.refused("identity", str(exc))
            if refusal is None and self.identity is not None:
                # A slot is taken (or refused) before the hello is read: the wait for
                # it then counts against the caller's share, not the handshake slots.
                refusal = self.server.admission.admit(self.ticket, self.identity)
                if refusal is not None:
                    self.log.warning("connection-refused", peer=self.peer, who=name,
                                     role=self.identity.role.value, reason=refusal[1])
                    self.tel.refused("busy", refusal[1])
            try:
                with self._waiting_for_peer() as wait:
                    hello = await self._receive_event()
                if wait.cancelled_caught:
                    await self._refuse_shutting_down()
                    return False
            except p.RemoteProtocolError as exc:
                self.log.warning("bad-hello", peer=self.peer, who=name, reason=exc.message)
                self.tel.refused("bad_hello", exc.message)
                await self._close(exc.error_frame)
                return False
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                return False
            if hello is p.CLOSED:
                return False
            if refusal is None and self.server.closing:
                refusal = (p.ErrorCode.UNAVAILABLE, "server is shutting down")
                self.tel.refused("shutting_down", "server is shutting down")
            if refusal is not None:
                await self._close(self.conn.send(p.Error(*refusal)))
                return False
            try:
                # Nothing may follow the hello before the welcome: bytes that came
                # with it would otherwise wait unread until the client sent more.
                self.conn.next_event()
            except p.RemoteProtocolError as exc:
                self.log.warning("bad-hello", peer=self.peer, who=name, reason=exc.message)
                self.tel.refused("bad_hello", exc.message)
                await self._close(exc.error_frame)
                return False
            assert self.identity is not None
            welcome = p.Welcome(
                version=p.PROTOCOL_VERSION, minor=p.PROTOCOL_MINOR, software=SOFTWARE,
                identity=self.identity.name, role=self.identity.role.value,
                max_frame_size=p.MAX_FRAME_SIZE,
            )
            try:
                await self._send(self.conn.send(welcome))
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                return False
            self.log.debug("connected", peer=self.peer, who=self.identity.name,
                           role=self.identity.role.value)
            self.tel.welcomed(self.identity.name, self.identity.role.value, self.stream.version())
            return True
        self.log.warning("connection-timeout", peer=self.peer,
                         reason=f"no handshake and hello within "
                         f"{self.server.config.handshake_timeout:g}s")
        self.tel.refused("timeout", "no handshake and hello in time")
        return False

    async def _serve_requests(self) -> None:
        send, receive = trio.open_memory_channel[p.Message](1)
        shutting_down = False
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._reader, send)
            async with receive:
                while True:
                    with self._waiting_for_peer() as wait:
                        try:
                            request = await receive.receive()
                        except trio.EndOfChannel:
                            break
                    if wait.cancelled_caught:
                        shutting_down = True
                        break
                    self.server.response_started()
                    try:
                        with self.tel.request(request), trio.CancelScope() as self._response_scope:
                            await self._respond(request)
                    except (trio.BrokenResourceError, trio.ClosedResourceError,
                            p.RemoteProtocolError):  # the reader closed on a protocol error
                        break
                    finally:
                        self._response_scope = None
                        if self.server.closing and not self._owes_goodbye:
                            # The goodbye that follows belongs to this response: the
                            # server must not look idle (and cancel its handlers)
                            # between the two. run() ends it.
                            self._owes_goodbye = True
                        else:
                            self.server.response_ended()
            nursery.cancel_scope.cancel()
        if shutting_down:  # the reader is gone: the stream is ours to close
            await self._refuse_shutting_down()

    async def _reader(self, requests: trio.MemorySendChannel[p.Message]) -> None:
        """Own the receive side: feed the protocol, hand over requests, notice EOF."""
        async with requests:
            try:
                while True:
                    data = await self.stream.receive_some(RECEIVE_SIZE)
                    self.conn.receive_data(data)
                    while True:
                        event = self.conn.next_event()
                        if event is p.NEED_DATA:
                            break
                        if event is p.CLOSED:
                            self._peer_gone()
                            return
                        # Bytes read along with this request are a second request sent
                        # before this one's answer: refuse them now, before the first is
                        # handed over, so that the outcome does not depend on which task
                        # runs first (and a pipelined start is never half carried out).
                        self.conn.next_event()
                        await requests.send(event)
            except p.RemoteProtocolError as exc:
                role = self.identity.role.value if self.identity is not None else "-"
                self.log.warning("bad-request", peer=self.peer, who=self._who(), role=role,
                                 code=exc.code.value, reason=exc.message)
                if exc.message_type == "start":
                    self._log_refused_start(exc.code, exc.message)
                # A stream ends now; a one-shot request in progress (a start being
                # spawned, a stop waiting for its job) is carried out, its answer lost:
                # cancelling a start half-way could leave its job unsupervised.
                self._peer_gone()
                await self._close(exc.error_frame)
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                self._peer_gone()

    def _peer_gone(self) -> None:
        # A stream would wait for output forever: end it now. Other responses
        # (a stop waiting for its job) run to completion; their reply is lost.
        if self._streaming:
            self._cancel_response()

    def _cancel_response(self) -> None:
        if self._response_scope is not None:
            self._response_scope.cancel()

    def _who(self) -> str:
        return self.identity.name if self.identity is not None else "-"

    # -- requests ---------------------------------------------------------------

    async def _respond(self, request: p.Message) -> None:
        reply: p.Message
        try:
            if isinstance(request, p.Stream | p.Output):
                self._streaming = True
                try:
                    reply = await self._stream_output(request,
                                                      follow=isinstance(request, p.Stream))
                finally:
                    self._streaming = False
            else:
                reply = await self._dispatch(request)
        except Denied as exc:
            reply = p.Error(p.ErrorCode.PERMISSION_DENIED, f"permission denied: {exc}")
        except JobNotFound:
            reply = p.Error(p.ErrorCode.NOT_FOUND, "process not found")
        except InvalidState as exc:
            reply = p.Error(p.ErrorCode.INVALID_STATE, str(exc))
        except BadPosition as exc:
            reply = p.Error(p.ErrorCode.BAD_REQUEST, f"bad position: {exc}")
        except BadLimits as exc:
            reply = p.Error(p.ErrorCode.BAD_REQUEST, str(exc))
        except _Refusal as exc:
            reply = p.Error(exc.code, str(exc))
        except LimitExceeded as exc:
            reply = p.Error(p.ErrorCode.LIMIT_EXCEEDED, str(exc))
        except Unenforceable as exc:  # permanent on this machine: not "unavailable"
            reply = p.Error(p.ErrorCode.BAD_REQUEST, str(exc))
        except EngineError as exc:
            reply = p.Error(p.ErrorCode.UNAVAILABLE, str(exc))
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            raise
        except Exception as exc:  # a bug: answer and log it, keep serving this client
            self.log.error("request-failed", peer=self.peer, who=self._who(),
                           request=request.TYPE, reason=repr(exc)[:p.MAX_ERROR_MESSAGE])
            reply = p.Error(p.ErrorCode.INTERNAL, "internal error: the request failed")
        if isinstance(reply, p.Error):
            reply = p.Error(reply.code, p.clip(reply.message))
            if isinstance(request, p.Start):
                self._log_refused_start(reply.code, reply.message)
        self.tel.replied(reply)
        try:
            frame = self.conn.send(reply)
        except p.LocalProtocolError as exc:
            # Too large for a frame, or not encodable (a record an older jobd wrote):
            # an error frame, never a dropped connection.
            self.log.error("response-failed", peer=self.peer, who=self._who(),
                           request=request.TYPE, reason=p.clip(exc.message))
            frame = self.conn.send(p.Error(p.ErrorCode.INTERNAL,
                                           p.clip(f"cannot send the answer: {exc.message}")))
        await self._send(frame)

    def _log_refused_start(self, code: p.ErrorCode, reason: str) -> None:
        """Every refused start is an event: who asked, with what role, and why."""
        role = self.identity.role.value if self.identity is not None else "-"
        self.log.info("start-refused", peer=self.peer, who=self._who(), role=role,
                      code=code.value, reason=reason)

    def _visible(self, job: int, action: Action = Action.READ) -> p.JobStatus:
        """The job's status if the caller may see it, else JobNotFound (no existence leak)."""
        assert self.identity is not None
        status = self.manager.status(job)
        if not self.identity.sees(status.owner):
            self.log.info("request-denied", who=self.identity.name, action=action.value,
                          id=job, reason="not the caller's job")
            raise JobNotFound(job)
        return status

    def _require(self, action: Action, job: int | None = None) -> None:
        assert self.identity is not None
        if not self.identity.allowed(action):
            role = self.identity.role.value
            self.log.info("request-denied", who=self.identity.name, role=role,
                          action=action.value, id=job, reason="role")
            raise Denied(f"role {role} may not {action.value} jobs")

    async def _dispatch(self, request: p.Message) -> p.Message:
        assert self.identity is not None
        who = self.identity.name
        if isinstance(request, p.Start):
            self._require(Action.START)
            return await self._start(request)
        if isinstance(request, p.Rerun):
            self._require(Action.RERUN, request.job)
            self._owned(request.job, Action.RERUN)
            self.log.info("rerun-requested", id=request.job, who=who)
            return await self._start(self._rerun_request(request.job))
        if isinstance(request, p.Stop):
            self._require(Action.STOP, request.job)
            self._owned(request.job, Action.STOP)
            self.log.info("stop-requested", id=request.job, who=who, grace=request.grace)
            return p.Stopped(await self.manager.stop(request.job, request.grace))
        if isinstance(request, p.GetStatus):
            return p.StatusResult(self._visible(request.job))
        if isinstance(request, p.Delete):
            self._require(Action.DELETE, request.job)
            self._owned(request.job, Action.DELETE)
            try:
                await self.manager.delete(request.job)
            except InvalidState:
                raise _Refusal(p.ErrorCode.INVALID_STATE,
                               "process is running: stop it before deleting it") from None
            self.log.info("job-deleted", id=request.job, who=who)
            return p.Deleted(request.job)
        if isinstance(request, p.ListJobs):
            return await self._list_page(request)
        if isinstance(request, p.Prune):
            self._require(Action.PRUNE)
            removed = await self.manager.prune(request.older_than, reason=f"prune by {who}")
            self.log.info("pruned", who=who, older_than=request.older_than, removed=removed)
            return p.Pruned(removed)
        raise _Refusal(p.ErrorCode.BAD_REQUEST, f"unexpected request {type(request).__name__}")

    async def _start(self, request: p.Start) -> p.Started:
        assert self.identity is not None
        who = self.identity.name
        if request.env is None:
            env = self.server.job_env
        elif request.env_merge:
            env = {**self.server.job_env, **dict(request.env)}
        else:
            env = dict(request.env)
        admin = self.identity.role is Role.ADMIN
        async with self.server.starting(self.identity):
            status = await self.manager.start(
                request.argv, who, cwd=request.cwd, env=env, limits=request.limits,
                max_running=None if admin else self.server.config.max_jobs_per_user,
                labels=request.labels, spec=_spec(request))
        if status.state is p.JobState.ERROR:
            self.log.info("job-failed", id=status.id, owner=who, status=status.describe())
        return p.Started(status)

    def _rerun_request(self, job: int) -> p.Start:
        """The start request a rerun of ``job`` makes: its argv and labels, and its
        start's cwd, environment and requested limits (kept in its record)."""
        status, spec = self.manager.spec(job)
        if spec is None:
            raise _Refusal(p.ErrorCode.INVALID_STATE, f"job {job} was started by an older "
                           "jobd, which did not keep its cwd and environment: start it anew")
        try:
            limits = spec.get("limits")
            return p.Start(argv=status.argv, cwd=spec.get("cwd"), env=spec.get("env"),
                           limits=p.Limits.from_wire(limits) if limits is not None else None,
                           env_merge=bool(spec.get("env_merge")), labels=status.labels)
        except (p.FieldError, TypeError, ValueError) as exc:  # a damaged record
            raise _Refusal(p.ErrorCode.INVALID_STATE,
                           f"job {job}'s start cannot be repeated: {exc}") from None

    def _owned(self, job: int, action: Action) -> None:
        assert self.identity is not None
        status = self._visible(job, action)
        if not self.identity.may(action, status.owner):
            self.log.info("request-denied", who=self.identity.name, action=action.value,
                          id=job, reason="not the caller's job")
            raise JobNotFound(job)

    async def _list_page(self, request: p.ListJobs) -> p.JobList:
        """One page, filtered by the database (owner, states, since) from its indexes;
        a caller who may read only its own jobs gets only those, whatever it asks."""
        assert self.identity is not None
        owner = request.owner
        if POLICY[self.identity.role][Action.READ] is not Scope.ALL:
            if owner is not None and owner != self.identity.name:
                return p.JobList((), False, 0 if request.count else None)
            owner = self.identity.name
        statuses, more, total = await self.manager.list_page(
            request.after, LIST_PAGE_ROWS, owner=owner, states=request.states,
            since=request.since, count=request.count, labels=request.labels)
        page: list[p.JobStatus] = []
        size = 0
        for status in statuses:
            cost = p.encoded_size(status)
            if cost > LIST_ENTRY_MAX:
                status = _shortened(status)
                cost = p.encoded_size(status)
            if page and size + cost > LIST_PAGE_BYTES:
                more = True
                break
            page.append(status)
            size += cost
        return p.JobList(tuple(page), more, total)

    async def _stream_output(self, request: p.Stream | p.Output, *, follow: bool) -> p.End:
        """Send the output chunks; return the end frame. Errors (not found, a bad
        position, a job deleted meanwhile) are answered by ``_respond``."""
        self._visible(request.job)
        if request.end_only:  # `jobctl wait`: no output, the end when the job has ended
            if follow:
                return p.End(await self.manager.wait(request.job), request.position)
            return p.End(self.manager.status(request.job), request.position)
        reader = self.manager.follow_output if follow else self.manager.read_output
        chunks = reader(request.job, request.position, timestamps=request.timestamps)
        position = request.position
        async with contextlib.aclosing(chunks):  # type: ignore[type-var]
            async for chunk in chunks:
                if chunk.time_ns is None:
                    frame = self.conn.send_output(chunk.fd, chunk.data, chunk.position)
                else:  # timestamps asked for: the general encoder (not the fast path)
                    frame = self.conn.send(p.OutputChunk(chunk.fd, chunk.data, chunk.position,
                                                         chunk.time_ns / 1e9))
                await self._send(frame)
                self.tel.streamed(len(chunk.data))
                position = chunk.position
        return p.End(self.manager.status(request.job), position)


class _Refusal(Exception):
    """A request answered with an error of the given code."""

    def __init__(self, code: p.ErrorCode, message: str):
        super().__init__(message)
        self.code = code


def _shortened(status: p.JobStatus) -> p.JobStatus:
    """*status* cut to fit a list page: the first arguments (then ``...``), the
    error clipped, at most MAX_IO_DEVICES devices per direction. For records an
    older jobd stored before requests were bounded; the full record stays on disk.
    """
    entries, budget = SHORT_ARGV
    argv: list[bytes] = []
    for arg in status.argv[:entries]:
        if budget <= 0:
            break
        argv.append(arg[:budget])
        budget -= len(arg)
    if len(argv) < len(status.argv) or budget < 0:
        argv.append(b"...")
    limits = status.limits
    if limits is not None:
        limits = replace(limits, io_read_bps=limits.io_read_bps[:p.MAX_IO_DEVICES],
                         io_write_bps=limits.io_write_bps[:p.MAX_IO_DEVICES])
    error = p.clip(status.error) if status.error is not None else None
    return replace(status, argv=tuple(argv), error=error, limits=limits)


def _subject(cert: dict[str, Any] | None) -> str:
    if not cert:
        return "-"
    return ",".join(f"{k}={v}" for rdn in cert.get("subject", ()) for k, v in rdn)


__all__ = ["FD_RESERVE", "Server", "TLSConfigError", "connection_limit", "format_address",
           "serve"]


def _spec(request: p.Start) -> dict[str, Any]:
    """What a job's record keeps of its start, for ``rerun``: the request's own
    cwd, environment (as given, not merged: a rerun merges it with the server's
    environment of the day) and requested limits (the server's defaults apply
    again)."""
    return {"cwd": request.cwd,
            "env": [[k, v] for k, v in request.env] if request.env is not None else None,
            "env_merge": request.env_merge,
            "limits": request.limits.to_wire() if request.limits is not None else None}
