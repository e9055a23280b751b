"""Request bounds (protocol/_bounds.py): every field a server stores or echoes is
bounded, and a server decodes requests with limits derived from those bounds while a
client decodes replies with limits derived from the frame's size (issue 13)."""

from __future__ import annotations

import struct

import msgpack
import pytest

import protocol as p
from protocol import FieldError, Limits, Start

OK = (b"true",)


def frame(obj: object) -> bytes:
    payload = msgpack.packb(obj, use_bin_type=True)
    return struct.pack(">I", len(payload)) + payload


def welcomed_server() -> p.ServerConnection:
    conn = p.ServerConnection()
    conn.receive_data(p.encode_frame(p.Hello()))
    assert isinstance(conn.next_event(), p.Hello)
    conn.send(p.Welcome(1, 0, "jobd", "alice", "control", p.MAX_FRAME_SIZE))
    return conn


def server_decodes(obj: object) -> p.Event:
    conn = welcomed_server()
    conn.receive_data(frame(obj))
    return conn.next_event()


def refused_by_server(obj: object, *fragments: str) -> p.RemoteProtocolError:
    with pytest.raises(p.RemoteProtocolError) as info:
        server_decodes(obj)
    assert info.value.code is p.ErrorCode.BAD_REQUEST
    assert info.value.error_frame  # the client is told why
    for fragment in fragments:
        assert fragment in info.value.message, info.value.message
    return info.value


# -- start: the fields jobd stores or echoes ------------------------------------------


@pytest.mark.parametrize(("kwargs", "fragment"), [
    ({"cwd": b"/" + b"d" * p.MAX_PATH_BYTES}, "cwd of 4096 bytes"),
    ({"argv": (b"x" * (p.MAX_ARG_BYTES + 1),)}, "argv entry of 131072 bytes"),
    ({"argv": (b"x",) * (p.MAX_ARGV_ENTRIES + 1)}, "8193 entries"),
    ({"argv": (b"x" * 100_000,) * 3}, "command line longer than 262144 bytes"),
    ({"env": tuple((b"V%d" % i, b"") for i in range(p.MAX_ENV_ENTRIES + 1))}, "4097 entries"),
    ({"env": ((b"BIG", b"v" * p.MAX_ARG_BYTES),)}, "longer than 131071"),
    ({"env": tuple((b"V%d" % i, b"v" * 100_000) for i in range(3))}, "env larger than"),
])
def test_start_fields_are_bounded(kwargs: dict[str, object], fragment: str) -> None:
    kwargs.setdefault("argv", OK)
    with pytest.raises(FieldError, match=fragment):
        Start(**kwargs)  # type: ignore[arg-type]


def test_start_fields_at_their_bounds_are_accepted() -> None:
    start = Start(argv=(b"x" * p.MAX_ARG_BYTES,) + (b"",) * (p.MAX_ARGV_ENTRIES - 1),
                  cwd=b"/" + b"d" * (p.MAX_PATH_BYTES - 1),
                  env=((b"N", b"v" * (p.MAX_ARG_BYTES - 2)),))
    assert p.encoded_size(p.JobStatus(1, "alice", start.argv, "running")) < p.MAX_FRAME_SIZE
    decoded = server_decodes(start.to_wire())
    assert decoded == start


@pytest.mark.parametrize(("limits", "fragment"), [
    ({"cpus": float("inf")}, "finite"),
    ({"cpus": float("nan")}, "finite"),
    ({"cpus": 2**64 - 1}, "cpus must be at most 8192"),
    ({"memory": 2**63}, "memory must be at most"),
    ({"pids": p.MAX_PIDS + 1}, "pids must be at most"),
    ({"io_read_bps": [["/dev/null", 2**63]]}, "rates must be at most"),
    ({"io_read_bps": [[f"/dev/d{i}", 1] for i in range(17)]}, "17 entries, more than 16"),
    ({"io_write_bps": [["/dev/./null", 1], ["/dev//null", 2]]}, "/dev/null is given more"),
    ({"io_write_bps": [["", 1]]}, "non-empty"),
    ({"io_write_bps": [["/" + "d" * p.MAX_PATH_BYTES, 1]]}, "a string of 4096 bytes"),
])
def test_start_limits_are_validated_without_a_server(limits: dict[str, object],
                                                      fragment: str) -> None:
    """Refused while decoding: the request never reaches jobd's engine (no job ID)."""
    refused_by_server({"type": "start", "argv": list(OK), "limits": limits}, fragment)


