"""Job engine: the output log, its readers and followers, the cap and write errors."""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

import pytest
import trio
import trio.testing

from jobd.engine import (
    MAX_RECORD,
    BadPosition,
    JobManager,
    OutputChunk,
    _outputlog,
    open_job_manager,
)
from jobd.engine._outputlog import HEADER_SIZE, OutputLog, encode_header, recover
from protocol import JobState
from tests.engine_helpers import (
    TIMEOUT,
    collect,
    config,
    data,
    disk_that_fills,
    log_file,
    manager,
    open_fds,
    wait_for_output,
)

__all__ = ["manager"]  # the fixture


def merged(chunks: list[OutputChunk]) -> list[tuple[int, bytes]]:
    """(fd, bytes) runs: how chunks are cut within a run of one fd may differ by reader."""
    out: list[tuple[int, bytes]] = []
    for c in chunks:
        if out and out[-1][0] == c.fd:
            out[-1] = (c.fd, out[-1][1] + c.data)
        else:
            out.append((c.fd, c.data))
    return out


@pytest.fixture
def random_file(tmp_path: Path) -> tuple[Path, bytes]:
    content = os.urandom(8 << 20)
    path = tmp_path / "random.bin"
    path.write_bytes(content)
    return path, content


# -- the log itself --------------------------------------------------------------


async def write_records(path: Path, records: list[tuple[int, bytes]]) -> OutputLog:
    _outputlog.create_file(path)
    log = OutputLog(path, 1 << 30)
    async with trio.open_nursery() as nursery:
        log.attach(nursery)
        for fd, payload in records:
            await log.wait_room()
            log.append(fd, payload)
        await log.flush()
    log.close()
    return log


async def test_chunks_coalesce_one_fd_up_to_max_chunk(tmp_path: Path) -> None:
    big = MAX_RECORD
    records = [(1, b"a" * 10), (1, b"b" * 10), (2, b"c" * 5), (1, b"d" * big), (1, b"e" * big)]
    log = await write_records(tmp_path / "x.log", records)
    ends = []
    offset = 0
    for _fd, payload in records:
        offset += HEADER_SIZE + len(payload)
        ends.append(offset)
    assert log.end == ends[-1] and log.output_bytes == sum(len(p) for _f, p in records)
    chunks = await collect(log.chunks(0, MAX_RECORD, log.end))
    assert chunks == [OutputChunk(1, b"a" * 10 + b"b" * 10, ends[1]),
                      OutputChunk(2, b"c" * 5, ends[2]),
                      OutputChunk(1, b"d" * big, ends[3]), OutputChunk(1, b"e" * big, ends[4])]
    chunks = await collect(log.chunks(0, 2 * MAX_RECORD, None))  # closed: follow ends too
    assert [(c.fd, len(c.data), c.position) for c in chunks] == [
        (1, 20, ends[1]), (2, 5, ends[2]), (1, 2 * big, ends[4])]


async def test_writer_thread_takes_records_while_lingering_and_stops_on_close(
        tmp_path: Path) -> None:
    """Records queued in a burst, or appended while the writer thread lingers after
    a commit, all land once and in order; a close while it lingers ends it."""
    path = tmp_path / "x.log"
    _outputlog.create_file(path)
    log = OutputLog(path, 1 << 30)
    sent: list[tuple[int, bytes]] = []

    def record(i: int) -> tuple[int, bytes]:
        sent.append((1 + i % 2, b"%d;" % i * (1 + i * 97 % 4000)))
        return sent[-1]

    async with trio.open_nursery() as nursery:
        log.attach(nursery)
        for i in range(40):  # a burst: the thread takes whole batches
            await log.wait_room()
            log.append(*record(i))
        for i in range(40, 60):  # one at a time: each lands while the thread lingers
            end = log.end
            log.append(*record(i))
            with trio.fail_after(TIMEOUT):
                await log.wait_beyond(end)
        log.close()  # usually while the thread lingers: it must end, not wait it out
        with trio.fail_after(TIMEOUT):
            await log.flush()
    total = sum(len(d) for _fd, d in sent)
    assert (log.output_bytes, log.dropped_bytes) == (total, 0)
    chunks = await collect(log.chunks(0, 2 * MAX_RECORD, None))
    assert merged(chunks) == merged([OutputChunk(fd, d, 0) for fd, d in sent])
    assert recover(path) == (log.end, total)


