"""A closed connection's memory is freed when it closes, not at the next full GC
(issue 21 item 7).

A protocol error's exception kept its traceback, whose frames held the
connection (and its receive buffer, up to a whole 1 MiB frame) and the
session: reference cycles that only the cyclic GC frees. Under an attack of
bad frames RSS climbed to hundreds of MB between collections. With the cyclic
GC off, these tests see an object freed only if nothing cycles through it.
"""

from __future__ import annotations

import contextlib
import gc
import struct
import weakref
from collections.abc import Iterator
from pathlib import Path

import pytest
import trio

import jobd._session
import protocol as p

from . import hostile
from .conftest import Pki
from .test_client_lib import running_server


@contextlib.contextmanager
def no_cyclic_gc() -> Iterator[None]:
    was = gc.isenabled()
    gc.collect()
    gc.disable()
    try:
        yield
    finally:
        if was:
            gc.enable()


BAD_FRAMES = {
    "invalid msgpack": struct.pack(">I", 1 << 20) + b"\xc1" * (1 << 20),
    "bad field": hostile.packed({"type": "status", "job": "x"}),
    "unknown type": hostile.packed({"type": "nope"}),
}


@pytest.mark.parametrize("frame", BAD_FRAMES.values(), ids=BAD_FRAMES.keys())
def test_a_connection_with_a_protocol_error_is_freed_without_the_gc(frame: bytes) -> None:
    with no_cyclic_gc():
        conn = p.ServerConnection()
        conn.receive_data(hostile.HELLO)
        assert isinstance(conn.next_event(), p.Hello)
        conn.send(p.Welcome(1, 1, "t", "alice", "control", p.MAX_FRAME_SIZE))
        conn.receive_data(frame)
        with pytest.raises(p.RemoteProtocolError) as caught:
            conn.next_event()
        assert caught.value.error_frame
        with pytest.raises(p.RemoteProtocolError):  # the error state stays
            conn.next_event()
        freed = weakref.ref(conn)
        del conn, caught
        assert freed() is None, "the connection is kept alive by a reference cycle"


async def test_jobd_frees_a_session_ended_by_a_bad_frame_at_once(
        pki: Pki, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A welcomed client sends a 1 MiB frame of garbage: its session (the TLS stream,
    the protocol connection and its buffer) is freed when the connection closes."""
    freed = trio.Event()
    sessions: list[weakref.ref[object]] = []
    token = trio.lowlevel.current_trio_token()
    init = jobd._session.Session.__init__

    def tracked(self: jobd._session.Session, *args: object, **kwargs: object) -> None:
        init(self, *args, **kwargs)  # type: ignore[arg-type]
        sessions.append(weakref.ref(self, lambda _: token.run_sync_soon(freed.set)))

    monkeypatch.setattr(jobd._session.Session, "__init__", tracked)
    async with running_server(pki, tmp_path) as server:
        def attack() -> hostile.Reply:
            with hostile.RawTLS("127.0.0.1", server.port, hostile.client_context(pki)) as conn:
                conn.hello()
                conn.send(BAD_FRAMES["invalid msgpack"])
                return conn.read_until_closed()

        with no_cyclic_gc():
            reply = await trio.to_thread.run_sync(attack)
            hostile.expect_error(reply, p.ErrorCode.BAD_REQUEST, "invalid msgpack")
            with trio.move_on_after(30):
                await freed.wait()
            assert len(sessions) == 1
            assert sessions[0]() is None, "the closed session is kept alive by a cycle"