def test_device_paths_are_canonical() -> None:
    start = Start(OK, limits=Limits(io_read_bps=(("/dev/././sda", 1),),
                                    io_write_bps=(("//dev/../dev/sdb/", 2),)))
    assert start.limits is not None
    assert start.limits.io_read_bps == (("/dev/sda", 1),)
    assert start.limits.io_write_bps == (("//dev/sdb", 2),)


def test_limits_in_statuses_stay_readable() -> None:
    """The request bounds are the request's: a status (say, from an older server) with
    more devices still decodes on the client."""
    limits = Limits(io_read_bps=tuple((f"/dev/d{i}", 1) for i in range(40)))
    status = p.JobStatus(1, "alice", OK, "exited", exit_code=0, limits=limits)
    reply = p.decode_payload(p.encode_frame(p.StatusResult(status))[4:])
    assert isinstance(reply, p.StatusResult) and reply.status == status


def test_refused_start_names_its_type() -> None:
    error = refused_by_server({"type": "start", "argv": list(OK), "cwd": b""})
    assert error.message_type == "start"
    error = refused_by_server({"type": "status", "job": "x"})
    assert error.message_type == "status"


# -- decoding: request-side and reply-side limits ----------------------------------------


def test_decode_amplification_frame_is_refused_from_its_header() -> None:
    """Issue 13 item 10: 1 MiB that decoded to a million lists (85 MB)."""
    obj = {"type": "status", "job": 1, "x": [[]] * 1048551}
    assert len(frame(obj)) == p.MAX_FRAME_SIZE + 4
    refused_by_server(obj, "an array of 1048551 elements exceeds the request limit of 8192")


@pytest.mark.parametrize(("obj", "fragment"), [
    ({"type": "status", "job": 1, "x": [[[]] * 4000] * 60}, "arrays, maps and elements"),
    ({"type": "status", "job": 1, "x": [[1] * 8000] * 128}, "arrays, maps and elements"),
    ({"type": "status", "job": 1, "x": [{}] * 8000 + [[{}] * 8000] * 8},
     "arrays, maps and elements"),
    ({"type": "status", "job": 1, "x": "s" * (p.MAX_PATH_BYTES + 1)},
     "a string of 4096 bytes exceeds the request limit of 4095"),
    ({"type": "status", "job": 1, "x": b"b" * (p.MAX_INPUT_CHUNK + 1)},
     "binary of 262145 bytes exceeds the request limit of 262144"),
    ({"type": "status", "job": 1, "x": {str(i): 0 for i in range(65)}},
     "a map of 65 entries exceeds the request limit of 64"),
])
def test_request_decoding_is_bounded(obj: object, fragment: str) -> None:
    refused_by_server(obj, fragment)


def test_largest_request_decodes() -> None:
    """The decode limits leave room for a start at every field's bound at once."""
    start = Start(argv=(b"a" * 30,) * p.MAX_ARGV_ENTRIES,
                  env=tuple((b"N%d" % i, b"v" * 40) for i in range(p.MAX_ENV_ENTRIES)),
                  limits=Limits(io_read_bps=tuple((f"/dev/r{i}", 1) for i in range(16)),
                                io_write_bps=tuple((f"/dev/w{i}", 1) for i in range(16)),
                                isolate=("mount", "net", "pid"), memory=1, cpus=1, pids=1))
    assert server_decodes(start.to_wire()) == start