async def test_busy_logs_take_turns_for_the_writer_threads(tmp_path: Path) -> None:
    """One writer thread, a log that never stops getting records: another log's
    record is still written (the busy one hands the thread back after a slice)."""
    writers = trio.CapacityLimiter(1)
    busy, other = (OutputLog(tmp_path / f"{name}.log", 1 << 40, writers=writers)
                   for name in ("busy", "other"))
    record = b"x" * MAX_RECORD
    async with trio.open_nursery() as nursery:
        busy.attach(nursery)
        other.attach(nursery)

        async def flood() -> None:
            while True:
                await busy.wait_room()
                busy.append(1, record)
                await trio.lowlevel.checkpoint()

        nursery.start_soon(flood)
        with trio.fail_after(TIMEOUT):
            await busy.wait_beyond(0)  # the busy log holds the thread
            other.append(2, b"me too")
            await other.wait_beyond(0)
        nursery.cancel_scope.cancel()
    busy.close()
    other.close()
    assert data(await collect(other.chunks(0, MAX_RECORD, None))) == b"me too"


async def test_positions_are_checked(tmp_path: Path) -> None:
    log = await write_records(tmp_path / "x.log", [(1, b"hello"), (2, b"world")])
    first = HEADER_SIZE + 5
    for good in (0, first, log.end):
        log.check_position(good)
    for bad in (-1, 1, first - 1, first + 1, log.end + 1, 10**12):
        with pytest.raises(BadPosition):
            log.check_position(bad)
    with pytest.raises(BadPosition):
        log.check_position("0")  # type: ignore[arg-type]


async def test_recover_cuts_a_torn_tail(tmp_path: Path) -> None:
    path = tmp_path / "x.log"
    log = await write_records(path, [(1, b"hello"), (2, b"world")])
    whole = path.read_bytes()
    with path.open("ab") as f:  # a header promising 100 bytes, and only 10 of them
        f.write(encode_header(1, 100, 0, log.end) + b"x" * 10)
    assert recover(path) == (log.end, 10)
    assert path.read_bytes() == whole
    with path.open("ab") as f:  # half a header
        f.write(encode_header(1, 100, 0, log.end)[:7])
    assert recover(path) == (log.end, 10)
    assert path.read_bytes() == whole


# -- real jobs ---------------------------------------------------------------------


async def test_late_follower_replays_everything(manager: JobManager) -> None:
    status = await manager.start([b"sh", b"-c", b"echo one; echo two >&2; echo three"], "a")
    await manager.wait(status.id)
    chunks = await collect(manager.follow_output(status.id))
    assert data(chunks, 1) == b"one\nthree\n" and data(chunks, 2) == b"two\n"
    assert manager.status(status.id).output_bytes == 14


async def test_random_binary_round_trips(manager: JobManager,
                                         random_file: tuple[Path, bytes]) -> None:
    path, content = random_file
    status = await manager.start([b"cat", os.fsencode(path)], "a")
    live = await collect(manager.follow_output(status.id))
    final = await manager.wait(status.id)
    assert final.describe() == "exited: 0"
    assert data(live, 1) == content and data(live, 2) == b""
    assert data(await collect(manager.read_output(status.id))) == content
    assert final.output_bytes == len(content) and final.dropped_bytes == 0
    assert all(len(c.data) <= 512 * 1024 for c in live)


