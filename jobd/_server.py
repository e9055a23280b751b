"""The TLS server: accepts connections, authenticates them, answers requests.

Theory of operation
-------------------

``serve()`` owns three things, nested so that shutdown runs inside out:
the job manager (its nursery owns every job: jobs outlive connections), the
handler nursery (one task per connection), and the accept loop.

Each connection is a :class:`jobd._session.Session`, which owns the
connection's life (handshake, reader, writes, close); it hands each request
to ``jobd/_handlers.py``, one handler per request type. This module accepts
connections and runs the daemon's shutdown.

Shutdown (SIGTERM/SIGINT, :meth:`Server.request_shutdown`): the listeners
close, the manager stops every job with the stop sequence, every follower
ends so every open stream gets its end frame with the final status, the
handlers get a moment to flush, and then everything is cancelled.
"""

from __future__ import annotations

import errno
import math
import os
import resource
import shlex
import socket
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import trio

import protocol as p
from jobd._admission import FD_RESERVE, connection_limit
from jobd._alloc import trim
from jobd._config import ServerConfig
from jobd._expiry import expiry_warnings
from jobd._log import EventLog, route_engine_logs
from jobd._session import ServerState, format_address
from jobd._telemetry import NULL, Telemetry
from jobd._tls import TLSConfigError, make_server_context
from jobd.engine import EngineConfig, JobManager, LimitPolicy, open_job_manager

#: After the jobs are stopped at shutdown, open streams get this long to
#: write their end frames before the handlers are cancelled.
SHUTDOWN_FLUSH_TIMEOUT = 5.0
#: Once connections have closed, jobd waits this long (more may close meanwhile)
#: and then hands the heap's free pages back to the kernel (jobd._alloc.trim).
TRIM_DELAY = 5.0
#: accept() failing for want of descriptors (or kernel memory): jobd waits this
#: long before it tries again, doubling up to ACCEPT_BACKOFF_MAX, and logs the
#: pause once. A retry cannot wait for "a descriptor was freed" (any close in the
#: process frees one), so it backs off as trio's serve_listeners does, quietly.
ACCEPT_BACKOFF_MIN = 0.05
ACCEPT_BACKOFF_MAX = 1.0
#: At most one accept-paused line per this many seconds (see _accept_loop).
ACCEPT_PAUSE_LOG_INTERVAL = 60.0
ACCEPT_RESOURCE_ERRNOS = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM})


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
        max_log_space_per_user=config.max_log_space_per_user, tracking=config.job_tracking)
    async with open_job_manager(engine_config) as manager:
        listeners = await _open_listeners(config.address, config.port)
        addresses = [listener.socket.getsockname()[:2] for listener in listeners]
        server = Server(addresses=addresses, manager=manager, _reload=reload)
        state = ServerState(config, log, manager, lambda: tls[0])
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
                acceptors.start_soon(_release_memory, state)  # issue 21
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


async def _release_memory(state: ServerState) -> None:
    """After connections closed, give their freed memory back (see TRIM_DELAY)."""
    while True:
        await state.connection_closed.wait()
        await trio.sleep(TRIM_DELAY)
        state.connection_closed = trio.Event()
        await trio.to_thread.run_sync(trim)


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




__all__ = ["FD_RESERVE", "Server", "TLSConfigError", "connection_limit", "format_address",
           "serve"]
