"""OpenTelemetry: a real jobd with --telemetry otlp exporting to a real OTLP/HTTP
receiver (tests/otlp_receiver.py); and jobd with telemetry off importing none of it.
"""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import trio
from opentelemetry.sdk.trace import TracerProvider

import jobctl
import jobd
from jobd import _telemetry
from jobd._telemetry import NULL, TelemetryError
from jobd._telemetry_factory import open_telemetry

from .conftest import (
    EXIT_TIMEOUT,
    JOBCTL,
    JOBD,
    PYTHON,
    ROOT,
    RUN_CWD,
    JobdProcess,
    Pki,
    start_jobd,
)
from .otlp_receiver import OtlpReceiver, Span, otlp_receiver

SERVER_KIND = 2  # opentelemetry.proto.trace.v1.Span.SpanKind.SPAN_KIND_SERVER
STATUS_ERROR = 2  # Status.StatusCode.STATUS_CODE_ERROR
TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"
PARENT_ID = "00f067aa0ba902b7"


def base_env() -> dict[str, str]:
    """This process's environment without any OTEL_* setting a developer may have."""
    return {k: v for k, v in os.environ.items() if not k.startswith("OTEL_")
            and k != "TRACEPARENT"}


def otel_env(receiver: OtlpReceiver) -> dict[str, str]:
    return {
        **base_env(),
        "OTEL_EXPORTER_OTLP_ENDPOINT": receiver.endpoint,
        # Export often, so that the test's waits end soon (they wait on the
        # receiver, never on a clock).
        "OTEL_BSP_SCHEDULE_DELAY": "100",
        "OTEL_BLRP_SCHEDULE_DELAY": "100",
        "OTEL_METRIC_EXPORT_INTERVAL": "200",
        "OTEL_RESOURCE_ATTRIBUTES": "deployment.environment=test",
    }


@pytest.fixture
def receiver() -> Iterator[OtlpReceiver]:
    with otlp_receiver() as r:
        yield r


@pytest.fixture
def otel_jobd(pki: Pki, tmp_path: Path, receiver: OtlpReceiver) -> Iterator[JobdProcess]:
    server = start_jobd(pki, tmp_path / "state", "--telemetry", "otlp", env=otel_env(receiver))
    try:
        yield server
    finally:
        server.stop()


def start(jobd: JobdProcess, *argv: str, env: dict[str, str] | None = None) -> int:
    result = jobd.jobctl("alice", "start", *argv, env=env)
    assert result.returncode == 0, result.stderr
    return int(result.stdout)


