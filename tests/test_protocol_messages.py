"""Messages: golden bytes, round trips, validation on construction."""

from __future__ import annotations

import dataclasses
import re
from typing import Any

import msgpack
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import protocol as p
from protocol import (
    Delete,
    Deleted,
    End,
    Error,
    ErrorCode,
    FieldError,
    GetStatus,
    Hello,
    JobList,
    JobState,
    JobStatus,
    Limits,
    ListJobs,
    Output,
    OutputChunk,
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
from tests.conftest import ROOT

# -- strategies (also used by the other protocol tests) -----------------------

uint64 = st.integers(0, 2**64 - 1)
#: Job IDs, list ``after`` and request positions (issue 22 item 12).
ids = st.integers(0, p.MAX_JOB_ID)
finite = st.floats(allow_nan=False, allow_infinity=False)
texts = st.text(max_size=12)
arg = st.binary(max_size=12).map(lambda b: b.replace(b"\0", b"x"))

limits_st = st.builds(
    Limits,
    memory=st.none() | st.integers(1, 2**63),
    cpus=st.none() | st.floats(0.01, 256),
    pids=st.none() | st.integers(1, 2**31),
    io_read_bps=st.lists(st.tuples(texts, st.integers(1, 2**40)), max_size=2).map(tuple),
    io_write_bps=st.lists(st.tuples(texts, st.integers(1, 2**40)), max_size=2).map(tuple),
    isolate=st.sets(st.sampled_from(sorted(p.ISOLATION_KINDS))).map(tuple),
)

# What a start request may ask for (protocol/_bounds.py): values in the kernel's
# ranges, distinct non-empty device paths that are already canonical.
device = st.text(st.characters(codec="utf-8", exclude_characters="\0/."), min_size=1,
                 max_size=8).map(lambda name: "/dev/" + name)
request_limits_st = st.builds(
    Limits,
    memory=st.none() | st.integers(1, 2**63 - 1),
    cpus=st.none() | st.floats(0.01, 256),
    pids=st.none() | st.integers(1, 4 * 2**20),
    io_read_bps=st.dictionaries(device, st.integers(1, 2**40), max_size=2)
    .map(lambda d: tuple(d.items())),
    io_write_bps=st.dictionaries(device, st.integers(1, 2**40), max_size=2)
    .map(lambda d: tuple(d.items())),
    isolate=st.sets(st.sampled_from(sorted(p.ISOLATION_KINDS))).map(tuple),
)

labels_st = st.dictionaries(
    st.from_regex(r"[A-Za-z0-9][A-Za-z0-9._/-]{0,8}", fullmatch=True),
    st.text(st.characters(blacklist_categories=("Cc", "Cs", "Zl", "Zp")), max_size=8),
    max_size=3).map(lambda d: tuple(sorted(d.items())))

status_st = st.builds(
    JobStatus,
    id=uint64,
    owner=texts,
    argv=st.lists(st.binary(max_size=8), min_size=1, max_size=3).map(tuple),
    state=st.sampled_from(JobState),
    exit_code=st.none() | st.integers(-(2**31), 2**31),
    signal=st.none() | texts,
    error=st.none() | texts,
    oom=st.booleans(),
    pid=st.none() | st.integers(0, 2**31),
    created=finite,
    started=st.none() | finite,
    ended=st.none() | finite,
    output_bytes=st.integers(0, 2**63),
    dropped_bytes=st.integers(0, 2**63),
    limits=st.none() | limits_st,
    peak_memory=st.none() | st.integers(0, 2**63),
    cpu_time=st.none() | finite,
    labels=labels_st,
)

env_name = st.binary(min_size=1, max_size=6).map(
    lambda b: b.replace(b"\0", b"x").replace(b"=", b"_")
)
env_st = st.dictionaries(env_name, arg, max_size=3).map(lambda d: tuple(d.items()))

client_messages = st.one_of(
    st.builds(Hello, version=uint64, minor=uint64, software=texts),
    st.builds(Start, argv=st.lists(arg, min_size=1, max_size=4).map(tuple),
              cwd=st.none() | arg.filter(bool), env=st.none() | env_st,
              limits=st.none() | request_limits_st, env_merge=st.booleans(),
              labels=labels_st),
    st.builds(Stop, job=ids, grace=st.none() | st.floats(0, 1e9)),
    st.builds(GetStatus, job=ids),
    st.builds(ListJobs, after=ids, owner=st.none() | texts,
              states=st.lists(st.sampled_from(list(p.JobState)), max_size=5).map(tuple),
              since=st.none() | st.floats(0, 1e10), count=st.booleans(),
              labels=labels_st),
    st.builds(Stream, job=ids, position=ids, timestamps=st.booleans(),
              end_only=st.booleans()),
    st.builds(Output, job=ids, position=ids, timestamps=st.booleans(),
              end_only=st.booleans()),
    st.builds(Delete, job=ids),
    st.builds(p.Prune, older_than=st.floats(0, 1e10)),
    st.builds(p.Rerun, job=ids),
)
server_messages = st.one_of(
    st.builds(Welcome, version=uint64, minor=uint64, software=texts, identity=texts,
              role=texts, max_frame_size=st.integers(1, 2**32)),
    st.builds(Started, status=status_st),
    st.builds(Stopped, status=status_st),
    st.builds(StatusResult, status=status_st),
    st.builds(JobList, jobs=st.lists(status_st, max_size=3).map(tuple), more=st.booleans()),
    st.builds(Deleted, job=ids),
    st.builds(p.Pruned, removed=uint64),
    st.builds(OutputChunk, fd=st.sampled_from([1, 2]), data=st.binary(max_size=300),
              position=uint64, time=st.none() | st.floats(0, 1e10)),
    st.builds(End, status=status_st, position=uint64),
    st.builds(Error, code=st.sampled_from(ErrorCode), message=texts),
)
messages = client_messages | server_messages


STATUS = JobStatus(id=7, owner="alice", argv=(b"true",), state=JobState.EXITED, exit_code=0,
                   created=1.5)
WELCOME = Welcome(version=1, minor=0, software="jobd 0.1.0", identity="alice", role="control",
                  max_frame_size=p.MAX_FRAME_SIZE)

#: One example of every message type, with every optional field set where it has one.
EXAMPLES: list[p.Message] = [
    Hello(software="jobctl 0.1.0"),
    Hello(software="jobctl 0.1.0", tick_interval=10.0),
    Start(argv=(b"sh", b"-c", b"echo \xff"), cwd=b"/tmp", env=((b"PATH", b"/bin"),),
          limits=Limits(memory=1 << 28, cpus=0.5, pids=64, isolate=("net", "pid"))),
    Start(argv=(b"env",), env=((b"LANG", b"C"),), env_merge=True),
    Start(argv=(b"true",), labels=(("env", "prod"), ("team", "web/é"))),
    p.Rerun(job=7),
    Start(argv=(b"bash",), stdin=True, tty=p.Terminal(rows=40, cols=120, term="xterm-256color")),
    Stop(job=3, grace=0.5),
    GetStatus(job=7),
    ListJobs(after=100, owner="bob", states=(p.JobState.RUNNING, p.JobState.EXITED),
             since=1.5, count=True),
    ListJobs(labels=(("env", "prod"),)),
    Stream(job=7, position=12),
    Stream(job=7, position=12, timestamps=True, end_only=True),
    Output(job=7),
    Delete(job=7),
    p.Prune(older_than=86400.0),
    p.Attach(job=7, position=12, input=True),
    p.Attach(job=7),
    p.Input(data=b"\x03ls\r"),
    p.InputEof(),
    p.Resize(rows=50, cols=132),
    p.Resized(rows=50, cols=132, position=4096, time=1733580000.25),
    p.Detach(),
    WELCOME,
    dataclasses.replace(WELCOME, tick_interval=10.0),
    p.Tick(),
    Started(STATUS),
    Stopped(STATUS),
    StatusResult(STATUS),
    StatusResult(dataclasses.replace(STATUS, labels=(("a", ""), ("b.c/d-e_f", "x y")))),
    JobList((STATUS, dataclasses.replace(STATUS, id=8)), more=True, total=12),
    Deleted(job=7),
    p.Pruned(removed=3),
    OutputChunk(fd=2, data=b"\x00\xffhello", position=300),
    OutputChunk(fd=1, data=b"hi\n", position=320, time=1764492062.25),
    End(STATUS, position=300),
    Error(ErrorCode.NOT_FOUND, "process not found"),
]

# -- golden bytes -------------------------------------------------------------

GOLDEN: list[tuple[p.Message, bytes]] = [
    (
        Hello(software="jobctl 0.1.0"),
        b"\x00\x00\x00\x32"  # payload length: 50
        b"\x84"  # map, 4 entries
        b"\xa4type" b"\xa5hello"
        b"\xa7version" b"\x01"
        b"\xa5minor" b"\x02"
        b"\xa8software" b"\xacjobctl 0.1.0",
    ),
    (
        GetStatus(job=7),
        b"\x00\x00\x00\x12" b"\x82" b"\xa4type" b"\xa6status" b"\xa3job" b"\x07",
    ),
    (
        Stop(job=3, grace=0.5),
        b"\x00\x00\x00\x1f" b"\x83" b"\xa4type" b"\xa4stop" b"\xa3job" b"\x03"
        b"\xa5grace" b"\xcb\x3f\xe0\x00\x00\x00\x00\x00\x00",  # float 64
    ),
    (
        Start(argv=(b"ls", b"-la")),
        b"\x00\x00\x00\x1b" b"\x82" b"\xa4type" b"\xa5start"
        b"\xa4argv" b"\x92" b"\xc4\x02ls" b"\xc4\x03-la",  # array of 2 bin
    ),
    (
        OutputChunk(fd=2, data=b"hi", position=300),
        b"\x00\x00\x00\x23" b"\x84" b"\xa4type" b"\xa3out" b"\xa2fd" b"\x02"
        b"\xa4data" b"\xc4\x02hi" b"\xa8position" b"\xcd\x01\x2c",  # uint 16
    ),
    (
        Error(ErrorCode.NOT_FOUND, "process not found"),
        b"\x00\x00\x00\x35" b"\x83" b"\xa4type" b"\xa5error" b"\xa4code" b"\xa9not_found"
        b"\xa7message" b"\xb1process not found",
    ),
    (
        ListJobs(),
        b"\x00\x00\x00\x12" b"\x82" b"\xa4type" b"\xa4list" b"\xa5after" b"\x00",
    ),
    (
        Deleted(job=7),
        b"\x00\x00\x00\x13" b"\x82" b"\xa4type" b"\xa7deleted" b"\xa3job" b"\x07",
    ),
    (  # protocol 1.2
        p.Rerun(job=7),
        b"\x00\x00\x00\x11" b"\x82" b"\xa4type" b"\xa5rerun" b"\xa3job" b"\x07",
    ),
    (
        Start(argv=(b"ls",), labels=(("env", "prod"),)),
        b"\x00\x00\x00\x27" b"\x83" b"\xa4type" b"\xa5start" b"\xa4argv" b"\x91" b"\xc4\x02ls"
        b"\xa6labels" b"\x81" b"\xa3env" b"\xa4prod",  # a map of str
    ),
]


@pytest.mark.parametrize(("msg", "frame"), GOLDEN, ids=lambda x: getattr(x, "TYPE", ""))
def test_golden_encode(msg: p.Message, frame: bytes) -> None:
    assert encode_frame(msg) == frame


@pytest.mark.parametrize(("msg", "frame"), GOLDEN, ids=lambda x: getattr(x, "TYPE", ""))
def test_golden_decode(msg: p.Message, frame: bytes) -> None:
    assert int.from_bytes(frame[:4], "big") == len(frame) - 4
    assert decode_payload(frame[4:]) == msg


# -- round trips --------------------------------------------------------------


def test_examples_cover_every_type() -> None:
    assert {type(m) for m in EXAMPLES} == set(p.MESSAGE_TYPES.values())
    assert len(p.MESSAGE_TYPES) == 27


@pytest.mark.parametrize("msg", EXAMPLES, ids=lambda m: m.TYPE)
def test_round_trip(msg: p.Message) -> None:
    frame = encode_frame(msg)
    assert decode_payload(frame[4:]) == msg
    assert type(msg).from_wire(msg.to_wire()) == msg
    assert msg.to_wire()["type"] == msg.TYPE
    assert next(iter(msg.to_wire())) == "type"


@given(messages)
@settings(max_examples=300, suppress_health_check=[HealthCheck.too_slow])
def test_every_generated_message_round_trips(msg: p.Message) -> None:
    assert decode_payload(encode_frame(msg)[4:]) == msg


def test_unknown_keys_are_ignored() -> None:
    wire = GetStatus(job=7).to_wire() | {"future": [1, {"a": b"x"}], "zzz": None}
    assert decode_payload(msgpack.packb(wire)) == GetStatus(job=7)


def test_nil_is_absent_for_optional_fields() -> None:
    wire = {"type": "start", "argv": [b"x"], "cwd": None, "env": None, "limits": None}
    assert decode_payload(msgpack.packb(wire)) == Start(argv=(b"x",))
    assert decode_payload(msgpack.packb({"type": "stop", "job": 1, "grace": None})) == Stop(1)


def test_defaults_when_absent() -> None:
    hello = Hello(minor=0, software="")
    assert decode_payload(msgpack.packb({"type": "hello", "version": 1})) == hello
    assert decode_payload(msgpack.packb({"type": "list"})) == ListJobs(0)
    assert decode_payload(msgpack.packb({"type": "stream", "job": 2})) == Stream(2, 0)


def test_lists_become_tuples() -> None:
    msg = Start(argv=[b"a", b"b"], env=[[b"A", b"1"]])  # type: ignore[arg-type]
    assert msg.argv == (b"a", b"b")
    assert msg.env == ((b"A", b"1"),)
    assert JobList([STATUS]).jobs == (STATUS,)  # type: ignore[arg-type]


def test_ints_become_floats() -> None:
    assert Stop(1, grace=2).grace == 2.0
    assert isinstance(Stop(1, grace=2).grace, float)


def test_error_code_from_string() -> None:
    assert Error("not_found", "x").code is ErrorCode.NOT_FOUND  # type: ignore[arg-type]


def test_output_chunk_accepts_buffers() -> None:
    assert OutputChunk(1, bytearray(b"ab"), 0).data == b"ab"  # type: ignore[arg-type]
    assert OutputChunk(1, memoryview(b"ab"), 0).data == b"ab"  # type: ignore[arg-type]


# -- validation on construction -----------------------------------------------

INVALID: list[tuple[type[Any], dict[str, Any]]] = [
    (Hello, {"version": -1}),
    (Hello, {"version": "1"}),
    (Hello, {"version": True}),
    (Hello, {"software": b"x"}),
    (Start, {"argv": ()}),
    (Start, {"argv": b"ls"}),
    (Start, {"argv": ("ls",)}),
    (Start, {"argv": (b"l\0s",)}),
    (Start, {"argv": (b"ls",), "cwd": b""}),
    (Start, {"argv": (b"ls",), "cwd": b"/t\0"}),
    (Start, {"argv": (b"ls",), "cwd": "/tmp"}),
    (Start, {"argv": (b"ls",), "env": ((b"A=B", b"1"),)}),
    (Start, {"argv": (b"ls",), "env": ((b"", b"1"),)}),
    (Start, {"argv": (b"ls",), "env": ((b"A", b"1"), (b"A", b"2"))}),
    (Start, {"argv": (b"ls",), "env": ((b"A", b"\0"),)}),
    (Start, {"argv": (b"ls",), "env": ((b"A",),)}),
    (Start, {"argv": (b"ls",), "env": {b"A": b"1"}}),
    (Start, {"argv": (b"ls",), "limits": {}}),
    (Stop, {"job": -1}),
    (Stop, {"job": 1, "grace": -0.5}),
    (Stop, {"job": 1, "grace": float("nan")}),
    (Stop, {"job": 1, "grace": float("inf")}),
    (Stop, {"job": 1, "grace": "2"}),
    (GetStatus, {"job": 1.0}),
    (GetStatus, {"job": 2**64}),
    (ListJobs, {"after": -1}),
    (Stream, {"job": 1, "position": -1}),
    (Output, {"job": None}),
    (Delete, {"job": "1"}),
    (Welcome, {**dataclasses.asdict(WELCOME), "max_frame_size": 0}),
    (Welcome, {**dataclasses.asdict(WELCOME), "role": None}),
    (Started, {"status": {}}),
    (JobList, {"jobs": ({},), "more": False}),
    (JobList, {"jobs": (), "more": 1}),
    (Deleted, {"job": -3}),
    (OutputChunk, {"fd": 0, "data": b"", "position": 0}),
    (OutputChunk, {"fd": 3, "data": b"", "position": 0}),
    (OutputChunk, {"fd": True, "data": b"", "position": 0}),
    (OutputChunk, {"fd": 1, "data": "text", "position": 0}),
    (OutputChunk, {"fd": 1, "data": b"", "position": -1}),
    (End, {"status": STATUS, "position": -1}),
    (Error, {"code": "teapot", "message": "x"}),
    (Error, {"code": 404, "message": "x"}),
    (Error, {"code": ErrorCode.INTERNAL, "message": None}),
]


@pytest.mark.parametrize(("cls", "kwargs"), INVALID)
def test_invalid_construction_raises_field_error(cls: type[Any], kwargs: dict[str, Any]) -> None:
    with pytest.raises(FieldError):
        cls(**kwargs)


def test_messages_are_frozen() -> None:
    with pytest.raises(dataclasses.FrozenInstanceError):
        GetStatus(1).job = 2  # type: ignore[misc]


def test_docstrings_list_fields() -> None:
    for cls in p.MESSAGE_TYPES.values():
        doc = cls.__doc__ or ""
        for f in dataclasses.fields(cls):
            assert f"{f.name}:" in doc or f"{f.name}," in doc, (cls, f.name)


def test_docs_hex_dump_is_what_the_code_produces() -> None:
    """docs/protocol.md shows a real Hello frame; it must stay real."""
    doc = (ROOT / "docs" / "protocol.md").read_text()
    block = doc.split("Hex dump of a real frame", 1)[1].split("```", 2)[1]
    dumped = bytes.fromhex(" ".join(
        re.sub(r"^[0-9a-f]{8}\s+", "", line).split("|")[0] for line in block.splitlines()
    ))
    assert dumped == encode_frame(Hello(software="jobctl 0.1.0"))


# -- nil means absent, for every optional field of every message ---------------

#: The class that decodes a nested map, by the key that holds it.
NESTED: dict[str, type[Any]] = {"limits": p.Limits, "status": p.JobStatus, "jobs": p.JobStatus}


def _decodes(wire: dict[str, Any]) -> p.Message | None:
    try:
        return decode_payload(msgpack.packb(wire))
    except p.RemoteProtocolError:
        return None


def _nil_variants(wire: dict[str, Any], cls: type[Any]) -> list[tuple[dict[str, Any],
                                                                       dict[str, Any]]]:
    """(with a field set to nil, with that field removed) pairs, for every key
    of this map and of the maps nested in it that the class names as a field."""
    pairs = []
    keys = set(wire) | {f.name for f in dataclasses.fields(cls)}
    for key in sorted(keys - {"type"}):
        without = {k: v for k, v in wire.items() if k != key}
        pairs.append(({**wire, key: None}, without))
        value = wire.get(key)
        inner = NESTED.get(key)
        if inner is not None and isinstance(value, dict):
            for with_nil, removed in _nil_variants(value, inner):
                pairs.append(({**wire, key: with_nil}, {**wire, key: removed}))
        elif inner is not None and isinstance(value, list) and value \
                and isinstance(value[0], dict):
            for with_nil, removed in _nil_variants(value[0], inner):
                pairs.append(({**wire, key: [with_nil, *value[1:]]},
                              {**wire, key: [removed, *value[1:]]}))
    return pairs


@given(messages)
@settings(max_examples=300)
def test_nil_in_any_optional_field_is_absent(msg: p.Message) -> None:
    wire = msg.to_wire()
    assert _decodes(wire) == msg
    for with_nil, without in _nil_variants(wire, type(msg)):
        expected = _decodes(without)
        if expected is None:
            # A required field: nil is as wrong as leaving it out.
            assert _decodes(with_nil) is None, with_nil
        else:
            assert _decodes(with_nil) == expected, with_nil


@pytest.mark.parametrize("wire", [
    {"type": "hello", "version": 1, "minor": None, "software": None},
    {"type": "list", "after": None},
    {"type": "stream", "job": 1, "position": None},
    {"type": "output", "job": 1, "position": None},
    {"type": "start", "argv": [b"x"], "limits": {"isolate": None, "io_read_bps": None}},
], ids=lambda w: w["type"])
def test_nil_fields_the_independent_client_sent(wire: dict[str, Any]) -> None:
    """The fields an independent client found refused (issue 12)."""
    assert _decodes(wire) == _decodes({k: v for k, v in wire.items()
                                       if v is not None and k != "limits"}
                                      | ({"limits": {}} if "limits" in wire else {}))
