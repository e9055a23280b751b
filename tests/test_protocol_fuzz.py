"""Property tests: arbitrary input never escapes as anything but RemoteProtocolError."""

from __future__ import annotations

import itertools

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from protocol import (
    CLOSED,
    NEED_DATA,
    ClientConnection,
    ConnectionState,
    Hello,
    Message,
    RemoteProtocolError,
    ServerConnection,
    encode_frame,
)

from .test_protocol_messages import EXAMPLES, WELCOME, client_messages, messages, server_messages

#: Small, so that random length prefixes often exceed it and often do not.
LIMIT = 300

Conn = ClientConnection | ServerConnection


def fresh(side: str, stage: str) -> Conn:
    """A connection at the start, or just after the hello/welcome exchange."""
    if side == "client":
        client = ClientConnection(max_frame_size=LIMIT)
        if stage != "start":
            client.send(Hello())
            if stage == "idle":
                client.receive_data(encode_frame(WELCOME))
                assert client.next_event() == WELCOME
        return client
    server = ServerConnection(max_frame_size=LIMIT)
    if stage != "start":
        server.receive_data(encode_frame(Hello()))
        assert server.next_event() == Hello()
        if stage == "idle":
            server.send(WELCOME)
    return server


def feed(conn: Conn, pieces: list[bytes]) -> None:
    """Feed pieces the way a reader loop does; check the buffer bound throughout."""
    try:
        for piece in pieces:
            conn.receive_data(piece)
            assert len(conn._buffer) <= LIMIT + 4 + len(piece)
            while True:
                event = conn.next_event()
                assert len(conn._buffer) <= LIMIT + 4 + len(piece)
                if event is NEED_DATA or event is CLOSED:
                    break
        conn.receive_data(b"")
        while conn.next_event() is not CLOSED:
            pass
    except RemoteProtocolError as exc:
        assert conn.state is ConnectionState.ERROR
        assert isinstance(exc.error_frame, bytes)


def split(data: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({c % (len(data) + 1) for c in cuts})
    bounds = [0, *points, len(data)]
    return [data[a:b] for a, b in itertools.pairwise(bounds) if b > a]


sides = st.sampled_from(["client", "server"])
stages = st.sampled_from(["start", "hello", "idle"])
cuts = st.lists(st.integers(0, 10_000), max_size=8)


@given(sides, stages, st.binary(max_size=600), cuts)
@settings(max_examples=300)
def test_random_bytes_in_random_splits(side: str, stage: str, data: bytes, cut: list[int]) -> None:
    feed(fresh(side, stage), split(data, cut))


@given(sides, stages, st.lists(st.sampled_from(EXAMPLES) | messages, max_size=6),
       st.binary(max_size=40), cuts)
@settings(max_examples=300, suppress_health_check=[HealthCheck.too_slow])
def test_valid_frames_in_random_order(side: str, stage: str, msgs: list[Message], tail: bytes,
                                      cut: list[int]) -> None:
    # Real frames from both sides in any order exercise the state machine; a
    # random tail and random cuts exercise the framing around them.
    frames = b"".join(encode_frame(m, max_frame_size=1 << 20) for m in msgs)
    feed(fresh(side, stage), split(frames + tail, cut))


@given(st.lists(client_messages, max_size=5), cuts)
@settings(max_examples=150, suppress_health_check=[HealthCheck.too_slow])
def test_server_fed_client_messages(msgs: list[Message], cut: list[int]) -> None:
    frames = b"".join(encode_frame(m) for m in [Hello(), *msgs])
    feed(fresh("server", "start"), split(frames, cut))


@given(st.lists(server_messages, max_size=5), cuts)
@settings(max_examples=150, suppress_health_check=[HealthCheck.too_slow])
def test_client_fed_server_messages(msgs: list[Message], cut: list[int]) -> None:
    frames = b"".join(encode_frame(m) for m in [WELCOME, *msgs])
    feed(fresh("client", "hello"), split(frames, cut))