async def test_concurrent_followers_get_identical_bytes(manager: JobManager) -> None:
    script = b"for i in $(seq 300); do echo out$i; echo err$i >&2; done"
    status = await manager.start([b"sh", b"-c", script], "a")
    results: list[list[OutputChunk]] = []

    async def follow() -> None:
        results.append(await collect(manager.follow_output(status.id)))

    async with trio.open_nursery() as nursery:
        for _ in range(4):
            nursery.start_soon(follow)
    late = merged(await collect(manager.read_output(status.id)))
    assert all(merged(r) == late for r in results)
    out = data(results[0], 1).split()
    err = data(results[0], 2).split()
    assert out == [b"out%d" % i for i in range(1, 301)]  # order kept per fd, fds right
    assert err == [b"err%d" % i for i in range(1, 301)]


async def test_resume_from_a_chunk_position(manager: JobManager,
                                            random_file: tuple[Path, bytes]) -> None:
    path, content = random_file
    status = await manager.start([b"head", b"-c", b"1000000", os.fsencode(path)], "a")
    await manager.wait(status.id)
    chunks = await collect(manager.read_output(status.id, max_chunk=MAX_RECORD))
    assert len(chunks) >= 1000000 // MAX_RECORD
    for k in (0, 3, len(chunks) // 2, len(chunks) - 2):
        seen = data(chunks[:k + 1])
        rest = await collect(manager.read_output(status.id, chunks[k].position))
        assert seen + data(rest) == content[:1000000]
        rest = await collect(manager.follow_output(status.id, chunks[k].position))
        assert seen + data(rest) == content[:1000000]
    assert await collect(manager.read_output(status.id, chunks[-1].position)) == []


async def test_bad_positions(manager: JobManager, tmp_path: Path) -> None:
    source = await manager.start([b"echo", b"hello"], "a")
    await manager.wait(source.id)
    # A job that prints another job's log: headers inside its data, at the wrong offsets.
    log_path = log_file(tmp_path, source.id)
    copy = await manager.start([b"cat", os.fsencode(log_path)], "a")
    await manager.wait(copy.id)
    assert data(await collect(manager.read_output(copy.id))) == log_path.read_bytes()
    end = manager.status(copy.id).output_bytes + HEADER_SIZE
    for bogus in (-1, 1, HEADER_SIZE, end + 1):
        with pytest.raises(BadPosition):
            manager.read_output(copy.id, bogus)
        with pytest.raises(BadPosition):
            manager.follow_output(copy.id, bogus)
    with pytest.raises(ValueError):
        manager.read_output(copy.id, max_chunk=MAX_RECORD - 1)


async def test_read_output_gives_only_what_exists_now(manager: JobManager) -> None:
    status = await manager.start([b"sh", b"-c", b"echo first; exec sleep 1000"], "a")
    await wait_for_output(manager, status.id, b"first\n")
    assert data(await collect(manager.read_output(status.id))) == b"first\n"
    assert manager.status(status.id).running
    await manager.stop(status.id)


async def test_follower_wakes_on_new_output_and_ends_with_the_job(
        manager: JobManager, tmp_path: Path) -> None:
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    status = await manager.start([b"sh", b"-c", b'echo one; cat "$0"', os.fsencode(fifo)], "a")
    got: list[OutputChunk] = []

    async def follow() -> None:
        got.extend(await collect(manager.follow_output(status.id)))

    async with trio.open_nursery() as nursery:
        nursery.start_soon(follow)
        await wait_for_output(manager, status.id, b"one\n")
        await trio.testing.wait_all_tasks_blocked(0.05)
        assert got == []  # still following: the job runs
        await trio.to_thread.run_sync(fifo.write_bytes, b"two\n")  # cat prints it and ends
    final = await manager.wait(status.id)
    assert final.describe() == "exited: 0" and data(got) == b"one\ntwo\n"


async def test_closing_a_reader_early_releases_its_file(manager: JobManager) -> None:
    status = await manager.start([b"sh", b"-c", b"echo a; exec sleep 1000"], "a")
    await wait_for_output(manager, status.id, b"a\n")
    before = open_fds()
    unused = manager.follow_output(status.id)  # never iterated: holds nothing
    for reader in (manager.follow_output(status.id), manager.read_output(status.id)):
        async with contextlib.aclosing(reader):  # type: ignore[type-var]
            async for _chunk in reader:
                assert open_fds() == before + 1
                break
        assert open_fds() == before
    del unused
    assert open_fds() == before
    await manager.stop(status.id)


async def test_a_stalled_follower_does_not_slow_the_job(manager: JobManager) -> None:
    size = 4 << 20
    status = await manager.start([b"head", b"-c", str(size).encode(), b"/dev/zero"], "a")
    stalled = manager.follow_output(status.id)
    async with contextlib.aclosing(stalled):  # type: ignore[type-var]
        first = await stalled.__anext__()
        with trio.fail_after(TIMEOUT):
            final = await manager.wait(status.id)  # the job ends while the follower sleeps
        assert final.output_bytes == size
        rest = b"".join([c.data async for c in stalled])
    assert len(first.data) + len(rest) == size


async def test_cap_drops_and_counts_the_excess(tmp_path: Path) -> None:
    async with open_job_manager(config(tmp_path, output_cap=1000)) as manager:
        status = await manager.start(
            [b"sh", b"-c", b"head -c 300000 /dev/zero; echo still-running >&2; exit 7"], "a")
        final = await manager.wait(status.id)
        assert final.describe() == "exited: 7"  # never blocked, never killed
        assert final.output_bytes == 1000
        assert final.dropped_bytes == 300000 + len(b"still-running\n") - 1000
        assert data(await collect(manager.read_output(status.id))) == b"\0" * 1000


@pytest.mark.parametrize("space", [0, 200_000])
async def test_write_errors_keep_a_whole_prefix_and_drop_the_rest(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        random_file: tuple[Path, bytes], space: int) -> None:
    path, content = random_file
    disk_that_fills(monkeypatch, space)
    async with open_job_manager(config(tmp_path)) as manager:
        status = await manager.start([b"cat", os.fsencode(path)], "a")
        final = await manager.wait(status.id)
        assert final.describe() == "exited: 0"
        assert (0 < final.output_bytes < space) if space else final.output_bytes == 0
        assert final.output_bytes + final.dropped_bytes == len(content)
        kept = data(await collect(manager.read_output(status.id)))
        assert kept == content[:final.output_bytes]
    log_path = log_file(tmp_path, status.id)
    size = log_path.stat().st_size
    assert recover(log_path) == (size, final.output_bytes)  # no torn record was left


async def test_output_survives_a_restart_and_bytes_past_the_recorded_end_are_never_read(
        tmp_path: Path) -> None:
    """A finished job's log is trusted up to the size its record gives (a restart does
    not walk every log of the history); a running job's log is walked (test_engine_persist)."""
    async with open_job_manager(config(tmp_path)) as manager:
        status = await manager.start([b"sh", b"-c", b"echo out; echo err >&2"], "a")
        await manager.wait(status.id)
        before = await collect(manager.read_output(status.id))
    log_path = log_file(tmp_path, status.id)
    size = log_path.stat().st_size
    with log_path.open("ab") as f:
        f.write(encode_header(1, 50, 0, size) + b"torn")
    async with open_job_manager(config(tmp_path)) as manager:
        assert await collect(manager.read_output(status.id)) == before
        assert await collect(manager.follow_output(status.id)) == before
        assert manager.status(status.id).output_bytes == 8


async def test_a_job_that_is_followed_and_stopped_ends_every_follower(
        manager: JobManager) -> None:
    status = await manager.start([b"sh", b"-c", b"echo go; exec sleep 1000"], "a")
    results: list[bytes] = []

    async def follow() -> None:
        results.append(data(await collect(manager.follow_output(status.id))))

    async with trio.open_nursery() as nursery:
        for _ in range(3):
            nursery.start_soon(follow)
        await wait_for_output(manager, status.id, b"go\n")
        final = await manager.stop(status.id)
    assert final.state is JobState.STOPPED
    assert results == [b"go\n"] * 3
