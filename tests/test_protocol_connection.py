"""Client and server connection objects: whole conversations, ordering, errors."""

from __future__ import annotations

import subprocess
import sys

import pytest

import protocol as p
from protocol import (
    CLOSED,
    NEED_DATA,
    ClientConnection,
    ConnectionState,
    Delete,
    Deleted,
    End,
    Error,
    ErrorCode,
    GetStatus,
    Hello,
    JobList,
    ListJobs,
    LocalProtocolError,
    Output,
    OutputChunk,
    RemoteProtocolError,
    ServerConnection,
    Start,
    Started,
    StatusResult,
    Stop,
    Stopped,
    Stream,
    Welcome,
    decode_payload,
    encode_frame,
)
from tests.conftest import RUN_CWD

from .test_protocol_messages import STATUS, WELCOME

S = ConnectionState
HELLO = Hello(software="jobctl 0.1.0")


def drain(conn: ClientConnection | ServerConnection) -> list[p.Event]:
    """Every event the connection has now, up to NEED_DATA or CLOSED (included)."""
    events: list[p.Event] = []
    while True:
        event = conn.next_event()
        if event is NEED_DATA:
            return events
        events.append(event)
        if event is CLOSED:
            return events


def deliver(data: bytes, conn: ClientConnection | ServerConnection) -> list[p.Event]:
    conn.receive_data(data)
    return drain(conn)


def bytewise(data: bytes, conn: ClientConnection | ServerConnection) -> list[p.Event]:
    events: list[p.Event] = []
    for i in range(len(data)):
        conn.receive_data(data[i : i + 1])
        events += drain(conn)
    return events


def welcomed() -> tuple[ClientConnection, ServerConnection]:
    client, server = ClientConnection(), ServerConnection()
    assert (client.state, server.state) == (S.HELLO, S.HELLO)
    assert deliver(client.send(HELLO), server) == [HELLO]
    assert server.hello == HELLO
    assert (client.state, server.state) == (S.WELCOME, S.WELCOME)
    assert deliver(server.send(WELCOME), client) == [WELCOME]
    assert client.welcome == WELCOME
    assert (client.state, server.state) == (S.IDLE, S.IDLE)
    return client, server


def exchange(client: ClientConnection, server: ServerConnection, request: p.Message,
             *answers: p.Message) -> None:
    """The client sends request, the server answers; both see everything in order."""
    assert deliver(client.send(request), server) == [request]
    frames = b"".join(server.send(a) for a in answers)
    assert deliver(frames, client) == list(answers)
    assert client.state is S.IDLE and server.state is S.IDLE


# -- whole conversations ------------------------------------------------------


def test_every_request_in_sequence_on_one_connection() -> None:
    client, server = welcomed()
    exchange(client, server, Start((b"sleep", b"10")), Started(STATUS))
    exchange(client, server, GetStatus(7), StatusResult(STATUS))
    exchange(client, server, Stop(7, grace=0), Stopped(STATUS))
    exchange(client, server, ListJobs(), JobList((STATUS,), more=True))
    exchange(client, server, ListJobs(after=7), JobList((), more=False))
    exchange(client, server, Delete(7), Deleted(7))
    exchange(client, server, Stream(7), OutputChunk(1, b"a", 1), OutputChunk(2, b"b", 2),
             OutputChunk(1, b"c" * 70000, 3), End(STATUS, 3))
    exchange(client, server, Stream(7, position=3), End(STATUS, 3))
    exchange(client, server, Output(7), OutputChunk(1, b"abc", 9), End(STATUS, 9))
    exchange(client, server, Output(7, position=9), End(STATUS, 9))
    assert deliver(b"", client) == [CLOSED]
    assert deliver(b"", server) == [CLOSED]
    assert client.state is S.CLOSED and server.state is S.CLOSED


@pytest.mark.parametrize(
    "request_",
    [Start((b"x",)), Stop(1), GetStatus(1), ListJobs(), Delete(1), Stream(1), Output(1)],
    ids=lambda r: r.TYPE,
)
def test_any_request_may_be_answered_by_an_error(request_: p.Message) -> None:
    client, server = welcomed()
    exchange(client, server, request_, Error(ErrorCode.NOT_FOUND, "process not found"))
    exchange(client, server, GetStatus(7), StatusResult(STATUS))


def test_stream_may_end_in_an_error_after_chunks() -> None:
    client, server = welcomed()
    exchange(client, server, Stream(1), OutputChunk(1, b"x", 1),
             Error(ErrorCode.UNAVAILABLE, "disk gone"))


