"""A connection's life: TLS handshake, identity, hello, then its requests.

Theory of operation
-------------------

Each accepted connection is a :class:`Session`; what every session shares
(the admission counts, the current TLS context, the sessions waiting for
their peer, the responses in progress) is the :class:`ServerState`. A
session never answers a request itself: it hands each one to
:func:`jobd._handlers.answer` and writes the reply. This module owns the
socket, ``jobd/_handlers.py`` the meaning of each request.

The TLS handshake and the client's hello share one deadline
(``--handshake-timeout``). The peer's verified certificate names the caller
(CN) and the role (OU); a certificate without exactly one role is answered
with an error frame instead of the welcome.

After the welcome a session runs two tasks. The *reader* owns the receive
side of the TLS stream: it feeds bytes to the sans-IO
:class:`protocol.ServerConnection` and hands each request to the *responder*
through a channel of size 1. Because the reader keeps reading while a stream
response is being written, a client that goes away is noticed at once, even
when the job is silent: the reader cancels the response in flight. Bytes that
arrive while a response is under way are a protocol error (one request at a
time), answered with an error frame before the connection closes. The one
exception is an attach (minor 2): its ``input``, ``eof``, ``resize`` and
``detach`` frames arrive while it runs, and the reader routes them to the
attach's handler through a small channel (the *input route*, opened when the
reader reads the attach request; jobd/_attach.py), waiting while it is full.

A client whose hello asked for liveness ticks gets a third task, the
*ticker*: while a response is in progress and nothing was sent for the
interval, it sends a ``tick`` frame, so that the client can tell a silent job
from a stopped server or a dead path (docs/protocol.md, ``tick``).

A connection that jobd ends with a reason (a TLS alert, an error frame)
closes lingering (jobd/_linger.py), so that a client that wrote before it
read gets the reason rather than a reset.

Writes go through ``_send`` behind one lock. A slow reader on the other end
makes only its own ``send_all`` wait; the job's output keeps going to disk and
other followers read the log at their own pace.

Shutdown (:meth:`ServerState.begin_closing`): every session waiting for its
peer (before its hello, or idle between requests) is told ``unavailable``
"server is shutting down" and closed; a response in progress counts as busy
until its goodbye is sent, so that the server's flush waits for it.
"""

from __future__ import annotations

import contextlib
import socket
import ssl
from collections.abc import AsyncIterator, Iterator
from typing import TYPE_CHECKING, Any

import trio

import protocol as p
from jobd._admission import (
    Admission,
    Limits,
    Ticket,
    descriptors_at_most,
    descriptors_in_use,
    nofile_soft_limit,
)
from jobd._attach import INPUT_QUEUE, Attachments
from jobd._auth import (
    Identity,
    IdentityError,
    Role,
    check_client_purpose,
    identity_from_cert,
)
from jobd._handlers import STREAMS, Context, Refusal, answer, job_environment, log_refused_start
from jobd._linger import LINGER_TIMEOUT, LingeringStream
from jobd._telemetry import NULL, Telemetry
from jobd._tls import describe_tls_error
from jobd._version import __version__
from jobd.engine import TERMINAL_FD, TERMINAL_SIZE
from protocol._x509 import CertificateFormatError, issuer_and_serial

if TYPE_CHECKING:
    from collections.abc import Callable

    from jobd._config import ServerConfig
    from jobd._log import EventLog
    from jobd.engine import JobManager, OutputChunk

SOFTWARE = f"jobd {__version__}"
#: Bytes asked of the TLS stream per read: one TLS record is at most 16 KiB.
RECEIVE_SIZE = 64 * 1024
#: How long a connection closing (close_notify, error frame) may take.
CLOSE_TIMEOUT = 2.0
#: Liveness: the shortest interval between two ticks jobd sends, whatever a client
#: asks for (docs/protocol.md, ``tick``): a tick is ~20 bytes, 4 a second at most.
MIN_TICK_INTERVAL = 0.25
#: TCP keepalive: a peer that vanished without a FIN is noticed in ~1 minute.
KEEPALIVE = (30, 10, 3)  # idle seconds, interval seconds, probes


