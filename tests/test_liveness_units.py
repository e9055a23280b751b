"""Liveness ticks in the state machine and the reconnect policy, without a socket
(issue 21 items 9 and 10)."""

from __future__ import annotations

import pytest

import protocol as p
from jobctl import _core as core
from jobctl._errors import ConnectionFailed, NotFound, ServerError, ServerRefused

TICK = p.encode_frame(p.Tick())


def _welcomed(tick_interval: float | None = 1.0) -> tuple[p.ClientConnection, p.ServerConnection]:
    client, server = p.ClientConnection(), p.ServerConnection()
    server.receive_data(client.send(p.Hello(software="t", tick_interval=tick_interval)))
    hello = server.next_event()
    assert isinstance(hello, p.Hello) and hello.tick_interval == tick_interval
    client.receive_data(server.send(p.Welcome(1, 1, "s", "alice", "control", p.MAX_FRAME_SIZE,
                                              tick_interval=tick_interval)))
    assert isinstance(client.next_event(), p.Welcome)
    return client, server


@pytest.mark.parametrize("request_", [p.GetStatus(1), p.Stream(1), None],
                         ids=["result", "stream", "idle"])
def test_a_tick_changes_nothing_and_the_client_never_sees_it(request_: p.Message | None) -> None:
    client, server = _welcomed()
    if request_ is not None:
        server.receive_data(client.send(request_))
        assert server.next_event() == request_
    before = (client.state, server.state)
    client.receive_data(server.send(p.Tick()) + server.send(p.Tick()))
    assert client.next_event() is p.NEED_DATA
    assert (client.state, server.state) == before
    if isinstance(request_, p.GetStatus):  # the answer still pairs with its request
        status = p.JobStatus(id=1, owner="alice", argv=(b"true",), state=p.JobState.RUNNING,
                             created=1.0, started=1.0)
        client.receive_data(server.send(p.StatusResult(status)))
        assert isinstance(client.next_event(), p.StatusResult)


def test_no_tick_before_the_welcome_and_none_from_a_client() -> None:
    client, server = p.ClientConnection(), p.ServerConnection()
    with pytest.raises(p.LocalProtocolError):
        server.send(p.Tick())
    client.send(p.Hello())
    client.receive_data(TICK)
    with pytest.raises(p.RemoteProtocolError):
        client.next_event()
    with pytest.raises(p.LocalProtocolError):
        _welcomed()[0].send(p.Tick())


@pytest.mark.parametrize("value", [0, -1, float("nan"), float("inf"), 3601, "1", True])
def test_a_tick_interval_out_of_bounds_is_refused(value: object) -> None:
    with pytest.raises((p.FieldError, TypeError, ValueError)):
        p.Hello(tick_interval=value)  # type: ignore[arg-type]


def test_the_client_asks_for_ticks_every_third_of_its_timeout() -> None:
    assert core.hello(30.0).tick_interval == 10.0
    assert core.hello(None).tick_interval is None
    welcome = p.Welcome(1, 1, "s", "a", "control", 1 << 20, tick_interval=0.25)
    assert core.idle_timeout(welcome, 0.3) == 0.5  # at least two of the server's ticks
    assert core.idle_timeout(welcome, 30.0) == 30.0
    assert core.idle_timeout(p.Welcome(1, 1, "s", "a", "control", 1 << 20), 30.0) is None


def test_the_outage_backs_off_and_gives_up_at_its_deadline() -> None:
    outage = core.Outage(10.0)
    lost = ConnectionFailed("connection lost: reset")
    pauses = [outage.lost(lost, now=float(t)) for t in range(7)]
    assert all(0 < pause <= core.BACKOFF_MAX for pause in pauses)
    assert pauses[0] <= core.BACKOFF_FIRST
    assert max(pauses) > core.BACKOFF_FIRST  # it backs off
    assert outage.lost(lost, now=9.5) <= 0.5  # never past the deadline
    with pytest.raises(ConnectionFailed, match=r"gave up reconnecting after 10s"):
        outage.lost(lost, now=10.0)


def test_a_server_heard_from_starts_a_new_outage() -> None:
    outage = core.Outage(10.0)
    lost = ConnectionFailed("connection lost")
    outage.lost(lost, now=0.0)
    outage.lost(lost, now=9.0)
    # reconnected at 9.5 and the server spoke at 9.6: a break at 30 is a new outage
    assert outage.lost(lost, now=30.0, heard=9.6) <= core.BACKOFF_FIRST
    assert outage.since == 30.0


def test_what_a_new_connection_cannot_cure_is_raised_at_once() -> None:
    outage = core.Outage(10.0)
    for error in (NotFound(p.ErrorCode.NOT_FOUND, "process not found"),
                  ServerRefused("server refused the connection: TLS alert: unknown ca"),
                  ServerRefused("certificate has no role", p.ErrorCode.PERMISSION_DENIED)):
        with pytest.raises(type(error)):
            outage.lost(error, now=0.0)
    for error in (ServerRefused("busy", p.ErrorCode.UNAVAILABLE),
                  ServerError(p.ErrorCode.UNAVAILABLE, "server is shutting down"),
                  ConnectionFailed("cannot connect to 127.0.0.1:1: connection refused")):
        assert core.retriable(error)