def test_send_output_is_send_of_output_chunk() -> None:
    client, server = welcomed()
    deliver(client.send(Stream(1)), server)
    fast = server.send_output(2, memoryview(b"hello"), 99)
    assert fast == encode_frame(OutputChunk(2, b"hello", 99))
    assert deliver(fast, client) == [OutputChunk(2, b"hello", 99)]
    assert server.state is S.STREAM
    assert deliver(server.send(End(STATUS, 99)), client) == [End(STATUS, 99)]


def test_whole_conversation_one_byte_at_a_time() -> None:
    client, server = ClientConnection(), ServerConnection()
    assert bytewise(client.send(HELLO), server) == [HELLO]
    assert bytewise(server.send(WELCOME), client) == [WELCOME]
    assert bytewise(client.send(Stream(3)), server) == [Stream(3)]
    answers: list[p.Message] = [
        OutputChunk(1, b"ab", 1), OutputChunk(2, b"\x00" * 300, 2), End(STATUS, 2),
    ]
    assert bytewise(b"".join(server.send(a) for a in answers), client) == answers
    assert bytewise(client.send(ListJobs()), server) == [ListJobs()]
    assert bytewise(server.send(JobList((STATUS,) * 3)), client) == [JobList((STATUS,) * 3)]
    assert deliver(b"", server) == [CLOSED]


def test_refusal_instead_of_welcome() -> None:
    client, server = ClientConnection(), ServerConnection()
    deliver(client.send(HELLO), server)
    refusal = Error(ErrorCode.PERMISSION_DENIED, "certificate has no role")
    frame = server.send(refusal)
    assert server.state is S.DONE
    assert deliver(frame, client) == [refusal]
    assert client.state is S.DONE
    for conn in (client, server):
        with pytest.raises(LocalProtocolError):
            conn.send(GetStatus(1))
    with pytest.raises(LocalProtocolError):
        server.send(WELCOME)
    assert deliver(b"", client) == [CLOSED]
    assert deliver(b"", server) == [CLOSED]


def test_refusal_before_hello_is_read() -> None:
    client, server = ClientConnection(), ServerConnection()
    hello = client.send(HELLO)
    refusal = Error(ErrorCode.UNAVAILABLE, "server busy")
    assert deliver(server.send(refusal), client) == [refusal]
    assert client.state is S.DONE and server.state is S.DONE
    with pytest.raises(RemoteProtocolError, match="data after the connection was refused"):
        deliver(hello, server)


def test_server_may_end_an_idle_connection_with_an_error() -> None:
    client, server = welcomed()
    bye = Error(ErrorCode.UNAVAILABLE, "server is shutting down")
    assert deliver(server.send(bye), client) == [bye]
    assert client.state is S.DONE
    assert deliver(b"", client) == [CLOSED]


def test_unsupported_version() -> None:
    client, server = ClientConnection(), ServerConnection()
    with pytest.raises(RemoteProtocolError) as info:
        deliver(client.send(Hello(version=2, minor=5)), server)
    exc = info.value
    assert exc.code is ErrorCode.UNSUPPORTED_VERSION
    assert "2" in exc.message and "1" in exc.message
    assert server.state is S.ERROR
    assert deliver(exc.error_frame, client) == [Error(ErrorCode.UNSUPPORTED_VERSION, exc.message)]
    assert client.state is S.DONE


def test_client_refuses_a_server_of_another_major_version() -> None:
    client, server = ClientConnection(), ServerConnection()
    deliver(client.send(HELLO), server)
    welcome = Welcome(version=3, minor=0, software="jobd 9", identity="a", role="admin",
                      max_frame_size=1 << 20)
    with pytest.raises(RemoteProtocolError) as info:
        deliver(server.send(welcome), client)
    assert info.value.code is ErrorCode.UNSUPPORTED_VERSION
    assert info.value.error_frame == b""


def test_client_adopts_the_servers_frame_limit() -> None:
    client, server = ClientConnection(), ServerConnection(max_frame_size=200)
    deliver(client.send(HELLO), server)
    welcome = Welcome(1, 0, "jobd", "alice", "control", max_frame_size=200)
    deliver(server.send(welcome), client)
    assert client.send_limit == 200
    with pytest.raises(LocalProtocolError) as info:
        client.send(Start((b"x" * 300,)))
    assert info.value.code is ErrorCode.LIMIT_EXCEEDED
    assert client.state is S.IDLE  # nothing was sent: still usable
    exchange(client, server, GetStatus(1), Error(ErrorCode.NOT_FOUND, "process not found"))


