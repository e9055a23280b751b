"""One job's output log: the record format, the appender and the readers.

Theory of operation
-------------------

A job's output is one append-only file of records, in the order jobd read them
from the job's pipes. A record is a 20-byte header and the bytes::

    offset  size  field
    0       1     magic 0xA7
    1       1     fd: 1 (stdout) or 2 (stderr)
    2       2     reserved, 0
    4       4     length of the data (uint32, 1..MAX_RECORD)
    8       8     time the bytes were read (int64 ns since the Unix epoch)
    16      4     check: CRC-32 of bytes 0..15 followed by the record's own file
                  offset (uint64); it makes a header recognisable *at its place*,
                  so a job that prints another job's log (headers and all) can
                  never make an offset inside its data pass for a record boundary.

All integers are little-endian. A position handed to readers is a file offset
at a record boundary; :meth:`OutputLog.check_position` verifies one by reading
the header there (O(1), no walk from the start).

Writing. The pumps (one per pipe) call :meth:`OutputLog.append`, which only
queues the record; a writer task, started on demand in the job's nursery,
runs a worker thread that writes queued records with one ``pwritev`` per batch
and lingers briefly for more, so a busy job costs one thread hand-off per
burst rather than per record. A slow disk (writeback throttling, a failing
device) stalls only this job's pipes, never the event loop (numbers in
docs/engine.md). The queue is bounded (:data:`QUEUE_LIMIT`); a pump waits for
room before it reads again, so the job is drained at the disk's pace and memory
stays flat whatever the volume. ``end`` advances only after the loop committed
a written batch, so readers never see a half-written record.

Dropping. Bytes beyond the cap are cut at :meth:`append` time and counted in
``dropped_bytes``. A write error (ENOSPC, EIO, ...) or a short write truncates
the file back to the last whole record and *seals* the log: everything after is
drained and counted as dropped, so what is kept is always a prefix of the
output, never a log with holes.

Reading. :meth:`OutputLog.chunks` reads large blocks with ``preadv`` and
``RWF_NOWAIT`` in the event loop (page-cache hits, the live case, cost no
thread hop) and falls back to a worker thread when the data is not cached.
Consecutive records of one fd are coalesced into one chunk of at most
``max_chunk`` bytes (with ``timestamps``, every record is its own chunk, with
its time: :func:`_records`). A follower waits on an event the appender sets after each
commit: no polling. Every reader has its own file descriptor, so a slow one
slows only itself.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import struct
import threading
import time
import zlib
from collections.abc import AsyncGenerator
from pathlib import Path

import trio

from ._statedir import DIR_FLAGS
from ._types import BadPosition, EngineError, OutputChunk

log = logging.getLogger("jobd.engine")

MAGIC = 0xA7
HEADER = struct.Struct("<BBHIqI")
HEADER_SIZE = HEADER.size  # 20
_OFFSET = struct.Struct("<Q")

#: Largest record payload: one pipe read. Readers need max_chunk >= this.
MAX_RECORD = 256 * 1024
#: Bytes (plus a per-record overhead) that may wait in memory for the writer
#: (queued or being written): four full pipe reads, enough to keep the writer
#: busy while the pumps read on.
QUEUE_LIMIT = 1024 * 1024
#: Memory accounted per queued record on top of its data, so tiny records count.
_RECORD_COST = 128
#: How long the writer thread waits for the next record before it hands back.
LINGER = 0.005
#: How long one writer thread keeps writing before it hands back anyway, so that
#: more busy jobs than writer threads take turns (and none starves).
SLICE = 0.05
#: Records per pwritev (two iovecs each; IOV_MAX is 1024 on Linux).
_MAX_BATCH = 512
#: Read beyond max_chunk for the headers of the records a chunk coalesces (200 of them).
_HEADER_ALLOWANCE = 200 * HEADER_SIZE
#: Block size for the crash-recovery scan.
_SCAN_BLOCK = 1 << 20


#: The write call (a seam for tests that simulate a full disk or a short write).
_pwritev = os.pwritev


def _check(header16: bytes | memoryview, offset: int) -> int:
    return zlib.crc32(_OFFSET.pack(offset), zlib.crc32(header16))


def encode_header(fd: int, length: int, time_ns: int, offset: int) -> bytes:
    head = HEADER.pack(MAGIC, fd, 0, length, time_ns, 0)[:16]
    return head + _check(head, offset).to_bytes(4, "little")


def decode_header(buf: bytes | bytearray | memoryview, at: int, offset: int) -> tuple[int, int]:
    """(fd, length) of the header at ``buf[at:]`` that must sit at file ``offset``.

    Raises ValueError if it is not a valid header for that offset.
    """
    magic, fd, reserved, length, _time, check = HEADER.unpack_from(buf, at)
    if (magic != MAGIC or fd not in (1, 2) or reserved != 0 or not 0 < length <= MAX_RECORD
            or check != _check(memoryview(buf)[at:at + 16], offset)):
        raise ValueError(f"no record header at offset {offset}")
    return fd, length


def open_log(path: Path, flags: int, dir_fd: int | None = None, name: str | None = None) -> int:
    """Open a log file, never through a symlink (ELOOP).

    With ``dir_fd``: ``name`` (``SHARD/FILE``, or ``path``'s name) relative to
    that directory (the state directory's logs, see _statedir), each component
    opened with O_NOFOLLOW; with O_CREAT the shard directory is made (0700).
    """
    flags |= os.O_NOFOLLOW | os.O_CLOEXEC
    if dir_fd is None:
        return os.open(path, flags, 0o600)
    shard, _, leaf = (name or path.name).rpartition("/")
    if not shard:
        return os.open(leaf, flags, 0o600, dir_fd=dir_fd)
    if flags & os.O_CREAT:
        with contextlib.suppress(FileExistsError):
            os.mkdir(shard, 0o700, dir_fd=dir_fd)
    shard_fd = os.open(shard, DIR_FLAGS, dir_fd=dir_fd)
    try:
        return os.open(leaf, flags, 0o600, dir_fd=shard_fd)
    finally:
        os.close(shard_fd)


def create_file(path: Path, dir_fd: int | None = None, name: str | None = None) -> None:
    """Create an empty log (blocking: call from a worker thread)."""
    os.close(open_log(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, dir_fd, name))


def recover(path: Path, dir_fd: int | None = None, name: str | None = None) -> tuple[int, int]:
    """Truncate a log after a crash to its last whole record (blocking).

    Returns (size, data bytes). A missing log counts as empty; a symlink
    raises OSError (ELOOP).
    """
    try:
        fd = open_log(path, os.O_RDWR, dir_fd, name)
    except FileNotFoundError:
        return 0, 0
    try:
        size = os.fstat(fd).st_size
        pos = data = 0
        block = b""
        base = 0  # file offset of block[0]
        while pos + HEADER_SIZE <= size:
            at = pos - base
            if at + HEADER_SIZE > len(block):
                base, at = pos, 0
                block = os.pread(fd, _SCAN_BLOCK, pos)
                if len(block) < HEADER_SIZE:
                    break
            try:
                _fd, length = decode_header(block, at, pos)
            except ValueError:
                break
            if pos + HEADER_SIZE + length > size:
                break
            pos += HEADER_SIZE + length
            data += length
        if pos < size:
            log.warning("output log %s: truncating a torn tail at %d (size %d)", path, pos, size)
            os.ftruncate(fd, pos)
        return pos, data
    finally:
        os.close(fd)


class Budget:
    """What an owner's logs may still take on disk (``--max-log-space-per-user``), in
    file bytes (record headers included); shared by the owner's logs."""

    __slots__ = ("left",)

    def __init__(self, left: int) -> None:
        self.left = left


class OutputLog:
    """The appender and reader state of one job's log file.

    ``end`` is the committed size (whole records only); ``closed`` means no
    more records will ever be appended (the job ended), so readers that reach
    ``end`` are done.
    """

    __slots__ = (
        "_accepted", "_budget", "_changed", "_cond", "_dir_fd", "_done", "_failed", "_fd",
        "_idle", "_lingering", "_name", "_nursery", "_posted", "_queue", "_queued_cost",
        "_room", "_token", "_writers", "_writing", "cap", "closed", "dropped_bytes", "end",
        "output_bytes", "path",
    )

    def __init__(self, path: Path, cap: int, *, end: int = 0, output_bytes: int = 0,
                 dropped_bytes: int = 0, closed: bool = False,
                 writers: trio.CapacityLimiter | None = None,
                 dir_fd: int | None = None, name: str | None = None,
                 budget: Budget | None = None) -> None:
        self.path = path
        self._dir_fd = dir_fd  # the directory ``name`` is opened relative to (None: none)
        self._name = name
        self._budget = budget  # the owner's disk quota for output, shared (None: none)
        self._writers = writers  # the threads logs write with (None: Trio's default)
        self.cap = cap
        self.end = end
        self.output_bytes = output_bytes
        self.dropped_bytes = dropped_bytes
        self.closed = closed
        self._accepted = output_bytes  # committed + queued data bytes (for the cap)
        self._queue: list[tuple[int, bytes, int]] = []  # (fd, data, time_ns)
        self._queued_cost = 0
        self._fd: int | None = None
        self._failed: str | None = None
        self._writing = False
        self._nursery: trio.Nursery | None = None
        self._changed: trio.Event | None = None
        self._room: trio.Event | None = None
        self._idle: trio.Event | None = None
        # Shared with the writer thread, under _cond: the queue, the finished batches.
        self._cond = threading.Condition(threading.Lock())
        self._done: list[tuple[list[tuple[int, bytes, int]], int, str | None]] = []
        self._posted = False
        self._lingering = False
        self._token: trio.lowlevel.TrioToken | None = None

    # -- appending (the job's side) ---------------------------------------

    def attach(self, nursery: trio.Nursery) -> None:
        """Start writer tasks in ``nursery`` (the job's) from now on."""
        self._nursery = nursery

    async def wait_room(self) -> None:
        """Wait until the queue has room for one more record (backpressure)."""
        while self._queued_cost >= QUEUE_LIMIT:
            if self._room is None:
                self._room = trio.Event()
            await self._room.wait()

    def append(self, fd: int, data: bytes) -> None:
        """Queue one pipe read (at most MAX_RECORD bytes) for writing; never blocks."""
        assert not self.closed and 0 < len(data) <= MAX_RECORD
        room = self.cap - self._accepted
        if self._budget is not None:  # the owner's quota counts file bytes: headers too
            room = min(room, self._budget.left - HEADER_SIZE)
        keep = 0 if self._failed is not None else max(0, min(len(data), room))
        if keep < len(data):
            self.dropped_bytes += len(data) - keep
            if keep <= 0:
                return
            data = data[:keep]
        self._accepted += keep
        if self._budget is not None:
            self._budget.left -= keep + HEADER_SIZE
        self._queued_cost += keep + _RECORD_COST
        with self._cond:
            self._queue.append((fd, data, time.time_ns()))
            if self._lingering:
                self._cond.notify()
        if not self._writing:
            assert self._nursery is not None, "attach() the log before appending"
            self._writing = True
            self._nursery.start_soon(self._write_loop)

    async def flush(self) -> None:
        """Wait until every queued record is written (or dropped)."""
        while self._writing:
            if self._idle is None:
                self._idle = trio.Event()
            await self._idle.wait()

    def close(self) -> None:
        """No more appends: wake every reader so that it finishes at ``end``."""
        self.closed = True
        with self._cond:
            dropped, self._queue = self._queue, []
            self._cond.notify()
        self._drop(dropped)
        if self._fd is not None and not self._writing:  # else the writer closes it
            os.close(self._fd)
            self._fd = None
        self._notify()

    def _notify(self) -> None:
        if self._changed is not None:
            self._changed.set()
            self._changed = None

    def _drop(self, records: list[tuple[int, bytes, int]]) -> None:
        for _fd, data, _t in records:
            self.dropped_bytes += len(data)
            self._accepted -= len(data)
            if self._budget is not None:
                self._budget.left += len(data) + HEADER_SIZE
            self._queued_cost -= len(data) + _RECORD_COST
        self._wake_room()

    def _wake_room(self) -> None:
        if self._room is not None and self._queued_cost < QUEUE_LIMIT:
            self._room.set()
            self._room = None

    async def _write_loop(self) -> None:
        """Run the writer thread until the queue is empty (the job's nursery owns this)."""
        self._token = trio.lowlevel.current_trio_token()
        try:
            while self._queue and not self.closed:
                # Shielded: every batch the thread takes is either written and committed,
                # or truncated away; the thread is bounded by the kernel's writes.
                with trio.CancelScope(shield=True):
                    await trio.to_thread.run_sync(self._drain, limiter=self._writers)
                self._deliver()
        finally:
            self._writing = False
            if self.closed and self._fd is not None:
                os.close(self._fd)
                self._fd = None
            if self._idle is not None:
                self._idle.set()
                self._idle = None

    def _drain(self) -> None:
        """Writer thread: write queued batches while records keep coming.

        It waits up to LINGER for more before it returns, so a busy job costs one
        thread hand-off per burst, not one per record; after SLICE it returns
        anyway and the writer task queues for a thread again. Results go back to
        the loop through ``run_sync_soon`` (:meth:`_deliver`), at most one pending.
        """
        offset = self.end
        until = time.monotonic() + SLICE
        while True:
            if time.monotonic() > until:
                return
            with self._cond:
                if not self._queue and not self.closed:
                    self._lingering = True
                    self._cond.wait(LINGER)
                    self._lingering = False
                if not self._queue or self.closed:
                    return
                batch = self._queue[:_MAX_BATCH]
                del self._queue[:_MAX_BATCH]
            if self._failed is not None:
                written, error = 0, None
            else:
                iov: list[bytes] = []
                at = offset
                for fd, data, time_ns in batch:
                    iov.append(encode_header(fd, len(data), time_ns, at))
                    iov.append(data)
                    at += HEADER_SIZE + len(data)
                written, error = self._write_batch(iov, offset)
                offset += written
                if error is not None:
                    self._failed = error
            with self._cond:
                self._done.append((batch, written, error))
                post = not self._posted
                self._posted = True
            if post:
                assert self._token is not None
                self._token.run_sync_soon(self._deliver)

    def _deliver(self) -> None:
        """Commit what the writer thread finished (in the loop)."""
        with self._cond:
            done, self._done = self._done, []
            self._posted = False
        for batch, written, error in done:
            self._commit(batch, written, error)
        self._wake_room()

    def _write_batch(self, iov: list[bytes], offset: int) -> tuple[int, str | None]:
        """Write records at ``offset`` (writer thread). Returns (bytes of whole records, error).

        On a short write or an error the file is truncated back to the last whole
        record, so a record is never half there.
        """
        total = sum(len(b) for b in iov)
        try:
            if self._fd is None:  # made by its first write: a job without output has no log
                truncate = os.O_TRUNC if offset == 0 else 0
                self._fd = open_log(self.path, os.O_WRONLY | os.O_CREAT | truncate,
                                    self._dir_fd, self._name)
            written = _pwritev(self._fd, iov, offset)
        except OSError as exc:
            written, error = 0, os.strerror(exc.errno) if exc.errno else str(exc)
            if exc.errno == errno.ELOOP:  # planted in the logs directory: never followed
                error = "the log file is a symlink (not followed)"
        else:
            if written == total:
                return written, None
            error = f"short write ({written} of {total} bytes)"
        whole = 0
        for i in range(0, len(iov), 2):
            size = len(iov[i]) + len(iov[i + 1])
            if whole + size > written:
                break
            whole += size
        if self._fd is not None:
            with contextlib.suppress(OSError):
                os.ftruncate(self._fd, offset + whole)
        return whole, error

    def _commit(self, batch: list[tuple[int, bytes, int]], written: int,
                error: str | None) -> None:
        done = 0
        for _fd, data, _t in batch:
            size = HEADER_SIZE + len(data)
            self._queued_cost -= len(data) + _RECORD_COST
            if done + size <= written:
                done += size
                self.output_bytes += len(data)
            else:
                self.dropped_bytes += len(data)
                self._accepted -= len(data)
                if self._budget is not None:
                    self._budget.left += len(data) + HEADER_SIZE
        self.end += written
        if error is not None:
            log.warning("output log %s: %s; dropping further output", self.path, error)
        self._notify()

    # -- reading (any number of readers) ---------------------------------

    def check_position(self, position: int) -> None:
        """Raise BadPosition unless ``position`` is a record boundary of this log."""
        if not isinstance(position, int) or isinstance(position, bool):
            raise BadPosition(f"position must be an integer, not {type(position).__name__}")
        if position < 0 or position > self.end:
            raise BadPosition(f"{position} is outside the log (0..{self.end})")
        if position in (0, self.end):
            return
        try:
            fd = open_log(self.path, os.O_RDONLY, self._dir_fd, self._name)
        except FileNotFoundError:
            raise BadPosition(f"{position}: the log is gone") from None
        try:
            head = os.pread(fd, HEADER_SIZE, position)
        finally:
            os.close(fd)
        try:
            if len(head) < HEADER_SIZE:
                raise ValueError
            _fd, length = decode_header(head, 0, position)
        except ValueError:
            raise BadPosition(f"{position} is not a record boundary") from None
        if position + HEADER_SIZE + length > self.end:
            raise BadPosition(f"{position} is not a record boundary")

    async def wait_beyond(self, position: int) -> None:
        """Wait until the log has bytes after ``position`` or is closed."""
        while self.end <= position and not self.closed:
            if self._changed is None:
                self._changed = trio.Event()
            await self._changed.wait()

    async def chunks(self, position: int, max_chunk: int, until: int | None, *,
                     timestamps: bool = False) -> AsyncGenerator[OutputChunk, None]:
        """Chunks from ``position`` (validated by the caller).

        With ``until`` None it follows: waits for more until the log is closed
        and every byte was given. Else it stops at offset ``until``. With
        ``timestamps``, every record is its own chunk, with its time.
        """
        fd = -1  # opened once there is something to read: the first write makes the log
        try:
            while True:
                end = self.end if until is None else min(until, self.end)
                if position >= end:
                    if until is not None or self.closed:
                        return
                    await self.wait_beyond(position)
                    continue
                if fd < 0:
                    try:
                        fd = open_log(self.path, os.O_RDONLY, self._dir_fd, self._name)
                    except FileNotFoundError:
                        return  # deleted meanwhile: nothing more to give
                block = await _read_block(fd, position, min(end - position,
                                                            max_chunk + _HEADER_ALLOWANCE))
                records: list[OutputChunk] = []
                spans: list[tuple[int, list[tuple[int, int]], int]] = []
                try:
                    if timestamps:
                        records = _records(block, position)
                    else:
                        spans = _parse(block, position, max_chunk)
                except EngineError as exc:  # damage on disk: the operator must hear of it
                    log.warning("output log %s is damaged: %s; its output from there on "
                                "cannot be read (restore the file, or delete the job)",
                                self.path, exc)
                    raise
                for chunk in records:  # with timestamps: one chunk per record
                    yield chunk
                    position = chunk.position
                view = memoryview(block)
                for i, (chunk_fd, parts, after) in enumerate(spans):
                    data = b"".join(view[a:b] for a, b in parts)
                    if i == len(spans) - 1:
                        del block, view  # hold only the chunk while the consumer works
                    yield OutputChunk(chunk_fd, data, after)
                    position = after
        finally:
            if fd >= 0:
                os.close(fd)


def _parse(block: bytearray | bytes, base: int,
           max_chunk: int) -> list[tuple[int, list[tuple[int, int]], int]]:
    """Split a block read at file offset ``base`` into chunks.

    Returns [(fd, [(start, stop) slices of block], position after)], covering
    the whole records the block holds (at least one: blocks are read at least
    one maximal record long, or up to the committed end).
    """
    spans: list[tuple[int, list[tuple[int, int]], int]] = []
    at = 0
    cur_fd = 0
    parts: list[tuple[int, int]] = []
    size = 0
    while at + HEADER_SIZE <= len(block):
        try:
            fd, length = decode_header(block, at, base + at)
        except ValueError:
            raise EngineError(f"output log corrupt at offset {base + at}") from None
        stop = at + HEADER_SIZE + length
        if stop > len(block):
            break
        if parts and (fd != cur_fd or size + length > max_chunk):
            spans.append((cur_fd, parts, base + at))
            parts, size = [], 0
        cur_fd = fd
        parts.append((at + HEADER_SIZE, stop))
        size += length
        at = stop
    if parts:
        spans.append((cur_fd, parts, base + at))
    if not spans:
        raise EngineError(f"output log corrupt at offset {base}")
    return spans


def _records(block: bytearray | bytes, base: int) -> list[OutputChunk]:
    """The whole records of a block read at file offset ``base``, one chunk each,
    with its time (the ``timestamps`` reading; :func:`_parse` is the fast one)."""
    chunks: list[OutputChunk] = []
    at = 0
    while at + HEADER_SIZE <= len(block):
        try:
            fd, length = decode_header(block, at, base + at)
        except ValueError:
            raise EngineError(f"output log corrupt at offset {base + at}") from None
        stop = at + HEADER_SIZE + length
        if stop > len(block):
            break
        time_ns = HEADER.unpack_from(block, at)[4]
        chunks.append(OutputChunk(fd, bytes(block[at + HEADER_SIZE:stop]), base + stop, time_ns))
        at = stop
    if not chunks:
        raise EngineError(f"output log corrupt at offset {base}")
    return chunks


_nowait_reads = hasattr(os, "RWF_NOWAIT")


async def _read_block(fd: int, position: int, size: int) -> bytearray | bytes:
    """``size`` bytes at ``position``: in the loop if cached, else in a worker thread."""
    global _nowait_reads
    if _nowait_reads:
        buf = bytearray(size)
        try:
            if os.preadv(fd, [buf], position, os.RWF_NOWAIT) == size:
                await trio.lowlevel.checkpoint()
                return buf
        except BlockingIOError:
            pass
        except OSError as exc:
            if exc.errno not in (errno.EOPNOTSUPP, errno.EINVAL):
                raise
            _nowait_reads = False  # this kernel or file system cannot: always use threads
        del buf
    return await trio.to_thread.run_sync(os.pread, fd, size, position)
