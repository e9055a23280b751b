"""The output log's tail in memory: followers at the end take committed records from
memory, and get exactly the bytes and positions the log file holds (also when the
disk fills, when the writer falls behind and when a follower falls behind the
tail)."""

from __future__ import annotations

import contextlib
import os
from collections import Counter
from collections.abc import AsyncGenerator
from pathlib import Path

import pytest
import trio
import trio.testing

import protocol as p
from jobd.engine import MAX_RECORD, OutputChunk, _outputlog
from jobd.engine._logformat import TERMINAL_FD
from jobd.engine._outputlog import HEADER_SIZE, OutputLog, recover
from protocol._frames import encode_frame, encode_output_chunk
from tests.engine_helpers import TIMEOUT, collect, disk_that_fills

MAX_CHUNK = 2 * MAX_RECORD


@pytest.fixture
def paths(monkeypatch: pytest.MonkeyPatch) -> Counter[str]:
    """Counts the chunks followers take from memory ("memory") and the times they
    had to read the file ("file")."""
    seen: Counter[str] = Counter()
    real = OutputLog.chunk_from_memory

    def spy(self: OutputLog, position: int, max_chunk: int, *, timestamps: bool = False,
            resizes: bool = False) -> tuple[OutputChunk | None, int] | None:
        found = real(self, position, max_chunk, timestamps=timestamps, resizes=resizes)
        seen["memory" if found is not None else "file"] += 1
        return found

    monkeypatch.setattr(OutputLog, "chunk_from_memory", spy)
    return seen