def test_too_large_answer_leaves_the_server_usable() -> None:
    client, server = welcomed()
    deliver(client.send(ListJobs()), server)
    with pytest.raises(LocalProtocolError):
        server.send(JobList((STATUS,) * 20000))
    assert server.state is S.RESULT
    assert deliver(server.send(JobList((STATUS,), more=True)), client) == [JobList((STATUS,), True)]


def test_frames_batched_in_one_read() -> None:
    client, server = welcomed()
    deliver(client.send(Output(1)), server)
    frames = b"".join(server.send_output(1, bytes([i]), i) for i in range(50))
    frames += server.send(End(STATUS, 49))
    events = deliver(frames[:-3], client)
    assert len(events) == 50
    assert deliver(frames[-3:], client) == [End(STATUS, 49)]


# -- receiving: errors --------------------------------------------------------


def client_error_for(frames: bytes, client: ClientConnection) -> RemoteProtocolError:
    with pytest.raises(RemoteProtocolError) as info:
        deliver(frames, client)
    assert info.value.error_frame == b""  # a client never answers with an error frame
    assert client.state is S.ERROR
    return info.value


def server_error_for(data: bytes, server: ServerConnection) -> RemoteProtocolError:
    with pytest.raises(RemoteProtocolError) as info:
        deliver(data, server)
    exc = info.value
    assert server.state is S.ERROR
    assert decode_payload(exc.error_frame[4:]) == Error(exc.code, exc.message)
    return exc


@pytest.mark.parametrize("side", ["client", "server"])
@pytest.mark.parametrize("prefix", [b"\x00\x10\x00\x01", b"\xff\xff\xff\xff"])
def test_oversized_prefix_detected_from_the_header_alone(side: str, prefix: bytes) -> None:
    conn = ClientConnection() if side == "client" else ServerConnection()
    if side == "client":
        conn.send(HELLO)
    with pytest.raises(RemoteProtocolError) as info:
        deliver(prefix, conn)  # not a single payload byte was needed
    assert info.value.code is ErrorCode.LIMIT_EXCEEDED
    assert str(int.from_bytes(prefix, "big")) in info.value.message


def test_frame_of_exactly_the_limit_is_accepted() -> None:
    client, server = ClientConnection(max_frame_size=51), ServerConnection(max_frame_size=50)
    frame = client.send(HELLO)
    assert len(frame) == 54
    with pytest.raises(RemoteProtocolError):
        deliver(frame, ServerConnection(max_frame_size=49))
    assert deliver(frame, server) == [HELLO]


@pytest.mark.parametrize("side", ["client", "server"])
def test_zero_length_frame(side: str) -> None:
    conn = ClientConnection() if side == "client" else ServerConnection()
    if side == "client":
        conn.send(HELLO)
    with pytest.raises(RemoteProtocolError, match="empty frame"):
        deliver(b"\x00\x00\x00\x00", conn)


def test_malformed_payload_is_bad_request_on_the_server() -> None:
    exc = server_error_for(b"\x00\x00\x00\x02\x92\xc0", ServerConnection())
    assert exc.code is ErrorCode.BAD_REQUEST


@pytest.mark.parametrize("first", [GetStatus(1), Stream(1), WELCOME, Error(ErrorCode.INTERNAL, "")])
def test_server_expects_hello_first(first: p.Message) -> None:
    exc = server_error_for(encode_frame(first), ServerConnection())
    assert exc.code is ErrorCode.BAD_REQUEST
    assert exc.message == "expected hello"


def test_second_hello_is_an_error() -> None:
    _, server = welcomed()
    server_error_for(encode_frame(HELLO), server)


@pytest.mark.parametrize("stream", [True, False])
def test_request_during_a_response(stream: bool) -> None:
    client, server = welcomed()
    deliver(client.send(Stream(1) if stream else Stop(1)), server)
    if stream:
        server.send_output(1, b"x", 1)
    exc = server_error_for(encode_frame(GetStatus(1)), server)
    assert exc.message == "request while another is in progress"
    # The client learns why, as the end of its request.
    assert deliver(exc.error_frame, client) == [Error(ErrorCode.BAD_REQUEST, exc.message)]


