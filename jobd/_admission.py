"""Who gets a connection slot, and a descriptor for a new job (SPEC §9, issue 13).

Theory of operation
-------------------

A connection goes through two pools:

1. **Handshake slots** (as many as connection slots). A socket takes one when
   it is accepted and keeps it until it is admitted or closed: through the TLS
   handshake, and, if it is refused after it (no role, no share left), until
   its error frame is sent. No more than ``max_handshakes_per_source`` of them
   belong to one source address at once (OpenSSH's PerSourceMaxStartups): a
   socket beyond that, or beyond the pool, is closed at once, without TLS work.
   So bare TCP sockets from one address cannot keep others from handshaking.

2. **Connection slots** (``--max-connections``). Once the client certificate is
   verified and names an identity, the connection moves here, before its hello
   is read (that wait is bounded by the same handshake deadline). The last
   ``admin_reserved`` slots only admin certificates may take (PostgreSQL's
   superuser_reserved_connections), and one identity (CN) holds at most
   ``max_per_identity`` slots, so that no certificate, and no crowd of
   non-admin ones, can lock the admin out. The share is counted per CN *and*
   role class (admin or not): an admin's connections never count against a
   non-admin share of the same CN, nor a non-admin certificate's against the
   admin's (an observe ``CN=root`` filling "root"'s share locked the real
   admin out: issue 22 item 2). A refusal is an error frame in place
   of the welcome: ``unavailable`` when the server is full, ``limit_exceeded``
   when the caller's own share is used up.

Descriptors: a handshake holds one (its socket), a welcomed connection up to
two (its socket and, while it streams, the job's log). The limits above are
sized from ``RLIMIT_NOFILE`` at start-up so that connections can never take the
FD_RESERVE descriptors kept for jobs. Jobs are not bounded that way (each holds
about four), so a start by a non-admin caller is refused while fewer than
ADMIN_FD_RESERVE descriptors would stay free beyond what the connection slots
may still claim: a control user's jobs cannot leave the admin unable to connect
or to start a job. Not even an admin's start takes the last LAST_FD_RESERVE,
which stopping jobs needs.
"""

from __future__ import annotations

import os
import resource
from collections import Counter
from dataclasses import dataclass

import protocol as p
from jobd._auth import Identity, Role

#: File descriptors the connection limits leave free for everything else: jobs
#: (two pipes, a log and a pidfd each), stream readers, records being written.
FD_RESERVE = 256
#: Descriptors a welcomed connection may hold (its socket and a job's log while
#: streaming) and a handshake (its socket).
FDS_PER_CONNECTION = 2
FDS_PER_HANDSHAKE = 1
#: Of the descriptors left for jobs, a start by a non-admin caller must leave
#: this many free: enough for an admin to connect, start a few jobs, stop them.
ADMIN_FD_RESERVE = 64
#: Not even an admin's start takes the last descriptors: stopping a job needs a
#: few (a /proc scan, pidfds of its processes, its record), and so does the
#: admin's connection. Without them a stop fails with EMFILE half-way.
LAST_FD_RESERVE = 16
#: What a start may take while it is being spawned (pipes, the exec-error pipe,
#: the log, a pidfd), counted for starts in progress whose descriptors the count
#: in /proc does not show yet.
FDS_PER_START = 8
#: Default share caps: a quarter of the connection slots per identity and half of
#: the handshake slots per source, and never more than these. A quarter keeps at
#: least four identities able to connect at once; half leaves the other half of
#: the handshakes to everyone else. 64 and 32 are far above what one user or one
#: host needs at once (a CI runner with dozens of jobctl in parallel).
DEFAULT_MAX_PER_IDENTITY = 64
DEFAULT_MAX_HANDSHAKES_PER_SOURCE = 32


def nofile_soft_limit() -> int | None:
    soft, _hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    return None if soft == resource.RLIM_INFINITY else soft


