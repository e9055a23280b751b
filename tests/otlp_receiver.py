"""A real OTLP/HTTP receiver for the telemetry tests: what a Collector's otlp
receiver does, on loopback, keeping what it decodes.

It answers POSTs on /v1/traces, /v1/metrics and /v1/logs (protobuf bodies,
gzip or not) with an empty protobuf success response, decodes each body with
the OTLP protobuf classes (opentelemetry-proto), and keeps flattened spans,
metric points and log records. Tests wait for what they expect with
:meth:`OtlpReceiver.wait_for`, on a condition variable that every request
notifies: no sleeps, one deadline.
"""

from __future__ import annotations

import gzip
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, TypeVar

from opentelemetry.proto.collector.logs.v1.logs_service_pb2 import (
    ExportLogsServiceRequest,
    ExportLogsServiceResponse,
)
from opentelemetry.proto.collector.metrics.v1.metrics_service_pb2 import (
    ExportMetricsServiceRequest,
    ExportMetricsServiceResponse,
)
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
    ExportTraceServiceResponse,
)

T = TypeVar("T")
#: How long a test waits for telemetry that the exporters send every few hundred
#: milliseconds: generous, for a loaded 2-core machine.
WAIT_TIMEOUT = 30.0


def _value(v: Any) -> Any:
    kind = v.WhichOneof("value")
    if kind == "array_value":
        return [_value(x) for x in v.array_value.values]
    return getattr(v, kind) if kind else None


def attributes(kvs: Any) -> dict[str, Any]:
    return {kv.key: _value(kv.value) for kv in kvs}


@dataclass
class Span:
    name: str
    trace_id: str
    span_id: str
    parent_span_id: str
    kind: int
    attributes: dict[str, Any]
    links: list[tuple[str, str]]
    status_code: int
    start_ns: int
    end_ns: int
    resource: dict[str, Any]


@dataclass
class Point:
    """One metric data point of one export (the SDK exports cumulative values)."""

    name: str
    unit: str
    attributes: dict[str, Any]
    value: float
    batch: int


@dataclass
class LogRecord:
    event_name: str
    body: str
    severity_text: str
    attributes: dict[str, Any]
    trace_id: str
    span_id: str


@dataclass
class OtlpReceiver:
    port: int = 0
    spans: list[Span] = field(default_factory=list)
    points: list[Point] = field(default_factory=list)
    logs: list[LogRecord] = field(default_factory=list)
    paths: list[str] = field(default_factory=list)
    batches: int = 0
    cond: threading.Condition = field(default_factory=threading.Condition)

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def wait_for(self, what: str, find: Callable[[], T | None],
                 timeout: float = WAIT_TIMEOUT) -> T:
        """Wait until ``find()`` (called under the lock) returns something not None."""
        deadline = time.monotonic() + timeout
        with self.cond:
            while True:
                found = find()
                if found is not None:
                    return found
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise AssertionError(f"no {what} within {timeout}s; received: "
                                         f"{[s.name for s in self.spans]} "
                                         f"{sorted({q.name for q in self.points})} "
                                         f"{[r.event_name for r in self.logs]}")
                self.cond.wait(remaining)

    def span(self, name: str, **attrs: Any) -> Span | None:
        for s in self.spans:
            if s.name == name and all(s.attributes.get(k) == v for k, v in attrs.items()):
                return s
        return None

    def metric(self, name: str, **attrs: Any) -> list[Point]:
        """The points of ``name`` whose attributes include ``attrs``, oldest first."""
        return [q for q in self.points
                if q.name == name and all(q.attributes.get(k) == v for k, v in attrs.items())]

    def log(self, event_name: str, **attrs: Any) -> LogRecord | None:
        for r in self.logs:
            if r.event_name == event_name and all(
                    r.attributes.get(k) == v for k, v in attrs.items()):
                return r
        return None

    # -- decoding (called with the lock held) ------------------------------------------

    def _traces(self, body: bytes) -> None:
        request = ExportTraceServiceRequest.FromString(body)
        for rs in request.resource_spans:
            resource = attributes(rs.resource.attributes)
            for ss in rs.scope_spans:
                for s in ss.spans:
                    self.spans.append(Span(
                        s.name, s.trace_id.hex(), s.span_id.hex(), s.parent_span_id.hex(),
                        s.kind, attributes(s.attributes),
                        [(link.trace_id.hex(), link.span_id.hex()) for link in s.links],
                        s.status.code, s.start_time_unix_nano, s.end_time_unix_nano,
                        resource))

    def _metrics(self, body: bytes) -> None:
        request = ExportMetricsServiceRequest.FromString(body)
        self.batches += 1
        for rm in request.resource_metrics:
            for sm in rm.scope_metrics:
                for m in sm.metrics:
                    kind = m.WhichOneof("data")
                    for dp in getattr(m, kind).data_points:
                        if kind == "histogram":
                            value: float = dp.count
                        else:
                            value = getattr(dp, dp.WhichOneof("value"))
                        self.points.append(Point(m.name, m.unit, attributes(dp.attributes),
                                                 value, self.batches))

    def _logs(self, body: bytes) -> None:
        request = ExportLogsServiceRequest.FromString(body)
        for rl in request.resource_logs:
            for sl in rl.scope_logs:
                for r in sl.log_records:
                    self.logs.append(LogRecord(
                        r.event_name, r.body.string_value, r.severity_text,
                        attributes(r.attributes), r.trace_id.hex(), r.span_id.hex()))


_ROUTES: dict[str, tuple[Callable[[OtlpReceiver, bytes], None], Any]] = {
    "/v1/traces": (OtlpReceiver._traces, ExportTraceServiceResponse),
    "/v1/metrics": (OtlpReceiver._metrics, ExportMetricsServiceResponse),
    "/v1/logs": (OtlpReceiver._logs, ExportLogsServiceResponse),
}


@contextmanager
def otlp_receiver() -> Iterator[OtlpReceiver]:
    receiver = OtlpReceiver()

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
            if self.headers.get("Content-Encoding") == "gzip":
                body = gzip.decompress(body)
            route = _ROUTES.get(self.path)
            if route is None:
                self.send_error(404)
                return
            decode, response = route
            with receiver.cond:
                receiver.paths.append(self.path)
                decode(receiver, body)
                receiver.cond.notify_all()
            payload = response().SerializeToString()
            self.send_response(200)
            self.send_header("Content-Type", "application/x-protobuf")
            self.send_header("Content-Length", str(len(payload)))
            self.end_headers()
            self.wfile.write(payload)

        def log_message(self, format: str, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    receiver.port = server.server_address[1]
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield receiver
    finally:
        server.shutdown()
        server.server_close()
        thread.join(10)