def test_even_one_stray_byte_during_a_response_is_an_error() -> None:
    client, server = welcomed()
    deliver(client.send(Stream(1)), server)
    assert drain(server) == []
    server_error_for(b"\x00", server)


def test_bytes_before_the_welcome_is_sent() -> None:
    server = ServerConnection()
    exc = server_error_for(encode_frame(HELLO) + encode_frame(GetStatus(1)), server)
    assert exc.message == "request before the welcome"


def test_eof_while_answering_is_closed_and_the_server_may_finish() -> None:
    client, server = welcomed()
    deliver(client.send(Stream(1)), server)
    assert deliver(b"", server) == [CLOSED]
    assert server.state is S.CLOSED
    assert drain(server) == [CLOSED]  # again and again
    server.send_output(1, b"nobody reads this", 1)
    server.send(End(STATUS, 1))
    assert server.state is S.CLOSED


@pytest.mark.parametrize("cut", [1, 3, 4, 10])
@pytest.mark.parametrize("side", ["client", "server"])
def test_eof_in_the_middle_of_a_frame(side: str, cut: int) -> None:
    client = ClientConnection()
    frame = client.send(HELLO)
    if side == "client":
        conn: ClientConnection | ServerConnection = client
        frame = encode_frame(WELCOME)
    else:
        conn = ServerConnection()
    assert deliver(frame[:cut], conn) == []
    with pytest.raises(RemoteProtocolError, match="connection closed in the middle of a frame"):
        deliver(b"", conn)
    assert conn.state is S.ERROR


def test_server_error_after_eof_has_no_frame() -> None:
    server = ServerConnection()
    server.receive_data(b"\x00\x00")
    server.receive_data(b"")
    with pytest.raises(RemoteProtocolError) as info:
        server.next_event()
    assert info.value.error_frame == b""


@pytest.mark.parametrize(
    ("request_", "answer"),
    [
        (GetStatus(1), Started(STATUS)),
        (Start((b"x",)), StatusResult(STATUS)),
        (Stop(1), Deleted(1)),
        (Delete(1), Stopped(STATUS)),
        (ListJobs(), End(STATUS, 0)),
        (GetStatus(1), OutputChunk(1, b"x", 1)),
        (Stream(1), Started(STATUS)),
        (Output(1), JobList(())),
        (GetStatus(1), WELCOME),
    ],
)
def test_client_rejects_an_answer_of_the_wrong_kind(request_: p.Message, answer: p.Message) -> None:
    client, _ = welcomed()
    client.send(request_)
    client_error_for(encode_frame(answer), client)


@pytest.mark.parametrize(
    "frame",
    [encode_frame(WELCOME), encode_frame(OutputChunk(1, b"x", 1)), encode_frame(End(STATUS, 1)),
     encode_frame(StatusResult(STATUS)), encode_frame(GetStatus(1)), encode_frame(HELLO)],
)
def test_client_rejects_unsolicited_frames_when_idle(frame: bytes) -> None:
    client, _ = welcomed()
    client_error_for(frame, client)


def test_client_rejects_anything_but_welcome_or_error_after_hello() -> None:
    client = ClientConnection()
    client.send(HELLO)
    client_error_for(encode_frame(StatusResult(STATUS)), client)


@pytest.mark.parametrize("frame", [encode_frame(WELCOME), encode_frame(Started(STATUS)),
                                   encode_frame(Error(ErrorCode.INTERNAL, "x"))])
def test_server_rejects_server_messages(frame: bytes) -> None:
    _, server = welcomed()
    exc = server_error_for(frame, server)
    assert "server message" in exc.message


def test_client_rejects_frames_after_done() -> None:
    client = ClientConnection()
    client.send(HELLO)
    deliver(encode_frame(Error(ErrorCode.PERMISSION_DENIED, "no")), client)
    client_error_for(encode_frame(WELCOME), client)


def test_error_state_fails_fast() -> None:
    client, server = welcomed()
    first = server_error_for(b"\x00\x00\x00\x01\xc1", server)
    for call in (server.next_event, lambda: server.receive_data(b"x"),
                 lambda: server.send(StatusResult(STATUS)), lambda: server.send_output(1, b"", 0)):
        with pytest.raises(RemoteProtocolError) as info:
            call()
        assert (info.value.code, info.value.message) == (first.code, first.message)
    assert server.state is S.ERROR
    second = client_error_for(encode_frame(HELLO), client)
    with pytest.raises(RemoteProtocolError) as again:
        client.next_event()
    assert again.value.message == second.message
    assert again.value.error_frame == b""