def test_start_refusal_and_stop_are_spans(otel_jobd: JobdProcess,
                                          receiver: OtlpReceiver) -> None:
    job = start(otel_jobd, "sleep", "600")
    refused = otel_jobd.jobctl("stranger", "list")  # a certificate from another CA
    assert refused.returncode == 3
    norole = otel_jobd.jobctl("norole", "list")
    assert norole.returncode == 3
    stopped = otel_jobd.jobctl("alice", "stop", str(job))
    assert stopped.returncode == 0, stopped.stderr

    start_span = receiver.wait_for("start span", lambda: receiver.span(
        "jobd.start", **{"jobd.job.id": job}))
    assert start_span.kind == SERVER_KIND
    assert start_span.attributes["jobd.request.type"] == "start"
    assert start_span.attributes["jobd.result.code"] == "ok"
    assert start_span.attributes["jobd.client.identity"] == "alice"
    assert start_span.resource["service.name"] == "jobd"
    assert start_span.resource["deployment.environment"] == "test"
    assert start_span.resource["service.instance.id"] == socket.gethostname()
    assert start_span.resource["service.version"] == jobd.__version__

    # The request's connection: welcomed, who, what TLS; the request is its child.
    conn = receiver.wait_for("connection span", lambda: next(
        (s for s in receiver.spans if s.span_id == start_span.parent_span_id), None))
    assert conn.name == "jobd.connection"
    assert conn.attributes["jobd.connection.outcome"] == "welcomed"
    assert conn.attributes["jobd.client.identity"] == "alice"
    assert conn.attributes["jobd.client.role"] == "control"
    assert conn.attributes["tls.protocol.version"] == "1.3"
    assert conn.attributes["network.peer.address"] == "127.0.0.1"

    tls = receiver.wait_for("TLS refusal", lambda: receiver.span(
        "jobd.connection", **{"jobd.refusal.kind": "tls"}))
    assert tls.attributes["jobd.connection.outcome"] == "refused"
    assert "unable to get local issuer certificate" in tls.attributes["jobd.refusal.reason"]
    assert tls.status_code == STATUS_ERROR
    identity = receiver.wait_for("identity refusal", lambda: receiver.span(
        "jobd.connection", **{"jobd.refusal.kind": "identity"}))
    assert "certificate has no role" in identity.attributes["jobd.refusal.reason"]

    stop_span = receiver.wait_for("stop span", lambda: receiver.span(
        "jobd.stop", **{"jobd.job.id": job}))
    assert stop_span.attributes["jobd.result.code"] == "ok"

    # The job's life: its own trace, linked from the request that started it.
    job_span: Span = receiver.wait_for("job span", lambda: receiver.span(
        "jobd.job", **{"jobd.job.id": job}))
    assert job_span.attributes["jobd.job.owner"] == "alice"
    assert job_span.attributes["process.command"] == "sleep"
    assert job_span.attributes["jobd.job.state"] == "stopped"
    assert job_span.attributes["jobd.job.signal"] == "SIGINT"
    assert job_span.links == [(start_span.trace_id, start_span.span_id)]
    assert job_span.trace_id != start_span.trace_id
    assert job_span.parent_span_id == ""
    assert job_span.start_ns <= stop_span.end_ns and job_span.end_ns <= stop_span.end_ns

    # A request answered with an error names its code.
    missing = otel_jobd.jobctl("alice", "status", "999")
    assert missing.returncode == 1
    status_span = receiver.wait_for("status span", lambda: receiver.span(
        "jobd.status", **{"jobd.job.id": 999}))
    assert status_span.attributes["jobd.result.code"] == "not_found"


def test_spawn_failure_is_a_failed_job_span(otel_jobd: JobdProcess,
                                            receiver: OtlpReceiver) -> None:
    result = otel_jobd.jobctl("alice", "start", "no-such-command-here")
    assert result.returncode == 1
    job = int(result.stdout)
    span = receiver.wait_for("job span", lambda: receiver.span(
        "jobd.job", **{"jobd.job.id": job}))
    assert span.attributes["jobd.job.state"] == "error"
    assert span.attributes["jobd.job.error"] == "command not found: no-such-command-here"
    assert span.status_code == STATUS_ERROR
    receiver.wait_for("spawn failure count", lambda: receiver.metric(
        "jobd.jobs.spawn_failures") or None)


def test_running_jobs_gauge_goes_up_and_down(otel_jobd: JobdProcess,
                                             receiver: OtlpReceiver) -> None:
    job = start(otel_jobd, "sleep", "600")

    def running(value: int) -> int | None:
        points = receiver.metric("jobd.jobs.running", **{"jobd.job.owner": "alice"})
        return points[-1].batch if points and points[-1].value == value else None

    up = receiver.wait_for("running = 1", lambda: running(1))
    assert otel_jobd.jobctl("alice", "stop", str(job)).returncode == 0
    down = receiver.wait_for("running = 0", lambda: running(0))
    assert down > up
    [point] = receiver.wait_for("a stop by SIGINT", lambda: receiver.metric(
        "jobd.jobs.stops", **{"jobd.job.signal": "SIGINT"})[-1:] or None)
    assert point.value == 1
    ended = receiver.wait_for("ended", lambda: receiver.metric(
        "jobd.jobs.ended", **{"jobd.job.state": "stopped"})[-1:] or None)
    assert ended[0].value == 1
    [running_point] = receiver.metric("jobd.jobs.running")[-1:]
    assert running_point.unit == "{job}"
    # Requests were timed, by type; connections are counted open and closed.
    receiver.wait_for("start durations", lambda: receiver.metric(
        "jobd.request.duration", **{"jobd.request.type": "start"}) or None)
    assert receiver.metric("jobd.request.duration")[0].unit == "s"
    receiver.wait_for("open connections back to 0", lambda: (
        receiver.metric("jobd.connections.open")[-1:] or [None])[0]
        if receiver.metric("jobd.connections.open")
        and receiver.metric("jobd.connections.open")[-1].value == 0 else None)