def format_address(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


class ServerState:
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
        self.waiting: set[Session] = set()
        #: Sessions past their TLS handshake, by the certificate they showed
        #: (issuer DER, serial): a CRL reload closes those it revokes.
        self.sessions: dict[Session, tuple[bytes, int]] = {}
        self.job_env = job_environment(config.job_env)
        self.attachments = Attachments()
        self.telemetry: Telemetry = NULL
        #: Set when a connection closes; jobd._alloc.trim follows (jobd._server).
        self.connection_closed = trio.Event()
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
        admin = identity.role is Role.ADMIN
        if nofile_soft_limit() is not None:
            # The table's size bounds the count from above: when even that leaves
            # enough, no count (a listing of /proc/self/fd and a thread's round
            # trip, a tenth of a start's cost: issue 26).
            bound = descriptors_at_most()
            short = (self.admission.descriptors_short(bound, admin=admin)
                     if bound is not None else "unknown")
            if short is not None:
                in_use = await trio.to_thread.run_sync(descriptors_in_use)
                short = self.admission.descriptors_short(in_use, admin=admin)
            if short is not None:  # logged as start-refused, as every refused start
                raise Refusal(p.ErrorCode.UNAVAILABLE, short)
        self.admission.starts_in_progress += 1
        try:
            yield
        finally:
            self.admission.starts_in_progress -= 1

    def revoke(self, revoked: frozenset[tuple[bytes, int]]) -> None:
        """A CRL was (re)loaded: close every open connection whose certificate it
        revokes, as Teleport's locks end live sessions. New connections are refused
        by OpenSSL at the handshake."""
        for session, cert in list(self.sessions.items()):
            if cert in revoked:
                session.revoke()

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
            session = Session(self, trio.SSLStream(LingeringStream(tcp), self.tls(),
                                                   server_side=True), peer, ticket)
            await session.run()
        except* Exception as group:
            # One connection must never take the daemon down: log and drop it.
            for exc in group.exceptions:
                self.log.error("connection-failed", peer=peer, reason=repr(exc))
        finally:
            self.admission.release(ticket)
            self.connection_closed.set()


def _set_keepalive(tcp: trio.SocketStream) -> None:
    with contextlib.suppress(OSError, AttributeError):
        tcp.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
        idle, interval, count = KEEPALIVE
        tcp.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE, idle)
        tcp.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPINTVL, interval)
        tcp.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPCNT, count)


