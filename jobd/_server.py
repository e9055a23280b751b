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
import os
import resource
import shlex
import socket
import ssl
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import trio

import protocol as p
from jobd import __version__
from jobd._auth import Action, Identity, IdentityError, identity_from_cert
from jobd._config import ServerConfig
from jobd._log import EventLog, route_engine_logs
from jobd._telemetry import NULL, Telemetry
from jobd._tls import TLSConfigError, describe_tls_error, make_server_context
from jobd.engine import (
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
#: The whole argv of a start request: generous for any real command line, and
#: small enough that every status carrying it fits in one frame.
MAX_ARGV_BYTES = 256 * 1024
#: Target size of one page of a list response, well under the frame limit.
LIST_PAGE_BYTES = 256 * 1024
#: How long a connection closing (close_notify, error frame) may take.
CLOSE_TIMEOUT = 2.0
#: After the jobs are stopped at shutdown, open streams get this long to
#: write their end frames before the handlers are cancelled.
SHUTDOWN_FLUSH_TIMEOUT = 5.0
#: Connections over the limit still get a clear refusal, but only this many
#: refusals are in progress at once; beyond that the socket is just closed.
MAX_REFUSALS = 64
#: File descriptors the connection limit leaves free for everything else: jobs
#: (two pipes, a log and a pidfd each), stream readers, records being written.
FD_RESERVE = 256
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
        limits=config.limits or LimitPolicy(), cgroup_root=config.cgroup_root)
    async with open_job_manager(engine_config) as manager:
        listeners = await _open_listeners(config.address, config.port)
        addresses = [listener.socket.getsockname()[:2] for listener in listeners]
        server = Server(addresses=addresses, manager=manager, _reload=reload)
        state = _ServerState(config, log, manager, lambda: tls[0])
        state.telemetry = telemetry
        telemetry.watch(manager, config.state_dir)
        if state.max_connections < config.max_connections:
            log.warning("connection-limit-lowered", configured=config.max_connections,
                        limit=state.max_connections,
                        nofile=resource.getrlimit(resource.RLIMIT_NOFILE)[0],
                        reason="the file descriptor limit cannot hold more; "
                        "raise it (ulimit -n, LimitNOFILE=) to allow more")
        async with trio.open_nursery() as handlers:
            async with trio.open_nursery() as acceptors:
                await acceptors.start(
                    _serve_listeners, state.handle, listeners, handlers
                )
                log.info("cgroups", **manager.cgroup_layout())
                log.info("listening", address=" ".join(format_address(h, pt) for h, pt in
                                                        addresses),
                         state_dir=str(config.state_dir))
                task_status.started(server)
                await server._shutdown.wait()
                log.info("shutdown", reason="requested", running=sum(
                    1 for s in manager.list() if s.running))
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


async def _serve_listeners(
    handler: Callable[[trio.SocketStream], Any],
    listeners: Sequence[trio.SocketListener],
    handler_nursery: trio.Nursery,
    *,
    task_status: trio.TaskStatus[list[trio.SocketListener]] = trio.TASK_STATUS_IGNORED,
) -> None:
    await trio.serve_listeners(handler, list(listeners), handler_nursery=handler_nursery,
                               task_status=task_status)