def test_client_decodes_replies_beyond_the_request_limits() -> None:
    """A page of 10,000 statuses (an array longer than any request's) decodes on the
    client: reply-side limits come from the frame's size, not from the request bounds."""
    statuses = tuple(p.JobStatus(i, "a", (b"x",), "exited", exit_code=0)
                     for i in range(10_000))
    reply = p.encode_frame(p.JobList(statuses, more=True))
    assert len(reply) <= p.MAX_FRAME_SIZE
    client = p.ClientConnection()
    client.send(p.Hello())
    client.receive_data(p.encode_frame(p.Welcome(1, 0, "jobd", "a", "control", 1 << 20)))
    assert isinstance(client.next_event(), p.Welcome)
    client.send(p.ListJobs())
    client.receive_data(reply)
    page = client.next_event()
    assert isinstance(page, p.JobList) and len(page.jobs) == 10_000


def test_encoded_size_is_the_real_size() -> None:
    status = p.JobStatus(7, "alice", (b"sleep", b"1"), "running",
                         limits=Limits(memory=1 << 20, io_read_bps=(("/dev/sda", 5),)))
    one = len(p.encode_frame(p.JobList((status,))))
    two = len(p.encode_frame(p.JobList((status, status))))
    assert two - one == p.encoded_size(status)


def test_device_path_length_is_checked_when_built() -> None:
    with pytest.raises(FieldError, match="at most 4095 bytes"):
        Start(OK, limits=Limits(io_read_bps=(("/" + "é" * 2048, 1),)))


def test_the_largest_status_a_start_can_make_fits_half_a_frame() -> None:
    """Every field at its bound at once (an error text at its cap, a long CN): the
    status still fits in half a frame, so any answer that carries it can be sent and
    jobd's list never needs to shorten it (jobd/_handlers.py LIST_ENTRY_MAX)."""
    per_arg = p.MAX_ARGV_BYTES // p.MAX_ARGV_ENTRIES  # the most entries, each with bin16
    argv = (b"a" * per_arg,) * p.MAX_ARGV_ENTRIES
    paths = ["/" + "d" * (p.MAX_PATH_BYTES - 1 - 3) + f"{i:03d}" for i in range(32)]
    start = Start(argv, limits=Limits(
        memory=p.MAX_LIMIT_VALUE, cpus=p.MAX_CPUS, pids=p.MAX_PIDS,
        io_read_bps=tuple((path, p.MAX_LIMIT_VALUE) for path in paths[:16]),
        io_write_bps=tuple((path, p.MAX_LIMIT_VALUE) for path in paths[16:]),
        isolate=tuple(p.ISOLATION_KINDS)))
    status = p.JobStatus(2**64 - 1, "o" * 1024, start.argv, "error", error="e" * 512,
                         limits=start.limits, created=1.0, started=1.0, ended=1.0,
                         exit_code=-1, signal="SIGKILL", pid=2**31, output_bytes=2**63,
                         dropped_bytes=2**63, peak_memory=2**63, cpu_time=1.0, oom=True)
    assert p.encoded_size(status) < p.MAX_FRAME_SIZE // 2
    assert len(p.encode_frame(p.End(status, 2**64 - 1))) < p.MAX_FRAME_SIZE // 2


def test_a_start_refused_while_decoding_still_names_its_type() -> None:
    """A start beyond the decoding limits (a 1 MiB cwd) never decodes, yet jobd's log
    must say it was a refused start: the type is read past the offending value."""
    error = refused_by_server({"argv": [b"true"], "cwd": b"/" * 300_000, "type": "start"},
                              "binary of 300000 bytes")
    assert error.message_type == "start"
    error = refused_by_server({"type": "status", "job": 1, "x": [[]] * 10_000})
    assert error.message_type == "status"
    error = refused_by_server({"x": "s" * 5000, "type": "start"})
    assert error.message_type == "start"
    error = refused_by_server({"k" * 5000: 1, "type": "start"})
    assert error.message_type is None  # a key before it cannot be read within the limits