def test_output_bytes_written_and_streamed(otel_jobd: JobdProcess,
                                           receiver: OtlpReceiver) -> None:
    job = start(otel_jobd, "head", "-c", "100000", "/dev/zero")
    result = otel_jobd.jobctl("alice", "stream", str(job))
    assert result.returncode == 0 and len(result.stdout) == 100_000

    def at_least(name: str, value: int) -> float | None:
        points = receiver.metric(name)
        return points[-1].value if points and points[-1].value >= value else None

    assert receiver.wait_for("written", lambda: at_least("jobd.output.written", 100_000)) \
        == 100_000
    assert receiver.wait_for("streamed", lambda: at_least("jobd.output.streamed", 100_000)) \
        == 100_000
    receiver.wait_for("disk usage", lambda: at_least("jobd.log.disk_usage", 100_000))


def test_traceparent_from_the_environment_is_the_parent(otel_jobd: JobdProcess,
                                                        receiver: OtlpReceiver) -> None:
    env = {**base_env(), "TRACEPARENT": f"00-{TRACE_ID}-{PARENT_ID}-01"}
    job = start(otel_jobd, "sleep", "600", env=env)
    assert otel_jobd.jobctl("alice", "stop", str(job), env=env).returncode == 0
    for name in ("jobd.start", "jobd.stop"):
        span = receiver.wait_for(name, lambda name=name: receiver.span(  # type: ignore[misc]
            name, **{"jobd.job.id": job}))
        assert (span.trace_id, span.parent_span_id) == (TRACE_ID, PARENT_ID)
        [(_, conn_id)] = span.links  # and it still names its connection
        conn = receiver.wait_for("connection", lambda conn_id=conn_id: next(  # type: ignore[misc]
            (s for s in receiver.spans if s.span_id == conn_id), None))
        assert conn.name == "jobd.connection"


def test_invalid_traceparent_is_ignored(otel_jobd: JobdProcess, receiver: OtlpReceiver) -> None:
    # All-zero trace ID: invalid per W3C; the request is traced as if it had none.
    env = {**base_env(), "TRACEPARENT": f"00-{'0' * 32}-{PARENT_ID}-01"}
    job = start(otel_jobd, "true", env=env)
    span = receiver.wait_for("start", lambda: receiver.span("jobd.start", **{"jobd.job.id": job}))
    assert span.parent_span_id != PARENT_ID and span.trace_id != "0" * 32


async def test_library_sends_the_current_span(otel_jobd: JobdProcess,
                                              receiver: OtlpReceiver) -> None:
    tracer = TracerProvider().get_tracer("test")
    async with jobctl.connect(otel_jobd.address, otel_jobd.port,
                              **otel_jobd.pki.files("alice")) as client:
        with tracer.start_as_current_span("script") as script:
            status = await client.start(["sleep", "600"])
            await client.stop(status.id, grace=0)
    ctx = script.get_span_context()
    for name in ("jobd.start", "jobd.stop"):
        span = await trio.to_thread.run_sync(lambda name=name: receiver.wait_for(  # type: ignore[misc]
            name, lambda: receiver.span(name, **{"jobd.job.id": status.id})))
        assert span.trace_id == f"{ctx.trace_id:032x}"
        assert span.parent_span_id == f"{ctx.span_id:016x}"


