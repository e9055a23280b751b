"""Job engine: stdin pipes and pseudo-terminals (real processes)."""

from __future__ import annotations

import hashlib
import os

import trio

from jobd.engine import JobManager
from protocol import JobState, Terminal
from tests.engine_helpers import TIMEOUT, collect, data, manager, wait_for_output

__all__ = ["manager"]  # the fixture


async def test_without_stdin_the_job_reads_dev_null(manager: JobManager) -> None:
    status = await manager.start([b"sh", b"-c", b"cat; echo done"], "alice")
    assert not status.stdin and status.tty is None
    assert await manager.write_input(status.id, b"ignored") is False
    final = await manager.wait(status.id)
    assert final.state is JobState.EXITED
    assert data(await collect(manager.read_output(status.id))) == b"done\n"


async def test_stdin_pipe_is_binary_exact_and_eof_closes_it(manager: JobManager) -> None:
    payload = os.urandom(3 * 1024 * 1024) + bytes(range(256))
    status = await manager.start([b"sha256sum"], "alice", stdin=True)
    assert status.stdin
    with trio.fail_after(TIMEOUT):
        for at in range(0, len(payload), 200_000):  # more than a pipe holds: waits for room
            assert await manager.write_input(status.id, payload[at:at + 200_000])
        manager.close_input(status.id)
        final = await manager.wait(status.id)
    assert final.state is JobState.EXITED and final.exit_code == 0
    out = data(await collect(manager.read_output(status.id)))
    assert out.split()[0].decode() == hashlib.sha256(payload).hexdigest()
    # After the end, input is dropped, not an error.
    assert await manager.write_input(status.id, b"late") is False


async def test_a_job_that_never_reads_holds_up_only_its_writer(manager: JobManager) -> None:
    status = await manager.start([b"sleep", b"1000"], "alice", stdin=True)
    blocked = trio.Event()
    result: list[bool] = []

    async def writer() -> None:
        blocked.set()
        result.append(await manager.write_input(status.id, b"x" * (4 << 20)))  # > the pipe

    with trio.fail_after(TIMEOUT):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(writer)
            await blocked.wait()
            # The engine answers others meanwhile: another job starts and ends.
            other = await manager.start([b"echo", b"hi"], "bob")
            assert (await manager.wait(other.id)).exit_code == 0
            assert not result  # still waiting for the job to read
            await manager.stop(status.id, 0)  # the job ends: the writer is released
    assert result == [False]


async def test_a_terminal_job_has_a_controlling_tty_of_the_size_asked(
        manager: JobManager) -> None:
    script = b"tty; stty size; echo $TERM; test -t 0 && echo in-tty; read x; echo got=$x"
    status = await manager.start([b"sh", b"-c", script], "alice",
                                 tty=Terminal(rows=33, cols=101, term="xterm-256color"))
    assert status.stdin and status.tty == Terminal(33, 101, "xterm-256color")
    out = await wait_for_output(manager, status.id, b"in-tty")
    assert b"/dev/pts/" in out and b"33 101" in out and b"xterm-256color" in out
    assert await manager.write_input(status.id, b"hello\r")
    with trio.fail_after(TIMEOUT):
        final = await manager.wait(status.id)
    assert final.exit_code == 0
    chunks = await collect(manager.read_output(status.id))
    assert {c.fd for c in chunks} == {1}  # one stream: what the terminal showed
    assert b"got=hello" in data(chunks)


async def test_resize_signals_the_job_and_ctrl_c_is_a_byte_that_interrupts(
        manager: JobManager) -> None:
    script = (b"trap 'stty size' WINCH; echo ready; "
              b"while :; do sleep 0.05; done")
    status = await manager.start([b"bash", b"-c", script], "alice", tty=Terminal(24, 80))
    await wait_for_output(manager, status.id, b"ready")
    manager.resize(status.id, 50, 132)
    await wait_for_output(manager, status.id, b"50 132")
    await manager.stop(status.id, 0)
    # Ctrl-C is a byte: the terminal's line discipline makes it SIGINT for the
    # foreground process group (the job's, as its controlling terminal).
    status = await manager.start([b"sleep", b"1000"], "alice", tty=Terminal(24, 80))
    assert await manager.write_input(status.id, b"\x03")
    with trio.fail_after(TIMEOUT):
        final = await manager.wait(status.id)
    assert final.state is JobState.KILLED and final.signal == "SIGINT"


async def test_eof_on_a_terminal_types_ctrl_d(manager: JobManager) -> None:
    status = await manager.start([b"cat"], "alice", tty=Terminal(24, 80))
    assert await manager.write_input(status.id, b"abc\r")
    await wait_for_output(manager, status.id, b"abc\r\nabc\r\n")
    manager.close_input(status.id)
    with trio.fail_after(TIMEOUT):
        final = await manager.wait(status.id)
    assert final.state is JobState.EXITED and final.exit_code == 0


async def test_recent_position_is_a_record_boundary_near_the_end(manager: JobManager) -> None:
    status = await manager.start(
        [b"sh", b"-c", b"for i in $(seq 1 200); do echo line $i; sleep 0.001; done"], "alice")
    await manager.wait(status.id)
    everything = data(await collect(manager.read_output(status.id)))
    position = manager.recent_position(status.id, 100)
    tail = data(await collect(manager.read_output(status.id, position)))
    assert everything.endswith(tail) and 0 < len(tail) <= 100
    assert manager.recent_position(status.id, 1 << 30) == 0


async def test_frames_from_several_writers_stay_whole(manager: JobManager) -> None:
    """Two writers at once (two typing clients): each frame reaches the job whole,
    whether it went into the pipe at once (no lock, no wait) or had to wait for
    room under the job's input lock, behind the other writer's frame."""
    import re

    status = await manager.start([b"cat"], "alice", stdin=True)
    size, count = 300_000, 8

    async def writer(letter: bytes) -> None:
        for _ in range(count):
            assert await manager.write_input(status.id, letter * size)

    with trio.fail_after(TIMEOUT):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(writer, b"a")
            nursery.start_soon(writer, b"b")
        manager.close_input(status.id)
        assert (await manager.wait(status.id)).exit_code == 0
    out = data(await collect(manager.read_output(status.id)))
    assert len(out) == 2 * count * size
    assert re.fullmatch(rb"(?:a{%d}|b{%d})+" % (size, size), out)
    assert out.count(b"a") == out.count(b"b") == count * size