def records(count: int) -> list[tuple[int, bytes]]:
    """Records of both fds and many sizes (a few of them full)."""
    out = []
    for i in range(count):
        size = MAX_RECORD if i % 7 == 3 else 1 + (i * 7919) % 5000
        out.append((1 + (i // 3) % 2, bytes([65 + i % 26]) * size))
    return out


def boundaries(sent: list[tuple[int, bytes]]) -> list[int]:
    """The record boundaries of a log holding ``sent`` (after each record)."""
    out, at = [], 0
    for _fd, payload in sent:
        at += HEADER_SIZE + len(payload)
        out.append(at)
    return out


def check_against_log(chunks: list[OutputChunk], log_chunks: list[OutputChunk]) -> None:
    """Every chunk ends at a record boundary of the log, and holds exactly the log's
    records up to there (``log_chunks``: one chunk per record, read from the file)."""
    by_end = {c.position: i for i, c in enumerate(log_chunks)}
    at = 0  # index of the next record of the log
    for chunk in chunks:
        assert chunk.position in by_end, f"{chunk.position} is not a record boundary"
        last = by_end[chunk.position]
        assert last >= at
        assert {c.fd for c in log_chunks[at:last + 1]} == {chunk.fd}
        assert chunk.data == b"".join(c.data for c in log_chunks[at:last + 1])
        at = last + 1
    assert at == len(log_chunks), "the follower missed records at the end"


class Follower:
    """A follower task that collects chunks and says when it got to a position."""

    def __init__(self, log: OutputLog, position: int = 0, *, timestamps: bool = False,
                 resizes: bool = False) -> None:
        self.chunks: list[OutputChunk] = []
        self.log = log
        self.position = position
        self.moved = trio.Event()
        self.options = {"timestamps": timestamps, "resizes": resizes}

    async def run(self, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        gen: AsyncGenerator[OutputChunk, None] = self.log.chunks(
            self.position, MAX_CHUNK, None, **self.options)
        task_status.started()
        async with contextlib.aclosing(gen):
            async for chunk in gen:
                self.chunks.append(chunk)
                self.position = chunk.position
                self.moved.set()
                self.moved = trio.Event()

    async def reach(self, position: int) -> None:
        with trio.fail_after(TIMEOUT):
            while self.position < position:
                await self.moved.wait()


async def test_followers_at_the_end_take_the_logs_records_from_memory(
        tmp_path: Path, paths: Counter[str]) -> None:
    path = tmp_path / "x.log"
    _outputlog.create_file(path)
    log = OutputLog(path, 1 << 40)
    sent = records(60)
    ends = boundaries(sent)
    followers = [Follower(log) for _ in range(3)]
    async with trio.open_nursery() as nursery:
        log.attach(nursery)
        for follower in followers:
            await nursery.start(follower.run)
        for (fd, payload), end in zip(sent, ends, strict=True):
            await log.wait_room()
            log.append(fd, payload)
            for follower in followers:  # each one waits at the end for the next record
                await follower.reach(end)
        assert log._tail, "followed while output flows: the tail holds records"
        log.close()
    assert paths["file"] == 0 and paths["memory"] >= len(sent)
    from_file = await collect(log.chunks(0, MAX_CHUNK, None, timestamps=True))
    assert [c.position for c in from_file] == ends
    for follower in followers:
        check_against_log(follower.chunks, from_file)
        assert [c.position for c in follower.chunks] == ends  # one record per wake-up
    for one, other in zip(followers[0].chunks, followers[1].chunks, strict=True):
        assert one is other  # the same chunk object: its frame is encoded once
    assert log._tail is None and log._followers == 0  # nobody follows: nothing kept


async def test_a_follower_behind_the_tail_reads_the_file_then_memory_again(
        tmp_path: Path, paths: Counter[str], monkeypatch: pytest.MonkeyPatch) -> None:
    """A follower that stops for a while falls behind the (bounded) tail: it reads
    the file, catches up, and takes the newest records from memory again."""
    monkeypatch.setattr(_outputlog, "TAIL_LIMIT", 3 * MAX_RECORD)
    path = tmp_path / "x.log"
    _outputlog.create_file(path)
    log = OutputLog(path, 1 << 40)
    sent = records(80)
    ends = boundaries(sent)
    async with trio.open_nursery() as nursery:
        log.attach(nursery)
        gen = log.chunks(0, MAX_CHUNK, None)
        async with contextlib.aclosing(gen):
            log.append(*sent[0])
            with trio.fail_after(TIMEOUT):
                first = await gen.__anext__()
            assert first.position == ends[0]
            for fd, payload in sent[1:60]:  # meanwhile the job writes on, the follower sleeps
                await log.wait_room()
                log.append(fd, payload)
            with trio.fail_after(TIMEOUT):
                await log.flush()
            assert log.end - ends[0] > _outputlog.TAIL_LIMIT
            assert paths["file"] == 0
            rest: list[OutputChunk] = []
            with trio.fail_after(TIMEOUT):
                while not rest or rest[-1].position < ends[59]:
                    rest.append(await gen.__anext__())
            assert paths["file"] >= 1  # behind the tail: from the file
            before = paths["memory"]
            for (fd, payload), end in zip(sent[60:], ends[60:], strict=True):
                log.append(fd, payload)
                with trio.fail_after(TIMEOUT):
                    chunk = await gen.__anext__()
                assert chunk.position == end
                rest.append(chunk)
            assert paths["memory"] - before == len(sent) - 60  # at the end again: memory
        log.close()
    assert paths["file"] >= 1
    from_file = await collect(log.chunks(0, MAX_CHUNK, None, timestamps=True))
    check_against_log([first, *rest], from_file)


async def test_a_follower_never_sees_what_the_writer_has_not_committed(
        tmp_path: Path, paths: Counter[str]) -> None:
    """While the writer falls behind (here: no writer thread free), queued records
    are nobody's: followers wait; then they get them, in order, at their positions."""
    path = tmp_path / "x.log"
    _outputlog.create_file(path)
    writers = trio.CapacityLimiter(1)
    log = OutputLog(path, 1 << 40, writers=writers)
    sent = [(fd, payload) for fd, payload in records(40) if len(payload) < MAX_RECORD]
    assert sum(len(d) for _fd, d in sent) < _outputlog.QUEUE_LIMIT // 2  # all fit the queue
    ends = boundaries(sent)
    follower = Follower(log)
    async with trio.open_nursery() as nursery:
        log.attach(nursery)
        await nursery.start(follower.run)
        await writers.acquire()  # the writer is behind: it cannot write for now
        for fd, payload in sent:
            log.append(fd, payload)
        await trio.testing.wait_all_tasks_blocked()
        assert (log.end, follower.chunks) == (0, [])
        writers.release()
        await follower.reach(ends[-1])
        log.close()
    assert paths["memory"] >= 1
    check_against_log(follower.chunks, await collect(
        log.chunks(0, MAX_CHUNK, None, timestamps=True)))


@pytest.mark.parametrize("space", [0, 3 * MAX_RECORD + 12345])
async def test_on_a_full_disk_followers_get_exactly_what_the_log_kept(
        tmp_path: Path, paths: Counter[str], monkeypatch: pytest.MonkeyPatch,
        space: int) -> None:
    """A write that fails (a short write at the limit, then ENOSPC) seals the log:
    followers fed from memory get the kept prefix, never a byte of what was dropped,
    and end with the log."""
    disk_that_fills(monkeypatch, space)
    path = tmp_path / "x.log"
    _outputlog.create_file(path)
    log = OutputLog(path, 1 << 40)
    sent = records(40)
    followers = [Follower(log) for _ in range(2)]
    async with trio.open_nursery() as nursery:
        log.attach(nursery)
        for follower in followers:
            await nursery.start(follower.run)
        for fd, payload in sent:
            await log.wait_room()
            end = log.end
            log.append(fd, payload)
            await log.flush()
            if log.end > end:
                for follower in followers:
                    await follower.reach(log.end)
        log.close()
    total = sum(len(d) for _fd, d in sent)
    assert log.output_bytes + log.dropped_bytes == total
    assert (0 < log.output_bytes < space) if space else log.output_bytes == 0
    assert recover(path) == (log.end, log.output_bytes)
    from_file = await collect(log.chunks(0, MAX_CHUNK, None, timestamps=True))
    for follower in followers:
        check_against_log(follower.chunks, from_file)
    if space:
        assert paths["memory"] >= 1


def runs(chunks: list[OutputChunk]) -> list[tuple[int, bytes, int | None]]:
    """Output merged into runs of one fd; a terminal's size chunks stay apart, with
    their times (how chunks are cut within a run may differ by reader)."""
    out: list[tuple[int, bytes, int | None]] = []
    for c in chunks:
        if out and out[-1][0] == c.fd and c.fd != TERMINAL_FD:
            out[-1] = (c.fd, out[-1][1] + c.data, out[-1][2])
        else:
            out.append((c.fd, c.data, c.time_ns if c.fd == TERMINAL_FD else None))
    return out


@pytest.mark.parametrize(("timestamps", "resizes"),
                         [(False, False), (False, True), (True, False), (True, True)])
async def test_a_terminals_size_records_from_memory_as_from_the_file(
        tmp_path: Path, paths: Counter[str], timestamps: bool, resizes: bool) -> None:
    """A terminal job's size records are in the tail like any record: skipped, or
    given alone with their time (``resizes``), exactly as a reader of the file has
    them, and a follower's positions stay record boundaries."""
    path = tmp_path / "x.log"
    _outputlog.create_file(path)
    log = OutputLog(path, 1 << 40)
    log.terminal_size = (24, 80)
    follower = Follower(log, timestamps=timestamps, resizes=resizes)
    async with trio.open_nursery() as nursery:
        log.attach(nursery)
        await nursery.start(follower.run)
        for i in range(12):
            if i % 3 == 1:
                log.resize(30 + i, 100)
            if i == 7:
                log.resize(50, 50)
                log.resize(51, 51)  # two resizes, one record: the last size
            end = log.end
            log.append(1 + i % 2, b"%d" % i * (i + 1))
            with trio.fail_after(TIMEOUT):
                await log.wait_beyond(end)
            await follower.reach(log.end)
        log.close()
    chunks = follower.chunks
    assert paths["file"] == 0
    from_file = await collect(log.chunks(0, MAX_CHUNK, log.end, timestamps=timestamps,
                                         resizes=resizes))
    assert runs(chunks) == runs(from_file)
    sizes = [c.data for c in from_file if c.fd == TERMINAL_FD]
    assert len(sizes) == (4 if resizes else 0)
    for chunk in chunks:
        log.check_position(chunk.position)
        assert (chunk.time_ns is not None) == (timestamps or chunk.fd == TERMINAL_FD)


def test_the_frame_of_a_shared_chunk_is_encoded_once() -> None:
    """Followers of one job send the same chunk object: its "out" frame is made
    once (the last one is kept); equal bytes in another object, another position,
    or a buffer that may change make their own, and every frame is the general
    encoder's."""
    data = os.urandom(100_000)
    frame = encode_output_chunk(1, data, 4242)
    assert frame == encode_frame(p.OutputChunk(1, data, 4242))
    assert encode_output_chunk(1, data, 4242) is frame
    copy = bytes(bytearray(data))
    assert copy is not data
    for fd, chunk, position in ((1, copy, 4242), (2, data, 4242), (1, data, 4243)):
        again = encode_output_chunk(fd, chunk, position)
        assert again is not frame
        assert again == encode_frame(p.OutputChunk(fd, chunk, position))
    buffer = bytearray(data)
    first = encode_output_chunk(1, buffer, 7)
    buffer[0] ^= 1
    assert encode_output_chunk(1, buffer, 7) == encode_frame(p.OutputChunk(1, bytes(buffer), 7))
    assert first == encode_frame(p.OutputChunk(1, data, 7))
    with pytest.raises(p.LocalProtocolError):  # the limit is checked for every sender
        encode_output_chunk(1, data, 4242, max_frame_size=1000)