def connection_limit(configured: int) -> int:
    """``--max-connections``, lowered if jobd's file-descriptor limit cannot hold it:
    each slot may hold two descriptors, its handshake slot one more, and FD_RESERVE
    stay free (``ulimit -n`` is often 1024 outside systemd)."""
    soft = nofile_soft_limit()
    if soft is None:
        return configured
    per_slot = FDS_PER_CONNECTION + FDS_PER_HANDSHAKE
    return max(1, min(configured, (soft - FD_RESERVE) // per_slot))


@dataclass(frozen=True)
class Limits:
    """The effective admission limits (after the descriptor limit and the defaults)."""

    connections: int
    admin_reserved: int
    per_identity: int
    handshakes_per_source: int

    @classmethod
    def derive(cls, max_connections: int, admin_reserved: int, per_identity: int | None,
               per_source: int | None) -> Limits:
        """From the configured values; None: the default (see the constants)."""
        connections = connection_limit(max_connections)
        reserved = min(admin_reserved, connections - 1)
        if per_identity is None:
            per_identity = min(DEFAULT_MAX_PER_IDENTITY, max(1, connections // 4))
        if per_source is None:
            per_source = min(DEFAULT_MAX_HANDSHAKES_PER_SOURCE, max(1, connections // 2))
        return cls(connections, reserved, min(per_identity, connections),
                   min(per_source, connections))


@dataclass
class Ticket:
    """What one connection holds; released once, whatever it got to."""

    source: str
    handshaking: bool = False
    identity: Identity | None = None  # set once admitted


class Admission:
    """The counts behind the two pools, shared by every connection."""

    def __init__(self, limits: Limits) -> None:
        self.limits = limits
        self.handshaking = 0
        self.welcomed = 0
        self.welcomed_admin = 0
        self._per_source: Counter[str] = Counter()
        self._per_identity: Counter[tuple[str, bool]] = Counter()  # (CN, admin?)
        self.starts_in_progress = 0

    # -- handshake slots --------------------------------------------------------

    def begin_handshake(self, ticket: Ticket) -> str | None:
        """Take a handshake slot, or say why not (the socket is then closed at once)."""
        limits = self.limits
        if self._per_source[ticket.source] >= limits.handshakes_per_source:
            return (f"too many handshakes from {ticket.source} "
                    f"(limit {limits.handshakes_per_source})")
        if self.handshaking >= limits.connections:
            return f"too many handshakes in progress (limit {limits.connections})"
        self.handshaking += 1
        self._per_source[ticket.source] += 1
        ticket.handshaking = True
        return None

    def _end_handshake(self, ticket: Ticket) -> None:
        if ticket.handshaking:
            ticket.handshaking = False
            self.handshaking -= 1
            self._per_source[ticket.source] -= 1
            if not self._per_source[ticket.source]:
                del self._per_source[ticket.source]

    # -- connection slots -------------------------------------------------------

    def admit(self, ticket: Ticket, identity: Identity) -> tuple[p.ErrorCode, str] | None:
        """Move a verified connection to a connection slot, or say why it is refused."""
        limits = self.limits
        admin = identity.role is Role.ADMIN
        share = (identity.name, admin)
        if self._per_identity[share] >= limits.per_identity:
            return (p.ErrorCode.LIMIT_EXCEEDED,
                    f"too many connections for {identity.name} "
                    f"(limit {limits.per_identity} per identity)")
        if admin and self.welcomed >= limits.connections:
            return (p.ErrorCode.UNAVAILABLE,
                    f"server busy: too many connections (limit {limits.connections})")
        open_to_all = limits.connections - limits.admin_reserved
        if not admin and self.welcomed - self.welcomed_admin >= open_to_all:
            reserve = (f", {limits.admin_reserved} more reserved for admin"
                       if limits.admin_reserved else "")
            return (p.ErrorCode.UNAVAILABLE,
                    f"server busy: too many connections (limit {open_to_all}{reserve})")
        if not admin and self.welcomed >= limits.connections:  # admins use the rest
            return (p.ErrorCode.UNAVAILABLE,
                    f"server busy: too many connections (limit {limits.connections})")
        self._end_handshake(ticket)
        ticket.identity = identity
        self.welcomed += 1
        self.welcomed_admin += admin
        self._per_identity[share] += 1
        return None

    def release(self, ticket: Ticket) -> None:
        self._end_handshake(ticket)
        identity, ticket.identity = ticket.identity, None
        if identity is not None:
            admin = identity.role is Role.ADMIN
            share = (identity.name, admin)
            self.welcomed -= 1
            self.welcomed_admin -= admin
            self._per_identity[share] -= 1
            if not self._per_identity[share]:
                del self._per_identity[share]

    # -- descriptors for jobs ---------------------------------------------------

    def descriptors_short(self, in_use: int, *, admin: bool) -> str | None:
        """Why a start must be refused now (``in_use``: descriptors open), or None.

        A non-admin start must leave ADMIN_FD_RESERVE free beyond what the
        connection slots not taken yet may claim; an admin start only the last
        LAST_FD_RESERVE.
        """
        soft = nofile_soft_limit()
        if soft is None:
            return None
        free = soft - in_use - FDS_PER_START * (self.starts_in_progress + 1)
        if free < LAST_FD_RESERVE:
            return ("server is out of file descriptors: the last ones are kept for "
                    "stopping jobs (raise jobd's limit: LimitNOFILE=, ulimit -n)")
        if admin:
            return None
        limits = self.limits
        promised = (FDS_PER_CONNECTION * (limits.connections - self.welcomed)
                    + FDS_PER_HANDSHAKE * (limits.connections - self.handshaking))
        if free - promised < ADMIN_FD_RESERVE:
            return ("server is short of file descriptors: the last ones are reserved "
                    "for admin (raise jobd's limit: LimitNOFILE=, ulimit -n)")
        return None


def descriptors_in_use() -> int:
    """How many descriptors this process has open (run in a worker thread: with
    tens of thousands open, listing them takes milliseconds)."""
    return len(os.listdir("/proc/self/fd"))


def descriptors_at_most() -> int | None:
    """An upper bound of the descriptors open, cheap enough for the event loop:
    the size of this process's descriptor table (``FDSize`` in /proc/self/status,
    a power of two above the highest descriptor open). None if unreadable."""
    try:
        with open("/proc/self/status", "rb") as f:
            text = f.read()
    except OSError:
        return None
    at = text.find(b"\nFDSize:")
    if at < 0:
        return None
    return int(text[at + 8:text.index(b"\n", at + 1)])
