"""Telemetry hooks: what jobd tells OpenTelemetry, and nothing at all when off.

Theory of operation
-------------------

The server calls a handful of small methods at the points worth observing: a
connection opened, refused or welcomed; a request begun and answered; output
streamed; a job started or ended; an event logged. It calls them on a
:class:`Telemetry` object (and, per connection, a :class:`ConnectionTelemetry`).

The classes in this module *are* the "off" implementation: every method does
nothing, :meth:`ConnectionTelemetry.request` hands back one shared
``nullcontext``, and this module imports nothing from ``opentelemetry``. With
``--telemetry off`` (the default), or ``OTEL_SDK_DISABLED=true``, jobd runs
these, and OpenTelemetry is never imported: the cost is one empty method call
per hook, a few per request and one per output chunk streamed.

``--telemetry otlp`` makes :func:`jobd._telemetry_factory.open_telemetry`
import ``jobd._otel``, whose subclasses implement every hook with the
OpenTelemetry SDK and export over OTLP/HTTP, configured by the standard
``OTEL_*`` environment variables. If the ``jobd[otel]`` extra is not
installed, that is a clear start-up error, never a silent "off". This module,
the interface, imports neither: the factory chooses.

The hooks must never take jobd down: the OTel implementation keeps its work
small and synchronous (the SDK's batch processors and metric reader export
from their own threads) and swallows its own errors.
"""

from __future__ import annotations

import contextlib
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from pathlib import Path

    import protocol as p
    from jobd.engine import JobManager

#: Why a connection was refused, as the ``jobd.refusal.kind`` attribute: a short
#: fixed set (metric attributes must not grow without bound; the span carries
#: the full reason).
REFUSAL_KINDS = ("tls", "identity", "busy", "shutting_down", "timeout", "bad_hello", "closed")

_NULL_CONTEXT: contextlib.nullcontext[None] = contextlib.nullcontext()


class TelemetryError(Exception):
    """Telemetry was asked for but cannot be set up (a start-up error)."""


class ConnectionTelemetry:
    """One connection's hooks; this base class does nothing."""

    __slots__ = ()

    def refused(self, kind: str, reason: str) -> None:
        """The connection is refused before its welcome (``kind``: REFUSAL_KINDS)."""

    def welcomed(self, identity: str, role: str, tls_version: str | None) -> None:
        """The client got its welcome."""

    def request(self, request: p.Message) -> contextlib.AbstractContextManager[None]:
        """Around the handling of one request, from its arrival to its answer."""
        return _NULL_CONTEXT

    def replied(self, reply: p.Message) -> None:
        """The answer to the current request (a result or an error), before it is sent."""

    def streamed(self, nbytes: int) -> None:
        """``nbytes`` of output were sent on a stream or output answer."""

    def closed(self) -> None:
        """The connection is closed (always called, last)."""


NULL_CONNECTION = ConnectionTelemetry()


class Telemetry:
    """The daemon's hooks; this base class does nothing."""

    #: Whether anything is reported (False: this no-op implementation).
    enabled = False

    def connection(self, peer: str) -> ConnectionTelemetry:
        """The hooks of a new connection from ``peer`` (``host:port``)."""
        return NULL_CONNECTION

    def connection_dropped(self, peer: str, kind: str, reason: str) -> None:
        """A connection closed at once, without a session (too many refusals at once)."""

    def job_event(self, kind: str, status: p.JobStatus) -> None:
        """The engine's job events (EngineConfig.on_event): ``started``, ``ended``,
        ``lost``, ``pruned``."""

    def watch(self, manager: JobManager, state_dir: Path) -> None:
        """Serving begins: observe ``manager``'s running jobs and the logs' disk usage."""

    def log_record(self, event: str, level: str, fields: Mapping[str, Any]) -> None:
        """An event of jobd's event log (EventLog's sink)."""

    def shutdown(self) -> None:
        """Export what is pending (bounded in time) and stop. Call once, after serving."""


NULL = Telemetry()


__all__ = [
    "NULL",
    "NULL_CONNECTION",
    "REFUSAL_KINDS",
    "ConnectionTelemetry",
    "Telemetry",
    "TelemetryError",
]