class Session:
    """One client connection: handshake, identity, then requests in sequence."""

    def __init__(self, server: ServerState, stream: trio.SSLStream[LingeringStream],
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
        self._context: Context | None = None  # the handlers', made at the first request
        #: While an attach runs: where the reader sends its input frames (the input
        #: route), and the attach's end of it until its handler takes it.
        self._attach_route: trio.MemorySendChannel[p.Message] | None = None
        self._attach_inputs: trio.MemoryReceiveChannel[p.Message] | None = None
        self.tel = server.telemetry.connection(peer)
        self._scope: trio.CancelScope | None = None  # the whole session's
        self._revoked = False
        #: Liveness (asked for in the hello): tick when nothing was sent for this long
        #: while a response is in progress; None: never.
        self.tick_interval: float | None = None
        self._last_sent = 0.0
        self._responding = trio.Event()

    # -- plumbing -------------------------------------------------------------

    async def _send(self, data: bytes) -> None:
        async with self._send_lock:
            await self.stream.send_all(data)
            self._last_sent = trio.current_time()

    async def _ticker(self, interval: float) -> None:
        """While a response is in progress, a tick whenever nothing was sent for
        ``interval``: the client learns that jobd is alive (a stream of a silent
        job, a stop waiting for its job). A stalled client's ticks wait behind
        its output, in the one send lock."""
        while True:
            await self._responding.wait()
            await trio.sleep_until(self._last_sent + interval)
            if self._response_scope is None:
                continue
            async with self._send_lock:
                if trio.current_time() < self._last_sent + interval:
                    continue
                try:
                    frame = self.conn.send(p.Tick())
                except p.LocalProtocolError:  # the connection is ending
                    return
                await self.stream.send_all(frame)
                self._last_sent = trio.current_time()

    async def _receive_event(self) -> Any:
        """Next event from the peer (hello phase only; later the reader task does this)."""
        while True:
            event = self.conn.next_event()
            if event is not p.NEED_DATA:
                return event
            self.conn.receive_data(await self.stream.receive_some(RECEIVE_SIZE))

    async def _close(self, final: bytes = b"") -> None:
        """Close; with ``final`` (an error frame), send it first and linger
        (jobd._linger) so that a client that wrote before it read gets it."""
        with trio.CancelScope(shield=True), trio.move_on_after(CLOSE_TIMEOUT + LINGER_TIMEOUT):
            if final:
                self.stream.transport_stream.linger = LINGER_TIMEOUT
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

    def revoke(self) -> None:
        """The certificate was revoked (a CRL reload): end the session now. A request
        in progress is cancelled (a start being spawned still completes, unanswered);
        the client gets an error frame saying why."""
        if self._revoked:
            return
        self._revoked = True
        cert = self.server.sessions.get(self)
        self.log.warning("connection-revoked", peer=self.peer, who=self._who(),
                         role=self.identity.role.value if self.identity else "-",
                         serial=f"{cert[1]:x}" if cert else None,
                         reason="certificate revoked by the CRL just loaded")
        if self._scope is not None:
            self._scope.cancel()

    async def run(self) -> None:
        try:
            with trio.CancelScope() as self._scope:
                if await self._handshake():
                    await self._serve_requests()
            if self._revoked:
                try:
                    goodbye = self.conn.send(p.Error(
                        p.ErrorCode.PERMISSION_DENIED, "certificate revoked: the server "
                        "closed this connection"))
                except p.LocalProtocolError:
                    goodbye = b""
                await self._close(goodbye)
        finally:
            self.server.sessions.pop(self, None)
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
                # run() closes: after the alert, linger (jobd._linger).
                self.stream.transport_stream.linger = LINGER_TIMEOUT
                return False
            refusal: tuple[p.ErrorCode, str] | None = None
            name = "-"
            der = self.stream.getpeercert(binary_form=True)
            with contextlib.suppress(CertificateFormatError):
                self.server.sessions[self] = issuer_and_serial(der or b"")
            try:
                check_client_purpose(der)
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
            if hello.tick_interval is not None:
                self.tick_interval = max(hello.tick_interval, MIN_TICK_INTERVAL)
            welcome = p.Welcome(
                version=p.PROTOCOL_VERSION, minor=p.PROTOCOL_MINOR, software=SOFTWARE,
                identity=self.identity.name, role=self.identity.role.value,
                max_frame_size=p.MAX_FRAME_SIZE, tick_interval=self.tick_interval,
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
            if self.tick_interval is not None:
                nursery.start_soon(self._ticker, self.tick_interval)
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
                    self._last_sent = trio.current_time()  # the ticks' clock starts now
                    self._responding.set()
                    try:
                        with self.tel.request(request), trio.CancelScope() as self._response_scope:
                            await self._respond(request)
                    except (trio.BrokenResourceError, trio.ClosedResourceError,
                            p.RemoteProtocolError):  # the reader closed on a protocol error
                        break
                    finally:
                        self._response_scope = None
                        self._responding = trio.Event()
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
                    if not self._receive_decrypted():
                        self.conn.receive_data(await self.stream.receive_some(RECEIVE_SIZE))
                    while True:
                        event = self.conn.next_event()
                        if event is p.NEED_DATA:
                            break
                        if event is p.CLOSED:
                            self._peer_gone()
                            return
                        if event.TYPE in p.ATTACH_FRAMES:
                            await self._route_input(event)
                            continue
                        if isinstance(event, p.Attach):
                            # Its input frames may follow at once: route them from now on.
                            self._attach_route, self._attach_inputs = \
                                trio.open_memory_channel[p.Message](INPUT_QUEUE)
                            await requests.send(event)
                            continue
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
                    log_refused_start(self.log, self.peer, self.identity, exc.code, exc.message)
                # A stream ends now; a one-shot request in progress (a start being
                # spawned, a stop waiting for its job) is carried out, its answer lost:
                # cancelling a start half-way could leave its job unsupervised.
                self._peer_gone()
                await self._close(exc.error_frame)
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                self._peer_gone()

    def _receive_decrypted(self) -> bool:
        """Move what OpenSSL can decrypt without waiting (the records that the
        last transport read brought along) into the connection's buffer, up to the
        end of the next frame; True if anything came (or the peer's close_notify).

        trio's ``receive_some`` returns one TLS record (16 KiB at most) per call;
        bulk input (256 KiB frames) would take 16 trips through its retry loop and
        this reader's per frame. Reading the rest here, straight into the
        connection's buffer (no copy), takes one. Exactly what the next frame
        wants is read, so the buffer still never holds more than one frame; what
        OpenSSL holds beyond it is bounded by one transport read
        (jobd._linger.TRANSPORT_RECEIVE_SIZE). The SSL object is trio's: when it is
        not there (another trio), every record takes trio's way, as before.
        """
        tls = getattr(self.stream, "_ssl_object", None)
        if not isinstance(tls, ssl.SSLObject):
            return False
        conn = self.conn
        progress = False
        # First the rest of the length prefix, then the rest of the payload it
        # announces; stop when the frame is whole or OpenSSL has nothing more.
        while (wanted := conn.bytes_wanted()) > 0:
            got = 0
            eof = False
            with conn.get_buffer(wanted) as view:
                try:
                    while got < wanted:  # one record (16 KiB at most) per read
                        count: int = tls.read(wanted - got, view[got:])  # type: ignore[assignment]
                        if not count:  # close_notify: the peer's clean end
                            eof = True
                            break
                        got += count
                except ssl.SSLWantReadError:  # nothing more without the transport
                    pass
                except ssl.SSLError as exc:  # as trio reports it (a bad record: the end)
                    raise trio.BrokenResourceError from exc
            if got:
                conn.buffer_updated(got)
                progress = True
            if eof:
                conn.receive_data(b"")
                return True
            if got < wanted:
                break
        return progress

    async def _route_input(self, frame: p.Message) -> None:
        """An attach's input frame to its handler; one that lingers after the attach
        ended is dropped. Waits while the attach's queue is full (a job that reads
        slowly): this connection reads no more until there is room."""
        route = self._attach_route
        if route is None:
            return
        try:
            try:
                # Room: no trip through the scheduler per frame (the reader yields at
                # its next socket read, at most one read's worth of frames later).
                route.send_nowait(frame)
            except trio.WouldBlock:
                await route.send(frame)
        except (trio.BrokenResourceError, trio.ClosedResourceError):  # the attach ended
            self._attach_route = None

    def _take_input(self) -> trio.MemoryReceiveChannel[p.Message]:
        inputs, self._attach_inputs = self._attach_inputs, None
        assert inputs is not None, "an attach's input route is opened by the reader"
        return inputs

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

    def _handler_context(self) -> Context:
        """What the handlers get: the welcomed caller, the engine, the way out."""
        assert self.identity is not None
        return Context(
            identity=self.identity, manager=self.manager, log=self.log, peer=self.peer,
            job_env=self.server.job_env, max_jobs_per_user=self.server.config.max_jobs_per_user,
            starting=self.server.starting, send_chunk=self._send_chunk,
            attachments=self.server.attachments, take_input=self._take_input)

    async def _respond(self, request: p.Message) -> None:
        """Answer one request (jobd/_handlers.py) and send the reply."""
        if self._context is None:
            self._context = self._handler_context()
        self._streaming = type(request) in STREAMS
        try:
            reply = await answer(self._context, request)
        finally:
            self._streaming = False
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

    async def _send_chunk(self, chunk: OutputChunk) -> None:
        """One chunk of a stream or output answer (or a resize, when it asked)."""
        if chunk.fd == TERMINAL_FD:
            rows, cols = TERMINAL_SIZE.unpack(chunk.data)
            await self._send(self.conn.send(p.Resized(rows, cols, chunk.position,
                                                      (chunk.time_ns or 0) / 1e9)))
            return
        if chunk.time_ns is None:
            frame = self.conn.send_output(chunk.fd, chunk.data, chunk.position)
        else:  # timestamps asked for: the general encoder (not the fast path)
            frame = self.conn.send(p.OutputChunk(chunk.fd, chunk.data, chunk.position,
                                                 chunk.time_ns / 1e9))
        await self._send(frame)
        self.tel.streamed(len(chunk.data))


def _subject(cert: dict[str, Any] | None) -> str:
    if not cert:
        return "-"
    return ",".join(f"{k}={v}" for rdn in cert.get("subject", ()) for k, v in rdn)


__all__ = ["KEEPALIVE", "ServerState", "Session", "format_address"]