# -- sending: illegal moves are local errors ----------------------------------


def illegal(conn: ClientConnection | ServerConnection, msg: p.Message, fragment: str = "") -> None:
    before = conn.state
    with pytest.raises(LocalProtocolError) as info:
        conn.send(msg)
    assert fragment in info.value.message
    assert conn.state is before  # nothing changed


def test_client_illegal_sends() -> None:
    client = ClientConnection()
    illegal(client, GetStatus(1), "expected hello")
    illegal(client, WELCOME, "expected hello")
    client.send(HELLO)
    illegal(client, HELLO)
    illegal(client, GetStatus(1), "server's turn")
    deliver(encode_frame(WELCOME), client)
    illegal(client, HELLO)
    illegal(client, Started(STATUS), "server message")
    illegal(client, Error(ErrorCode.INTERNAL, "x"), "server message")
    client.send(Stream(1))
    illegal(client, GetStatus(1), "request while another is in progress")
    illegal(client, Stream(1), "request while another is in progress")


def test_server_illegal_sends() -> None:
    client, server = ClientConnection(), ServerConnection()
    illegal(server, WELCOME, "client's turn")
    illegal(server, GetStatus(1), "client message")
    deliver(client.send(HELLO), server)
    illegal(server, StatusResult(STATUS))
    illegal(server, OutputChunk(1, b"", 0))
    with pytest.raises(LocalProtocolError):
        server.send_output(1, b"", 0)
    server.send(WELCOME)
    illegal(server, WELCOME)
    illegal(server, StatusResult(STATUS), "client's turn")
    with pytest.raises(LocalProtocolError, match="no stream"):
        server.send_output(1, b"x", 0)
    deliver(encode_frame(GetStatus(1)), server)
    illegal(server, Started(STATUS), "does not answer 'status'")
    illegal(server, End(STATUS, 0))
    with pytest.raises(LocalProtocolError):
        server.send_output(1, b"x", 0)
    server.send(StatusResult(STATUS))
    deliver(encode_frame(Output(1)), server)
    illegal(server, StatusResult(STATUS))
    with pytest.raises(LocalProtocolError):
        server.send_output(3, b"x", 0)  # invalid fd: still a local error
    assert server.state is S.STREAM


def test_send_rejects_non_messages() -> None:
    with pytest.raises(LocalProtocolError):
        ClientConnection().send({"type": "hello"})  # type: ignore[arg-type]


# -- the receive buffer -------------------------------------------------------


def test_data_after_eof_is_a_local_error() -> None:
    server = ServerConnection()
    server.receive_data(b"")
    server.receive_data(b"")  # repeating EOF is fine
    with pytest.raises(LocalProtocolError):
        server.receive_data(b"x")


def test_feeding_without_draining_is_refused_beyond_one_frame() -> None:
    frame = encode_frame(OutputChunk(1, b"x" * 1000, 1))
    small = ClientConnection(max_frame_size=2000)
    small.send(HELLO)
    small.receive_data(encode_frame(WELCOME))
    small.receive_data(frame)  # 1,040 bytes held: under the bound
    small.receive_data(frame)  # 2,080 held now: over max_frame_size + 4
    with pytest.raises(LocalProtocolError, match="without draining"):
        small.receive_data(frame)


def test_invalid_max_frame_size() -> None:
    for bad in (0, -1, 2**32, 1.5, "1"):
        with pytest.raises(ValueError):
            ServerConnection(max_frame_size=bad)  # type: ignore[arg-type]


def test_sentinels_and_states_are_readable() -> None:
    assert repr(NEED_DATA) == "NEED_DATA" and str(CLOSED) == "CLOSED"
    assert ClientConnection().request is None
    client, server = welcomed()
    deliver(client.send(Stream(2)), server)
    assert client.request == server.request == "stream"


# -- sans-IO: importing protocol pulls in no IO machinery ---------------------


def test_protocol_imports_no_io_modules() -> None:
    code = (
        "import sys, protocol\n"
        "bad = [m for m in ('trio', 'socket', 'ssl', 'asyncio', 'selectors') if m in sys.modules]\n"
        "print(','.join(bad))\n"
    )
    result = subprocess.run([sys.executable, "-c", code], cwd=RUN_CWD,
                            capture_output=True, text=True, check=True, timeout=60)
    assert result.stdout.strip() == ""