def test_event_log_records_carry_trace_context(otel_jobd: JobdProcess,
                                               receiver: OtlpReceiver) -> None:
    job = start(otel_jobd, "true")
    record = receiver.wait_for("job-started record", lambda: receiver.log(
        "jobd.job-started", **{"jobd.id": job}))
    assert record.severity_text == "INFO"
    assert record.body.startswith(f"job-started id={job} owner=alice")
    assert record.attributes["jobd.owner"] == "alice"
    job_span = receiver.wait_for("job span", lambda: receiver.span(
        "jobd.job", **{"jobd.job.id": job}))
    assert (record.trace_id, record.span_id) == (job_span.trace_id, job_span.span_id)
    ended = receiver.wait_for("job-ended record", lambda: receiver.log(
        "jobd.job-ended", **{"jobd.id": job}))
    assert ended.trace_id == job_span.trace_id
    # Events outside any request are records too, without a span.
    listening = receiver.wait_for("listening record", lambda: receiver.log("jobd.listening"))
    assert listening.trace_id == ""
    assert otel_jobd.wait_for_log(r" telemetry exporter=otlp protocol=http/protobuf "
                                  rf"endpoint={re.escape(receiver.endpoint)}$")


def test_refusal_log_record_carries_the_connection_span(otel_jobd: JobdProcess,
                                                        receiver: OtlpReceiver) -> None:
    assert otel_jobd.jobctl("norole", "list").returncode == 3
    record = receiver.wait_for("identity-refused record",
                               lambda: receiver.log("jobd.identity-refused"))
    assert record.severity_text == "WARNING"
    span = receiver.wait_for("its connection span", lambda: receiver.span(
        "jobd.connection", **{"jobd.refusal.kind": "identity"}))
    assert (record.trace_id, record.span_id) == (span.trace_id, span.span_id)


# -- off, and misconfigured -------------------------------------------------------------


def opentelemetry_imports(lines: list[str]) -> list[str]:
    return [line for line in lines if re.search(r"import time:.*\|\s*opentelemetry", line)]


@pytest.mark.parametrize("extra", [[], ["--telemetry", "otlp"]], ids=["off", "sdk-disabled"])
def test_jobd_without_telemetry_never_imports_opentelemetry(
        pki: Pki, tmp_path: Path, extra: list[str]) -> None:
    env = {**base_env(), "PYTHONPROFILEIMPORTTIME": "1"}
    if extra:
        env["OTEL_SDK_DISABLED"] = "true"
    server = start_jobd(pki, tmp_path / "state", *extra, env=env)
    try:
        job = start(server, "true")
        assert server.jobctl("alice", "status", str(job)).returncode == 0
        assert server.jobctl("stranger", "list").returncode == 3
    finally:
        assert server.stop() == 0
    text = server.log_text()
    # The import profile is there to look at (indented by nesting depth).
    assert re.search(r"^import time:.*\|\s+jobd\._server$", text, re.M)
    assert "jobd._telemetry" in text
    assert opentelemetry_imports(server.lines) == []
    assert "jobd._otel" not in text


def test_otlp_transport_other_than_http_protobuf_is_refused(pki: Pki, tmp_path: Path) -> None:
    cmd = [*JOBD, "-c", pki.path("server.pem"), "-k", pki.path("server.key"),
           "-C", pki.path("ca.pem"), "-a", "127.0.0.1", "-p", "0",
           "--state-dir", str(tmp_path / "state"), "--telemetry", "otlp"]
    env = {**base_env(), "OTEL_EXPORTER_OTLP_PROTOCOL": "grpc"}
    result = subprocess.run(cmd, capture_output=True, timeout=EXIT_TIMEOUT, cwd=RUN_CWD,
                            env=env, stdin=subprocess.DEVNULL)
    assert result.returncode == 1
    [line] = result.stderr.decode().splitlines()
    assert "startup-failed" in line
    assert "OTEL_EXPORTER_OTLP_PROTOCOL=grpc is not supported" in line
    assert "Traceback" not in result.stderr.decode()


