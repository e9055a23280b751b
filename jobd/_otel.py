"""The OpenTelemetry implementation of jobd's telemetry hooks (``--telemetry otlp``).

Imported only by :func:`jobd._telemetry_factory.open_telemetry`, and only with
``--telemetry otlp``: this is the one module of jobd that imports
``opentelemetry`` (the ``jobd[otel]`` extra).

Theory of operation
-------------------

Configuration is the SDK's own, from the standard environment variables:
``OTEL_EXPORTER_OTLP_ENDPOINT`` (and the per-signal ``..._TRACES_ENDPOINT``
etc.), ``OTEL_EXPORTER_OTLP_HEADERS``, ``..._CERTIFICATE``,
``..._CLIENT_CERTIFICATE``, ``..._CLIENT_KEY``, ``..._TIMEOUT``,
``..._COMPRESSION``, ``OTEL_SERVICE_NAME``, ``OTEL_RESOURCE_ATTRIBUTES``,
``OTEL_BSP_*``, ``OTEL_BLRP_*``, ``OTEL_METRIC_EXPORT_INTERVAL``. jobd builds
no exporter option itself, so every variable works as the OTel documentation
says. The transport is OTLP over HTTP with protobuf bodies; an
``OTEL_EXPORTER_OTLP_PROTOCOL`` asking for anything else is a start-up error.

Spans. A connection is a ``jobd.connection`` span (SERVER) from accept to
close. Each request is a ``jobd.<type>`` span (SERVER): the child of the
client's ``traceparent`` when the request carries a valid one (with a link
to its connection's span), else of the connection span. A job is a
``jobd.job`` span from its start to its end, the root of its own trace (a
job may run for days; its request's trace should not), with a link to the
request span that started it. The request span is the current span while the
request is handled; the engine spawns the job's task from there, so the job's
task inherits it (Trio copies the context of the spawning task), which is
how ``job_event("started")`` finds the span to link to. From then on the
job's task carries the job span as its current span.

Context is kept with the ``opentelemetry.context`` API, which uses
contextvars: each Trio task has its own, so the spans of concurrent
connections never mix. A connection's span is attached in the task that
runs the connection, and detached when it closes.

Logs. Each event of the event log also becomes an OTel log record
(``event_name`` ``jobd.<event>``, the fields as attributes, the text line as
body) with the current span's context: a request's events carry the request
span, a job's carry the job span.

Metrics. Counters and up-down counters are updated by the hooks, on the
event loop. The observable ones (output bytes written and dropped, log disk
usage) are read by the SDK's metric reader in its own thread at each export:
the bytes of the running jobs are read on the event loop
(``trio.from_thread.run_sync``, so nothing races with the loop), the disk
usage by scanning the logs directory in the reader's thread.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import socket
import threading
import time
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

import trio
from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry._logs import SeverityNumber
from opentelemetry.exporter.otlp.proto.http._log_exporter import OTLPLogExporter
from opentelemetry.exporter.otlp.proto.http.metric_exporter import OTLPMetricExporter
from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
from opentelemetry.metrics import CallbackOptions, Observation
from opentelemetry.sdk._logs import LoggerProvider
from opentelemetry.sdk._logs.export import BatchLogRecordProcessor
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import PeriodicExportingMetricReader
from opentelemetry.sdk.resources import (
    HOST_NAME,
    SERVICE_INSTANCE_ID,
    SERVICE_NAME,
    SERVICE_VERSION,
    OTELResourceDetector,
    Resource,
)
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor
from opentelemetry.trace import Link, SpanKind, Status, StatusCode
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

import protocol as p
from jobd._log import EventLog, format_fields
from jobd._telemetry import ConnectionTelemetry, Telemetry, TelemetryError

if TYPE_CHECKING:
    from jobd.engine import JobManager

#: The only OTLP transport jobd ships (opentelemetry-exporter-otlp-proto-http).
PROTOCOL = "http/protobuf"
_PROTOCOL_VARIABLES = ("OTEL_EXPORTER_OTLP_PROTOCOL", "OTEL_EXPORTER_OTLP_TRACES_PROTOCOL",
                       "OTEL_EXPORTER_OTLP_METRICS_PROTOCOL", "OTEL_EXPORTER_OTLP_LOGS_PROTOCOL")
#: How long shutdown waits for the last export of all three signals together: a
#: collector that is down must not hold up jobd's exit (systemd's stop timeout).
SHUTDOWN_TIMEOUT = 5.0
#: After aborting the exports still retrying, how long shutdown waits for them.
ABORT_TIMEOUT = 1.0
#: Request durations, seconds: the buckets of OTel's http.server.request.duration,
#: from a 5 ms status round trip to a 10 s stop (streams run longer: last bucket).
DURATION_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0,
                    7.5, 10.0)
#: Result code of a request answered with a result, as ``jobd.result.code``.
OK = "ok"
#: Error codes that are jobd's fault, not the caller's: the request span's status is ERROR.
_SERVER_FAULTS = frozenset({p.ErrorCode.INTERNAL, p.ErrorCode.UNAVAILABLE})
_SEVERITY = {"debug": SeverityNumber.DEBUG, "info": SeverityNumber.INFO,
             "warning": SeverityNumber.WARN, "error": SeverityNumber.ERROR}
_PROPAGATOR = TraceContextTextMapPropagator()
#: Longest string jobd puts in a span attribute or a log record: clients choose
#: some of them (argv, up to 256 KiB), and a collector should not pay for that.
MAX_VALUE = 4096


def _cut(text: str) -> str:
    return text if len(text) <= MAX_VALUE else text[:MAX_VALUE - 3] + "..."


#: The SDK's own warnings and errors (an unreachable collector: one per retry and
#: per dropped batch, each signal, multi-line) become at most one event-log line
#: per this many seconds; the line counts what it stands for.
SDK_LOG_INTERVAL = 60.0
#: Longest SDK message kept (its first line only).
SDK_MESSAGE_MAX = 300


class SdkLogHandler(logging.Handler):
    """The ``opentelemetry`` logger's records, into jobd's event log.

    One line (``telemetry-export-failed`` for export trouble, else
    ``telemetry-sdk``), in jobd's format, with the first line of the SDK's
    message; at most one per SDK_LOG_INTERVAL, carrying how many batches were
    dropped in all and how many messages it stands for. After :meth:`close`
    (shutdown) nothing more is written. Called from the SDK's threads; a record
    emitted while this handler writes (the event log's own OTel record) is only
    counted, never written, so it cannot loop.
    """

    def __init__(self, log: EventLog) -> None:
        super().__init__(logging.WARNING)
        self._log = log
        self._mutex = threading.Lock()
        self._busy = threading.local()
        self._last = -math.inf
        self._suppressed = 0
        self.dropped = 0
        #: The last export attempt failed (as far as the SDK's messages tell).
        self.failing = False
        self._closed = False

    def emit(self, record: logging.LogRecord) -> None:
        try:
            message = record.getMessage()
        except (TypeError, ValueError):
            message = str(record.msg)
        first = message.strip().splitlines()[0] if message.strip() else "(empty)"
        export = "export" in message or "batch" in message
        with self._mutex:
            if message.startswith(("Failed to export", "Dropping")):
                self.dropped += 1
            if export:
                self.failing = True
            now = time.monotonic()
            if self._closed or getattr(self._busy, "on", False) \
                    or now - self._last < SDK_LOG_INTERVAL:
                self._suppressed += 1
                return
            self._last = now
            suppressed, self._suppressed = self._suppressed, 0
            dropped = self.dropped
        # Newer SDKs say "connection" in the message; older ones (1.38) log
        # "Exception while exporting ..." with the ConnectionError attached.
        raised = record.exc_info[1] if record.exc_info else None
        if "Connection" in message or "connect" in message or isinstance(raised, OSError):
            first = "collector unreachable: " + first
        self._busy.on = True
        try:
            self._log.warning("telemetry-export-failed" if export else "telemetry-sdk",
                              reason=first[:SDK_MESSAGE_MAX], batches_dropped=dropped,
                              messages_suppressed=suppressed)
        finally:
            self._busy.on = False

    def close(self) -> None:
        with self._mutex:
            self._closed = True
        super().close()


def route_sdk_logs(log: EventLog) -> SdkLogHandler:
    """Send the SDK's own log records through ``log`` (and nowhere else)."""
    handler = SdkLogHandler(log)
    logger = logging.getLogger("opentelemetry")
    logger.handlers[:] = [handler]
    logger.propagate = False
    logger.setLevel(logging.WARNING)
    return handler


def open_otel(service_version: str, log: EventLog | None = None) -> OtelTelemetry:
    for name in _PROTOCOL_VARIABLES:
        value = os.environ.get(name, "").strip()
        if value and value != PROTOCOL:
            raise TelemetryError(f"{name}={value} is not supported: jobd exports OTLP over "
                                 f"{PROTOCOL} only (set it to {PROTOCOL} or unset it)")
    # Attributes given here override the environment's: only the version is ours.
    resource = Resource.create({SERVICE_VERSION: service_version})
    defaults: dict[str, str] = {}
    if str(resource.attributes.get(SERVICE_NAME, "")).startswith("unknown_service"):
        # Neither OTEL_SERVICE_NAME nor OTEL_RESOURCE_ATTRIBUTES named it.
        defaults[SERVICE_NAME] = "jobd"
    if SERVICE_INSTANCE_ID not in OTELResourceDetector().detect().attributes:
        # Tells the hosts of a fleet apart (Prometheus' "instance" label) and stays
        # the same across restarts, unlike the SDK's default (a random UUID). One
        # jobd per host is the rule; several set it in OTEL_RESOURCE_ATTRIBUTES.
        defaults[SERVICE_INSTANCE_ID] = socket.gethostname()
    if HOST_NAME not in resource.attributes:
        defaults[HOST_NAME] = socket.gethostname()
    resource = resource.merge(Resource(defaults))
    sdk_log = route_sdk_logs(log) if log is not None else None
    exporters = (OTLPSpanExporter(), OTLPMetricExporter(), OTLPLogExporter())
    tracer_provider = TracerProvider(resource=resource, shutdown_on_exit=False)
    tracer_provider.add_span_processor(BatchSpanProcessor(exporters[0]))
    meter_provider = MeterProvider(
        resource=resource, shutdown_on_exit=False,
        metric_readers=[PeriodicExportingMetricReader(exporters[1])])
    logger_provider = LoggerProvider(resource=resource, shutdown_on_exit=False)
    logger_provider.add_log_record_processor(BatchLogRecordProcessor(exporters[2]))
    telemetry = OtelTelemetry(tracer_provider, meter_provider, logger_provider, service_version)
    telemetry.exporters = exporters
    telemetry.sdk_log = sdk_log
    return telemetry


def _attr(value: Any) -> Any:
    """A log field as an OTel attribute value (str, bool, int, float, or a list of them)."""
    if value is None or isinstance(value, bool | int | float):
        return value
    if isinstance(value, str):
        return _cut(value)
    if isinstance(value, bytes):
        return _cut(os.fsdecode(value))
    return _cut(str(value))


def _disk_usage(directory: Path, depth: int) -> int:
    """Bytes allocated to the files under ``directory`` (``logs/<shard>/<id>.log``:
    two levels), symlinks not followed. Runs in the metric reader's thread."""
    total = 0
    with os.scandir(directory) as entries:
        for entry in entries:
            try:
                if entry.is_dir(follow_symlinks=False):
                    if depth > 1:
                        total += _disk_usage(Path(entry.path), depth - 1)
                    continue
                total += entry.stat(follow_symlinks=False).st_blocks * 512
            except OSError:
                continue
    return total


def _job_id(request: p.Message) -> int | None:
    job = getattr(request, "job", None)
    return job if isinstance(job, int) else None


class OtelTelemetry(Telemetry):
    enabled = True

    def __init__(self, tracer_provider: TracerProvider, meter_provider: MeterProvider,
                 logger_provider: LoggerProvider, version: str) -> None:
        self._providers = (tracer_provider, meter_provider, logger_provider)
        self.exporters: tuple[Any, ...] = ()
        self.sdk_log: SdkLogHandler | None = None
        self.tracer = tracer_provider.get_tracer("jobd", version)
        self._logger = logger_provider.get_logger("jobd", version)
        meter = meter_provider.get_meter("jobd", version)
        self.running = meter.create_up_down_counter(
            "jobd.jobs.running", "{job}", "Jobs running now, by owner")
        self.started = meter.create_counter(
            "jobd.jobs.started", "{job}", "Jobs whose command started")
        self.ended = meter.create_counter(
            "jobd.jobs.ended", "{job}", "Jobs that ended, by final state")
        self.spawn_failures = meter.create_counter(
            "jobd.jobs.spawn_failures", "{job}", "Start requests whose command could not run")
        self.stops = meter.create_counter(
            "jobd.jobs.stops", "{job}",
            "Stopped jobs, by the signal that ended them (or exited)")
        self.oom_kills = meter.create_counter(
            "jobd.jobs.oom_kills", "{job}", "Jobs ended by the kernel's out-of-memory killer")
        self.streamed = meter.create_counter(
            "jobd.output.streamed", "By", "Output bytes sent to clients")
        self.connections = meter.create_up_down_counter(
            "jobd.connections.open", "{connection}", "Client connections open now")
        self.refusals = meter.create_counter(
            "jobd.connections.refused", "{connection}",
            "Connections refused before the welcome, by reason")
        self.duration = meter.create_histogram(
            "jobd.request.duration", "s", "Time from a request's arrival to its answer, by type",
            explicit_bucket_boundaries_advisory=DURATION_BUCKETS)
        self.streams = meter.create_up_down_counter(
            "jobd.streams.active", "{stream}", "Stream and output answers in progress")
        meter.create_observable_counter(
            "jobd.output.written", [self._observe_written], "By",
            "Output bytes kept in the jobs' logs")
        meter.create_observable_counter(
            "jobd.output.dropped", [self._observe_dropped], "By",
            "Output bytes drained but dropped (output cap or full disk)")
        meter.create_observable_gauge(
            "jobd.log.disk_usage", [self._observe_disk], "By",
            "Disk space the output logs take")
        # Job spans and what the byte counters need, by job ID (event loop only).
        self._jobs: dict[int, trace.Span] = {}
        self._ended_written = 0
        self._ended_dropped = 0
        self._manager: JobManager | None = None
        self._token: trio.lowlevel.TrioToken | None = None
        self._logs_dir: Path | None = None
        self._last_bytes = (0, 0)

    # -- connections --------------------------------------------------------------

    def connection(self, peer: str) -> ConnectionTelemetry:
        return _OtelConnection(self, peer)

    def connection_dropped(self, peer: str, kind: str, reason: str) -> None:
        conn = _OtelConnection(self, peer)
        conn.refused(kind, reason)
        conn.closed()

    # -- jobs ---------------------------------------------------------------------

    def job_event(self, kind: str, status: p.JobStatus) -> None:
        if kind == "started":
            self._job_started(status)
        elif kind == "ended":
            self._job_ended(status)
        elif kind == "lost":  # found running by a new jobd; never started by this one
            self.ended.add(1, {"jobd.job.state": status.state.value})
        # "pruned" (retention removed an ended job): nothing to report.

    def _job_started(self, status: p.JobStatus) -> None:
        self.running.add(1, {"jobd.job.owner": status.owner})
        self.started.add(1)
        # Called in the job's task, which inherited the start request's context.
        request = trace.get_current_span().get_span_context()
        links = [Link(request)] if request.is_valid else []
        span = self.tracer.start_span(
            "jobd.job", context=otel_context.Context(), kind=SpanKind.INTERNAL, links=links,
            start_time=int((status.started or status.created) * 1e9),
            attributes=self._job_attributes(status))
        self._jobs[status.id] = span
        # The job's task (its own contextvars) carries the job span from now on: its
        # events are logged in the job's trace. The task ends with the job.
        otel_context.attach(trace.set_span_in_context(span))

    def _job_ended(self, status: p.JobStatus) -> None:
        state = status.state.value
        self.ended.add(1, {"jobd.job.state": state})
        span = self._jobs.pop(status.id, None)
        if span is None:  # it never ran (spawn failure): a span of its own, at once
            self.spawn_failures.add(1)
            span = self.tracer.start_span(
                "jobd.job", context=otel_context.Context(), kind=SpanKind.INTERNAL,
                start_time=int(status.created * 1e9), attributes=self._job_attributes(status),
                links=self._current_link())
        else:
            self.running.add(-1, {"jobd.job.owner": status.owner})
        self._ended_written += status.output_bytes
        self._ended_dropped += status.dropped_bytes
        if status.state is p.JobState.STOPPED:
            self.stops.add(1, {"jobd.job.signal": status.signal or "exited"})
        if status.oom:
            self.oom_kills.add(1)
        end: dict[str, Any] = {
            "jobd.job.state": state, "jobd.job.status": _cut(status.describe()),
            "jobd.job.output_bytes": status.output_bytes,
            "jobd.job.dropped_bytes": status.dropped_bytes, "jobd.job.oom": status.oom,
        }
        for key, value in (("process.exit.code", status.exit_code),
                           ("jobd.job.signal", status.signal),
                           ("jobd.job.error", _cut(status.error) if status.error else None),
                           ("jobd.job.peak_memory", status.peak_memory),
                           ("jobd.job.cpu_time", status.cpu_time)):
            if value is not None:
                end[key] = value
        span.set_attributes(end)
        if status.state is p.JobState.ERROR:
            span.set_status(Status(StatusCode.ERROR, _cut(status.error or "error")))
        span.end(end_time=int((status.ended or time.time()) * 1e9))

    @staticmethod
    def _current_link() -> list[Link]:
        current = trace.get_current_span().get_span_context()
        return [Link(current)] if current.is_valid else []

    @staticmethod
    def _job_attributes(status: p.JobStatus) -> dict[str, Any]:
        out: dict[str, Any] = {
            "jobd.job.id": status.id, "jobd.job.owner": status.owner,
            "process.command": _cut(os.fsdecode(status.argv[0])) if status.argv else "",
        }
        if status.pid is not None:
            out["process.pid"] = status.pid
        limits = status.limits
        if limits is not None:
            for key, value in (("memory", limits.memory), ("cpus", limits.cpus),
                               ("pids", limits.pids)):
                if value is not None:
                    out[f"jobd.job.limits.{key}"] = value
            if limits.isolate:
                out["jobd.job.limits.isolate"] = list(limits.isolate)
            for key, rates in (("io_read_bps", limits.io_read_bps),
                               ("io_write_bps", limits.io_write_bps)):
                if rates:
                    out[f"jobd.job.limits.{key}"] = [f"{dev}={rate}" for dev, rate in rates]
        return out

    # -- observable metrics ---------------------------------------------------------

    def watch(self, manager: JobManager, state_dir: Path) -> None:
        self._manager = manager
        self._token = trio.lowlevel.current_trio_token()
        self._logs_dir = state_dir / "logs"

    def _bytes_now(self) -> tuple[int, int]:
        """Output bytes written and dropped, ended jobs and running ones (event loop)."""
        written, dropped = self._ended_written, self._ended_dropped
        if self._manager is not None:
            for job_id in list(self._jobs):
                try:
                    status = self._manager.status(job_id)
                except Exception:  # deleted or gone meanwhile
                    continue
                written += status.output_bytes
                dropped += status.dropped_bytes
        return written, dropped

    def _bytes(self) -> tuple[int, int]:
        """``_bytes_now`` from the metric reader's thread; the last values once the loop
        is gone (the final export at shutdown)."""
        if self._token is not None:
            try:
                self._last_bytes = trio.from_thread.run_sync(self._bytes_now,
                                                             trio_token=self._token)
            except (trio.RunFinishedError, RuntimeError):
                self._last_bytes = max(self._last_bytes, (self._ended_written,
                                                          self._ended_dropped))
        return self._last_bytes

    def _observe_written(self, options: CallbackOptions) -> Iterable[Observation]:
        return [Observation(self._bytes()[0])]

    def _observe_dropped(self, options: CallbackOptions) -> Iterable[Observation]:
        return [Observation(self._bytes()[1])]

    def _observe_disk(self, options: CallbackOptions) -> Iterable[Observation]:
        if self._logs_dir is None:
            return []
        try:
            return [Observation(_disk_usage(self._logs_dir, depth=2))]
        except OSError:
            return []

    # -- logs -------------------------------------------------------------------------

    def log_record(self, event: str, level: str, fields: Mapping[str, Any]) -> None:
        with contextlib.suppress(Exception):  # telemetry must never take the event log down
            self._logger.emit(
                timestamp=time.time_ns(), severity_number=_SEVERITY.get(level),
                severity_text=level.upper(), event_name=f"jobd.{event}",
                body=_cut(" ".join([event, *format_fields(fields)])),
                attributes={f"jobd.{k}": _attr(v) for k, v in fields.items() if v is not None})

    # -- shutdown -----------------------------------------------------------------------

    def shutdown(self) -> None:
        """Shut the three providers down in parallel (their last export), waiting
        SHUTDOWN_TIMEOUT at most; then stop every export still retrying. With the
        collector already failing, stop the retries at once: nothing would get
        through, and jobd's exit should not wait for it. The SDK says nothing
        more after this."""
        for span in self._jobs.values():  # jobs abandoned by an aborted shutdown
            span.end()
        self._jobs.clear()
        if self.sdk_log is not None and self.sdk_log.failing:
            self._abort_exports()
        threads = [threading.Thread(target=provider.shutdown, daemon=True,
                                    name=f"jobd-otel-shutdown-{type(provider).__name__}")
                   for provider in self._providers]
        for thread in threads:
            thread.start()
        deadline = time.monotonic() + SHUTDOWN_TIMEOUT
        for thread in threads:
            thread.join(max(0.0, deadline - time.monotonic()))
        if any(thread.is_alive() for thread in threads):
            self._abort_exports()
            for thread in threads:
                thread.join(ABORT_TIMEOUT)
        if self.sdk_log is not None:
            self.sdk_log.close()

    def _abort_exports(self) -> None:
        """End the exporters' retry waits: an export in progress fails at once."""
        for exporter in self.exporters:
            with contextlib.suppress(Exception):
                exporter.shutdown()


class _OtelConnection(ConnectionTelemetry):
    __slots__ = ("_code", "_outcome", "_request", "_span", "_t", "_token", "identity")

    def __init__(self, t: OtelTelemetry, peer: str) -> None:
        self._t = t
        host, _, port = peer.rpartition(":")
        attributes: dict[str, Any] = {"network.peer.address": host.strip("[]")}
        if port.isdigit():
            attributes["network.peer.port"] = int(port)
        self._span = t.tracer.start_span("jobd.connection", context=otel_context.Context(),
                                         kind=SpanKind.SERVER, attributes=attributes)
        self._token: object | None = otel_context.attach(trace.set_span_in_context(self._span))
        self._outcome: str | None = None
        self._request: trace.Span | None = None
        self._code: str | None = None
        self.identity: str | None = None
        t.connections.add(1)

    def refused(self, kind: str, reason: str) -> None:
        if self._outcome is not None:  # the first reason is the one that counted
            return
        self._outcome = "refused"
        self._span.set_attributes({"jobd.connection.outcome": "refused",
                                   "jobd.refusal.kind": kind,
                                   "jobd.refusal.reason": _cut(reason)})
        self._span.set_status(Status(StatusCode.ERROR, _cut(reason)))
        self._t.refusals.add(1, {"jobd.refusal.kind": kind})

    def welcomed(self, identity: str, role: str, tls_version: str | None) -> None:
        self._outcome = "welcomed"
        self.identity = identity
        attributes = {"jobd.connection.outcome": "welcomed", "jobd.client.identity": identity,
                      "jobd.client.role": role}
        if tls_version:  # "TLSv1.3"
            attributes["tls.protocol.name"] = "tls"
            attributes["tls.protocol.version"] = tls_version.removeprefix("TLSv")
        self._span.set_attributes(attributes)

    @contextmanager
    def _handle(self, request: p.Message) -> Iterator[None]:
        t = self._t
        kind = getattr(request, "TYPE", type(request).__name__)
        attributes: dict[str, Any] = {"jobd.request.type": kind}
        if self.identity is not None:
            attributes["jobd.client.identity"] = self.identity
        job = _job_id(request)
        if job is not None:
            attributes["jobd.job.id"] = job
        parent = self._span
        links: list[Link] = []
        traceparent = getattr(request, "traceparent", None)
        context = trace.set_span_in_context(parent)
        if traceparent:
            remote = _PROPAGATOR.extract({"traceparent": traceparent})
            if trace.get_current_span(remote).get_span_context().is_valid:
                context = remote
                links = [Link(parent.get_span_context())]
        span = t.tracer.start_span(f"jobd.{kind}", context=context, kind=SpanKind.SERVER,
                                   attributes=attributes, links=links)
        token = otel_context.attach(trace.set_span_in_context(span))
        streaming = isinstance(request, p.Stream | p.Output)
        if streaming:
            t.streams.add(1)
        self._request, self._code = span, None
        began = time.monotonic()
        code = "cancelled"
        try:
            yield
            # No answer recorded: the response was cancelled (a stream whose client left).
            code = self._code or "cancelled"
            if self._code is None:
                span.set_attribute("jobd.result.code", code)
        except BaseException as exc:
            # The answer was not delivered: the client went away, or jobd is stopping.
            code = "connection_lost" if isinstance(
                exc, trio.BrokenResourceError | trio.ClosedResourceError) else "cancelled"
            span.set_attribute("jobd.result.code", code)
            raise
        finally:
            self._request = None
            if streaming:
                t.streams.add(-1)
            t.duration.record(time.monotonic() - began,
                              {"jobd.request.type": kind, "jobd.result.code": code})
            otel_context.detach(token)
            span.end()

    def request(self, request: p.Message) -> Any:
        return self._handle(request)

    def replied(self, reply: p.Message) -> None:
        span = self._request
        if span is None:
            return
        if isinstance(reply, p.Error):
            self._code = reply.code.value
            span.set_attributes({"jobd.result.code": reply.code.value,
                                 "error.type": reply.code.value})
            if reply.code in _SERVER_FAULTS:
                span.set_status(Status(StatusCode.ERROR, reply.message))
            return
        self._code = OK
        span.set_attribute("jobd.result.code", OK)
        status = getattr(reply, "status", None)
        if isinstance(reply, p.Started) and isinstance(status, p.JobStatus):
            span.set_attributes({"jobd.job.id": status.id, "jobd.job.state": status.state.value})

    def streamed(self, nbytes: int) -> None:
        self._t.streamed.add(nbytes)

    def closed(self) -> None:
        if self._outcome is None:
            self.refused("closed", "closed before the welcome")
        self._t.connections.add(-1)
        if self._token is not None:
            # Attached in this task's context; should it not be, there is nothing to undo.
            with contextlib.suppress(Exception):
                otel_context.detach(self._token)  # type: ignore[arg-type]
            self._token = None
        self._span.end()


__all__ = ["OtelTelemetry", "open_otel"]