def connection_limit(configured: int) -> int:
    """``--max-connections``, lowered if jobd's file-descriptor limit cannot hold it.

    A connection takes up to two descriptors (its socket and, while it streams,
    the job's log), refusals in progress take MAX_REFUSALS more, and FD_RESERVE
    stay free, so that a flood of connections can never leave jobd unable to
    start a job or keep its output (``ulimit -n`` is often 1024 outside systemd).
    """
    soft, _hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY:
        return configured
    return max(1, min(configured, (soft - FD_RESERVE - MAX_REFUSALS) // 2))


class _ServerState:
    """State shared by every connection: counts, config, the current TLS context."""

    def __init__(self, config: ServerConfig, log: EventLog, manager: JobManager,
                 tls: Callable[[], ssl.SSLContext]):
        self.config = config
        self.log = log
        self.manager = manager
        self.tls = tls
        self.max_connections = connection_limit(config.max_connections)
        self.active = 0
        self.refusing = 0
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

    def begin_closing(self) -> None:
        """No new requests: every session waiting for its peer is told and closed."""
        self.closing = True
        for session in list(self.waiting):
            session.interrupt_wait()

    async def handle(self, tcp: trio.SocketStream) -> None:
        try:
            peer = format_address(*tcp.socket.getpeername()[:2])
        except OSError:
            await tcp.aclose()
            return
        _set_keepalive(tcp)
        over_limit = self.active >= self.max_connections
        if over_limit and self.refusing >= MAX_REFUSALS:
            self.log.warning("connection-refused", peer=peer, reason="too many connections")
            self.telemetry.connection_dropped(peer, "busy", "too many connections")
            await tcp.aclose()
            return
        if over_limit:
            self.refusing += 1
        else:
            self.active += 1
        try:
            session = _Session(self, trio.SSLStream(tcp, self.tls(), server_side=True), peer)
            await session.run(over_limit=over_limit)
        except* Exception as group:
            # One connection must never take the daemon down: log and drop it.
            for exc in group.exceptions:
                self.log.error("connection-failed", peer=peer, reason=repr(exc))
        finally:
            if over_limit:
                self.refusing -= 1
            else:
                self.active -= 1


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
                 peer: str):
        self.server = server
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
        if self._wait_scope is not None and not self._owes_goodbye:
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

    async def run(self, *, over_limit: bool) -> None:
        try:
            if await self._handshake(over_limit=over_limit):
                await self._serve_requests()
        finally:
            await self._close()
            if self._owes_goodbye:
                self.server.response_ended()
            self.tel.closed()

    async def _handshake(self, *, over_limit: bool) -> bool:
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
                self.identity = identity_from_cert(self.stream.getpeercert())
                name = self.identity.name
            except IdentityError as exc:
                refusal = (p.ErrorCode.PERMISSION_DENIED, str(exc))
                self.log.warning("identity-refused", peer=self.peer, reason=str(exc),
                                 subject=_subject(self.stream.getpeercert()))
                self.tel.refused("identity", str(exc))
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
            if refusal is None and over_limit:
                refusal = (p.ErrorCode.UNAVAILABLE, "server busy: too many connections "
                           f"(limit {self.server.max_connections})")
                self.log.warning("connection-refused", peer=self.peer, who=name,
                                 reason="too many connections")
                self.tel.refused("busy", "too many connections")
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
                self.log.warning("bad-request", peer=self.peer, who=self._who(),
                                 code=exc.code.value, reason=exc.message)
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
        except _Refusal as exc:
            reply = p.Error(exc.code, str(exc))
        except LimitExceeded as exc:
            reply = p.Error(p.ErrorCode.LIMIT_EXCEEDED, str(exc))
        except Unenforceable as exc:  # permanent on this machine: not "unavailable"
            reply = p.Error(p.ErrorCode.BAD_REQUEST, str(exc))
        except EngineError as exc:
            reply = p.Error(p.ErrorCode.UNAVAILABLE, str(exc))
        self.tel.replied(reply)
        await self._send(self.conn.send(reply))

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
            if sum(len(a) for a in request.argv) > MAX_ARGV_BYTES:
                raise _Refusal(p.ErrorCode.BAD_REQUEST,
                               f"command line longer than {MAX_ARGV_BYTES} bytes")
            env = dict(request.env) if request.env is not None else self.server.job_env
            status = await self.manager.start(request.argv, who, cwd=request.cwd, env=env,
                                              limits=request.limits)
            if status.state is p.JobState.ERROR:
                self.log.info("job-failed", id=status.id, owner=who, status=status.describe())
            return p.Started(status)
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
            return self._list_page(request.after)
        raise _Refusal(p.ErrorCode.BAD_REQUEST, f"unexpected request {type(request).__name__}")

    def _owned(self, job: int, action: Action) -> None:
        assert self.identity is not None
        status = self._visible(job, action)
        if not self.identity.may(action, status.owner):
            self.log.info("request-denied", who=self.identity.name, action=action.value,
                          id=job, reason="not the caller's job")
            raise JobNotFound(job)

    def _list_page(self, after: int) -> p.JobList:
        assert self.identity is not None
        page: list[p.JobStatus] = []
        size = 0
        more = False
        for status in self.manager.list():
            if status.id <= after or not self.identity.sees(status.owner):
                continue
            cost = 256 + sum(len(a) + 2 for a in status.argv) + len(status.error or "")
            if page and size + cost > LIST_PAGE_BYTES:
                more = True
                break
            page.append(status)
            size += cost
        return p.JobList(tuple(page), more)

    async def _stream_output(self, request: p.Stream | p.Output, *, follow: bool) -> p.End:
        """Send the output chunks; return the end frame. Errors (not found, a bad
        position, a job deleted meanwhile) are answered by ``_respond``."""
        self._visible(request.job)
        reader = self.manager.follow_output if follow else self.manager.read_output
        chunks = reader(request.job, request.position)
        position = request.position
        async with contextlib.aclosing(chunks):  # type: ignore[type-var]
            async for chunk in chunks:
                await self._send(self.conn.send_output(chunk.fd, chunk.data, chunk.position))
                self.tel.streamed(len(chunk.data))
                position = chunk.position
        return p.End(self.manager.status(request.job), position)


class _Refusal(Exception):
    """A request answered with an error of the given code."""

    def __init__(self, code: p.ErrorCode, message: str):
        super().__init__(message)
        self.code = code


def _subject(cert: dict[str, Any] | None) -> str:
    if not cert:
        return "-"
    return ",".join(f"{k}={v}" for rdn in cert.get("subject", ()) for k, v in rdn)


__all__ = ["Server", "TLSConfigError", "format_address", "serve"]
