"""The optional traceparent of start and stop: on the wire, and what jobctl sends."""

from __future__ import annotations

import sys

import msgpack
import pytest
from opentelemetry.sdk.trace import TracerProvider

import protocol as p
from jobctl import _core as core

VALID = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"


@pytest.mark.parametrize("message", [
    p.Start((b"true",), traceparent=VALID),
    p.Stop(3, 0.5, traceparent=VALID),
    p.Stop(3, traceparent=VALID),
])
def test_round_trip(message: p.Start | p.Stop) -> None:
    wire = message.to_wire()
    assert wire["traceparent"] == VALID
    assert type(message).from_wire(wire) == message


def test_absent_and_nil_are_the_same() -> None:
    assert "traceparent" not in p.Start((b"true",)).to_wire()
    assert "traceparent" not in p.Stop(1).to_wire()
    assert p.Start.from_wire({"argv": [b"x"], "traceparent": None}).traceparent is None
    assert p.Stop.from_wire({"job": 1, "traceparent": None}) == p.Stop(1)


def test_older_peers_ignore_it() -> None:
    """A decoder that does not know the field drops it, like any unknown key: the
    encoded map is the old map plus one key."""
    old = p.Stop(1).to_wire()
    new = p.Stop(1, traceparent=VALID).to_wire()
    assert {k: v for k, v in new.items() if k != "traceparent"} == old


@pytest.mark.parametrize("value", [5, b"00-ab", ["x"], True])
def test_wrong_type_is_bad_request(value: object) -> None:
    with pytest.raises(p.FieldError, match="traceparent"):
        p.Stop.from_wire({"job": 1, "traceparent": value})
    with pytest.raises(p.FieldError, match="traceparent"):
        p.Start((b"x",), traceparent=value)  # type: ignore[arg-type]


def test_length_is_bounded() -> None:
    p.Stop(1, traceparent="x" * p.MAX_TRACEPARENT)
    with pytest.raises(p.FieldError, match="at most 256"):
        p.Stop(1, traceparent="x" * (p.MAX_TRACEPARENT + 1))


def test_server_answers_bad_request_for_a_long_traceparent() -> None:
    server = p.ServerConnection()
    client = p.ClientConnection()
    server.receive_data(client.send(p.Hello()))
    assert isinstance(server.next_event(), p.Hello)
    client.receive_data(server.send(p.Welcome(1, 0, "jobd", "a", "control", p.MAX_FRAME_SIZE)))
    assert isinstance(client.next_event(), p.Welcome)
    payload = msgpack.packb({"type": "stop", "job": 1, "traceparent": "0" * 300})
    server.receive_data(len(payload).to_bytes(4, "big") + payload)
    with pytest.raises(p.RemoteProtocolError) as info:
        server.next_event()
    assert info.value.code is p.ErrorCode.BAD_REQUEST


def test_client_sends_the_current_span() -> None:
    tracer = TracerProvider().get_tracer("test")
    with tracer.start_as_current_span("script") as span:
        ctx = span.get_span_context()
        expected = f"00-{ctx.trace_id:032x}-{ctx.span_id:016x}-{int(ctx.trace_flags):02x}"
        assert core.current_traceparent() == expected
        assert core.start_request(["true"], None, None, None).traceparent == expected
        assert core.stop_request(4, None).traceparent == expected


def test_client_without_a_span_sends_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TRACEPARENT", VALID)
    assert core.current_traceparent() == VALID  # opentelemetry loaded, no span current
    monkeypatch.delitem(sys.modules, "opentelemetry.trace")  # as if never imported
    assert core.current_traceparent() == VALID


@pytest.mark.parametrize("value", [
    "", "garbage", VALID.upper(), "ff" + VALID[2:], VALID[:-1], VALID + " ",
    "00-" + "a" * 400,
])
def test_client_ignores_a_malformed_environment(monkeypatch: pytest.MonkeyPatch,
                                                value: str) -> None:
    monkeypatch.delitem(sys.modules, "opentelemetry.trace", raising=False)
    monkeypatch.setenv("TRACEPARENT", value)
    assert core.current_traceparent() is None
    monkeypatch.delenv("TRACEPARENT")
    assert core.current_traceparent() is None