def test_otlp_without_the_extra_is_a_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("OTEL_SDK_DISABLED", raising=False)
    # As if opentelemetry were not installed: importing it raises ImportError.
    for name in [m for m in sys.modules if m == "jobd._otel" or m.startswith("opentelemetry")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "opentelemetry", None)
    monkeypatch.delattr(jobd, "_otel", raising=False)  # had anything imported it
    with pytest.raises(TelemetryError, match=r"pip install 'jobd\[otel\]'"):
        open_telemetry("otlp", service_version="0")
    assert open_telemetry("off", service_version="0") is NULL


def test_null_telemetry_hooks_do_nothing() -> None:
    conn = NULL.connection("127.0.0.1:1")
    assert conn is _telemetry.NULL_CONNECTION
    with conn.request(object()):  # type: ignore[arg-type]
        conn.replied(object())  # type: ignore[arg-type]
        conn.streamed(10)
    conn.refused("tls", "x")
    conn.closed()
    assert conn.request(object()) is conn.request(object())  # type: ignore[arg-type]
    assert not NULL.enabled


# -- what is documented is what is exported ------------------------------------------


def documented_metrics() -> dict[str, str]:
    """OTel name -> Prometheus name, from the metric table of docs/operations.md."""
    text = (ROOT / "docs" / "operations.md").read_text()
    return dict(re.findall(r"^\| `(jobd\.[a-z_.]+)` \(`(jobd_[a-z_]+)`\) \|", text, re.M))


def test_exported_metrics_are_documented_and_on_the_dashboard(
        otel_jobd: JobdProcess, receiver: OtlpReceiver) -> None:
    job = start(otel_jobd, "sleep", "600")
    assert otel_jobd.jobctl("alice", "stop", str(job)).returncode == 0
    documented = documented_metrics()
    assert len(documented) == 14
    # Every instrument that has a value by now (not those of what has not happened:
    # OOM kills, spawn failures, refusals, streams).
    expected = set(documented) - {"jobd.jobs.oom_kills", "jobd.jobs.spawn_failures",
                                  "jobd.connections.refused", "jobd.streams.active",
                                  "jobd.output.streamed"}
    exported = receiver.wait_for("every metric", lambda: (
        names if expected <= (names := {q.name for q in receiver.points}) else None))
    assert exported <= set(documented)
    dashboard = json.loads((ROOT / "contrib" / "grafana-jobd.json").read_text())
    exprs = " ".join(t["expr"] for panel in dashboard["panels"] for t in panel["targets"])
    for prometheus in documented.values():
        assert prometheus in exprs, prometheus


def test_client_chosen_strings_are_cut(otel_jobd: JobdProcess, receiver: OtlpReceiver) -> None:
    """A 100 KB command name or argument reaches the collector as 4 KiB at most."""
    name = "x" * 100_000
    result = otel_jobd.jobctl("alice", "start", name)
    assert result.returncode == 1
    job = int(result.stdout)
    span = receiver.wait_for("job span", lambda: receiver.span(
        "jobd.job", **{"jobd.job.id": job}))
    assert span.attributes["process.command"] == name[:4093] + "..."
    assert len(span.attributes["jobd.job.error"]) <= 4096
    job = start(otel_jobd, "true", "y" * 100_000)
    record = receiver.wait_for("job-started record", lambda: receiver.log(
        "jobd.job-started", **{"jobd.id": job}))
    assert len(record.body) == 4096 and record.body.endswith("...")
    assert len(record.attributes["jobd.argv"]) == 4096


def test_stream_whose_client_leaves(otel_jobd: JobdProcess, receiver: OtlpReceiver) -> None:
    job = start(otel_jobd, "sleep", "600")
    client = subprocess.Popen(
        [*JOBCTL, *otel_jobd.pki.client_args("alice"), "-a", otel_jobd.address,
         "-p", str(otel_jobd.port), "stream", str(job)],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, stdin=subprocess.DEVNULL,
        cwd=RUN_CWD, env=base_env())
    try:
        def streams(value: int) -> int | None:
            points = receiver.metric("jobd.streams.active")
            return points[-1].batch if points and points[-1].value == value else None

        receiver.wait_for("one active stream", lambda: streams(1))
    finally:
        client.kill()
        client.wait()
    span = receiver.wait_for("stream span", lambda: receiver.span(
        "jobd.stream", **{"jobd.job.id": job}))
    assert span.attributes["jobd.result.code"] == "cancelled"
    receiver.wait_for("no active stream", lambda: streams(0))
    assert otel_jobd.jobctl("alice", "stop", str(job)).returncode == 0


@pytest.mark.skipif(os.geteuid() != 0, reason="cgroups need root")
def test_oom_kill_with_limits(otel_jobd: JobdProcess, receiver: OtlpReceiver) -> None:
    layout = otel_jobd.wait_for_log(r" cgroups mode=")
    if "mode=none" in layout or "memory" not in layout:
        pytest.skip(f"no memory cgroup controller on this machine: {layout}")
    job = start(otel_jobd, "--memory", "32M", "--pids", "50", PYTHON, "-c",
                "b = bytearray(200 * 1024 * 1024)")
    span = receiver.wait_for("job span", lambda: receiver.span(
        "jobd.job", **{"jobd.job.id": job}))
    assert span.attributes["jobd.job.limits.memory"] == 32 << 20
    assert span.attributes["jobd.job.limits.pids"] == 50
    assert span.attributes["jobd.job.state"] == "killed"
    assert span.attributes["jobd.job.signal"] == "SIGKILL"
    assert span.attributes["jobd.job.oom"] is True
    assert 0 < span.attributes["jobd.job.peak_memory"] <= 33 << 20
    assert span.attributes["jobd.job.cpu_time"] > 0
    [oom] = receiver.wait_for("an OOM kill", lambda: receiver.metric(
        "jobd.jobs.oom_kills")[-1:] or None)
    assert oom.value == 1


def test_collector_down_is_one_rate_limited_line_in_jobds_format(
        pki: Pki, tmp_path: Path) -> None:
    """Issue 23: the SDK's own retry and drop messages (multi-line, per batch) go
    through the event log: one JSON line, rate-limited; nothing after shutdown."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        down = s.getsockname()[1]  # released: nothing listens there
    env = {**base_env(), "OTEL_EXPORTER_OTLP_ENDPOINT": f"http://127.0.0.1:{down}",
           "OTEL_BSP_SCHEDULE_DELAY": "50", "OTEL_BLRP_SCHEDULE_DELAY": "50",
           "OTEL_METRIC_EXPORT_INTERVAL": "100", "OTEL_EXPORTER_OTLP_TIMEOUT": "2"}
    server = start_jobd(pki, tmp_path / "state", "--telemetry", "otlp", env=env)
    try:
        start(server, "true")
        server.wait_for_log("telemetry-export-failed")
    finally:
        assert server.stop() == 0
    line = re.compile(r"\d{4}-\d\d-\d\dT[\d:.]+Z (debug|info|warning|error) [a-z-]+( |$)")
    assert all(line.match(text) for text in server.lines), server.lines  # jobd's format only
    failures = [t for t in server.lines if " telemetry-" in t]
    assert len(failures) == 1, failures  # within a minute: one line
    assert ' reason="collector unreachable: ' in failures[0]
    stopped = next(i for i, t in enumerate(server.lines) if t.split()[2] == "stopped")
    assert not [t for t in server.lines[stopped:] if " telemetry-" in t]  # nothing after
