"""One job's output log: the appender and its writer.

Theory of operation
-------------------

The record format and the log files are ``_logformat.py``; the readers
``_logreader.py`` (:meth:`OutputLog.chunks` and :meth:`OutputLog.check_position`
hand over to it). This module is the writing side: records come in from the
job's pumps, go to disk, and are committed (``end``) for the readers.

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

The tail in memory. While a job is followed (:meth:`OutputLog.follow`), each
commit also keeps the records it committed, with their offsets, in a short
list (:data:`TAIL_LIMIT`), and a follower whose position is one of them takes
its next chunk from there (:meth:`OutputLog.chunk_from_memory`) instead of
reading the file back: no ``pread``, no copy for a chunk of one record. Only
committed records ever enter it, so a follower sees exactly the bytes and
positions the log holds, and nothing a failed write dropped. The tail is
emptied when the writer goes idle and when the last follower leaves: it holds
memory only while output flows to someone. A follower behind the tail reads
the file, as every reader did before.
"""

from __future__ import annotations

import bisect
import contextlib
import errno
import logging
import os
import threading
import time
from collections.abc import AsyncGenerator, Callable
from operator import itemgetter
from pathlib import Path

import trio

from . import _logreader
from ._cgroups import join_thread
from ._logformat import (
    HEADER_SIZE,
    MAX_RECORD,
    TERMINAL_FD,
    TERMINAL_SIZE,
    create_file,
    decode_header,
    encode_header,
    open_log,
    recover,
)
from ._types import OutputChunk

log = logging.getLogger("jobd.engine")

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
#: Committed bytes (plus _RECORD_COST per record) kept in memory for followers while
#: output flows. A follower that keeps up with a busy job trails the committed end by
#: about one queue (QUEUE_LIMIT) and a record; twice that covered 99 % of its chunks
#: in a 1 GiB stream (1 MiB: two thirds).
TAIL_LIMIT = 2 * QUEUE_LIMIT
#: Records per pwritev (two iovecs each; IOV_MAX is 1024 on Linux).
_MAX_BATCH = 512


#: The write call (a seam for tests that simulate a full disk or a short write).
_pwritev = os.pwritev
#: Space the logs leave free for the job database: a batch that would leave less is
#: dropped as on a full disk, so that the records of starts and ends can still be
#: committed when output fills the file system (an end is shown only once it is on
#: disk). 5 % of the file system, at most RESERVE_MAX (like ext4's reserved blocks).
RESERVE_FRACTION = 0.05
RESERVE_MAX = 64 << 20


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
        "_followers", "_group", "_idle", "_lingering", "_name", "_nursery", "_posted", "_queue",
        "_queued_cost", "_resized", "_room", "_shared", "_tail", "_tail_cost", "_token", "_writers",
        "_writing", "cap", "closed", "dropped_bytes", "end", "output_bytes", "path",
        "terminal_size",
    )

    def __init__(self, path: Path, cap: int, *, end: int = 0, output_bytes: int = 0,
                 dropped_bytes: int = 0, closed: bool = False,
                 writers: trio.CapacityLimiter | None = None,
                 dir_fd: int | None = None, name: str | None = None,
                 budget: Budget | None = None,
                 group: Callable[[], tuple[str, str] | None] | None = None) -> None:
        self.path = path
        #: Where the writer thread does this log's work (cgroup v1: the owner's CPU
        #: group, as ``tasks`` files to join and to return to), so that writing a busy
        #: job's output is the owner's CPU time, not jobd's (issue 22 item 11).
        self._group = group
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
        # Made by the first append: a job that writes nothing never needs it (issue 26).
        self._cond: threading.Condition | None = None
        self._done: list[tuple[list[tuple[int, bytes, int]], int, str | None]] = []
        self._posted = False
        self._lingering = False
        self._token: trio.lowlevel.TrioToken | None = None
        #: A terminal job's size as last recorded (its starting size: set by the job).
        self.terminal_size: tuple[int, int] | None = None
        self._resized: tuple[tuple[int, int], int] | None = None  # ((rows, cols), time_ns)
        # The tail: (offset, fd, data, time_ns) of the last committed records (size
        # records too), in order and contiguous up to ``end``, kept while someone
        # follows (_followers > 0).
        self._tail: list[tuple[int, int, bytes, int]] | None = None  # None: nobody follows
        self._tail_cost = 0
        self._followers = 0
        # The last chunk taken from the tail, by (position, max_chunk, timestamps,
        # resizes): followers of one job take the same object, whose frame the
        # protocol then encodes once (protocol._frames.encode_output_chunk).
        self._shared: tuple[tuple[int, int, bool, bool], tuple[OutputChunk, int]] | None = None

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

    def resize(self, rows: int, cols: int) -> None:
        """The job's terminal was resized now: recorded (a TERMINAL_FD record with
        this time) just before the next output record. So resizes with no output
        between them make one record, the last size, and a resize back to the size
        last recorded makes none: there are never more size records than output
        records, whatever a client sends (docs/engine.md). A resize that no output
        follows before the job ends is not recorded: nothing was shown at that size."""
        self._resized = ((rows, cols), time.time_ns())

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
        records = [(fd, data, time.time_ns())]
        resized, self._resized = self._resized, None
        if (resized is not None and resized[0] != self.terminal_size
                and room - keep >= TERMINAL_SIZE.size + HEADER_SIZE):
            self.terminal_size = resized[0]
            records.insert(0, (TERMINAL_FD, TERMINAL_SIZE.pack(*resized[0]), resized[1]))
        for _fd, kept, _t in records:
            self._accepted += len(kept)
            if self._budget is not None:
                self._budget.left -= len(kept) + HEADER_SIZE
            self._queued_cost += len(kept) + _RECORD_COST
        cond = self._cond
        if cond is None:
            cond = self._cond = threading.Condition(threading.Lock())
        with cond:
            self._queue.extend(records)
            if self._lingering:
                cond.notify()
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
        if self._cond is not None:  # else nothing was ever queued
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
        for fd, data, _t in records:
            if fd != TERMINAL_FD:
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
            self._drop_tail()  # idle: followers that are behind read the file
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
        tasks = self._group() if self._group is not None else None
        if tasks is not None:
            try:
                join_thread(tasks[0])
            except OSError:
                tasks = None
        try:
            self._drain_slice()
        finally:
            if tasks is not None:
                with contextlib.suppress(OSError):
                    join_thread(tasks[1])

    def _drain_slice(self) -> None:
        cond = self._cond
        assert cond is not None  # the writer runs only after an append
        offset = self.end
        until = time.monotonic() + SLICE
        while True:
            if time.monotonic() > until:
                return
            with cond:
                if not self._queue and not self.closed:
                    self._lingering = True
                    cond.wait(LINGER)
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
            with cond:
                self._done.append((batch, written, error))
                post = not self._posted
                self._posted = True
            if post:
                assert self._token is not None
                self._token.run_sync_soon(self._deliver)

    def _deliver(self) -> None:
        """Commit what the writer thread finished (in the loop)."""
        assert self._cond is not None
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
            reserve = _reserve_short(self._fd, total)
            if reserve is not None:
                return 0, reserve
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
        tail = None
        if self._followers:
            tail = self._tail
            if tail is None:
                tail = self._tail = []
        for fd, data, time_ns in batch:
            size = HEADER_SIZE + len(data)
            self._queued_cost -= len(data) + _RECORD_COST
            output = fd != TERMINAL_FD  # a size record is no output
            if done + size <= written:
                if tail is not None:  # committed: followers may take it from memory
                    tail.append((self.end + done, fd, data, time_ns))
                    self._tail_cost += len(data) + _RECORD_COST
                done += size
                self.output_bytes += len(data) * output
            else:
                self.dropped_bytes += len(data) * output
                self._accepted -= len(data)
                if self._budget is not None:
                    self._budget.left += len(data) + HEADER_SIZE
        self.end += written
        if tail is not None:
            self._shared = None  # the tail grew: a chunk cut now may coalesce more
            if self._tail_cost > TAIL_LIMIT:
                self._trim_tail()
        if error is not None:
            log.warning("output log %s: %s; dropping further output", self.path, error)
        self._notify()

    def _trim_tail(self) -> None:
        tail = self._tail
        assert tail is not None
        cut = 0
        while self._tail_cost > TAIL_LIMIT and cut < len(tail) - 1:  # keep the newest
            self._tail_cost -= len(tail[cut][2]) + _RECORD_COST
            cut += 1
        del tail[:cut]

    def _drop_tail(self) -> None:
        self._tail = None
        self._tail_cost = 0
        self._shared = None

    # -- what the readers (_logreader.py) need of the log -------------------------

    def follow(self, delta: int) -> None:
        """A follower comes (+1) or goes (-1): commits keep a tail in memory while
        there is one (see the module's *The tail in memory*)."""
        self._followers += delta
        if not self._followers:
            self._drop_tail()

    def chunk_from_memory(self, position: int, max_chunk: int, *, timestamps: bool = False,
                          resizes: bool = False) -> tuple[OutputChunk | None, int] | None:
        """The chunk at ``position`` (a record boundary) from the tail and the position
        after it, or None when the tail does not hold that record (read the file).
        Records coalesce and size records are skipped (or, with ``resizes``, given
        alone) as :func:`_logreader.chunks` does from the file; the chunk is None
        when only skipped size records were left."""
        key = (position, max_chunk, timestamps, resizes)
        if self._shared is not None and self._shared[0] == key:
            return self._shared[1]  # the chunk another follower just took: the same object
        tail = self._tail
        if not tail or position < tail[0][0]:
            return None
        i = bisect.bisect_left(tail, position, key=_OFFSET)
        if i == len(tail) or tail[i][0] != position:
            return None
        while not resizes and tail[i][1] == TERMINAL_FD:  # skipped, as from the file
            position += HEADER_SIZE + len(tail[i][2])
            i += 1
            if i == len(tail):
                return None, position
        _offset, fd, data, time_ns = tail[i]
        after = position + HEADER_SIZE + len(data)
        if timestamps or fd == TERMINAL_FD:
            return OutputChunk(fd, data, after, time_ns), after
        found = self._coalesce(i, max_chunk)
        self._shared = (key, found)
        return found

    def _coalesce(self, i: int, max_chunk: int) -> tuple[OutputChunk, int]:
        tail = self._tail
        assert tail is not None
        position, fd, data, _t = tail[i]
        after = position + HEADER_SIZE + len(data)
        parts = [data]
        size = len(data)
        for j in range(i + 1, len(tail)):
            _offset, next_fd, data, _t = tail[j]
            if next_fd != fd or size + len(data) > max_chunk:
                break
            parts.append(data)
            size += len(data)
            after += HEADER_SIZE + len(data)
        return OutputChunk(fd, parts[0] if len(parts) == 1 else b"".join(parts), after), after

    def open_for_reading(self) -> int:
        """A new read-only descriptor of the log file (FileNotFoundError: gone)."""
        return open_log(self.path, os.O_RDONLY, self._dir_fd, self._name)

    def recent_position(self, back: int) -> int:
        """A record boundary about ``back`` bytes before the end (see
        :func:`_logreader.recent_position`)."""
        return _logreader.recent_position(self, back)

    async def wait_beyond(self, position: int) -> None:
        """Wait until the log has bytes after ``position`` or is closed."""
        while self.end <= position and not self.closed:
            if self._changed is None:
                self._changed = trio.Event()
            await self._changed.wait()

    def check_position(self, position: int) -> None:
        """Raise BadPosition unless ``position`` is a record boundary of this log."""
        _logreader.check_position(self, position)

    def chunks(self, position: int, max_chunk: int, until: int | None, *,
               timestamps: bool = False,
               resizes: bool = False) -> AsyncGenerator[OutputChunk, None]:
        """Chunks from ``position`` (validated by the caller); see
        :func:`jobd.engine._logreader.chunks`."""
        return _logreader.chunks(self, position, max_chunk, until, timestamps=timestamps,
                                 resizes=resizes)


_OFFSET = itemgetter(0)


#: The record format's names, for the engine's other modules and the tests.
__all__ = ["HEADER_SIZE", "MAX_RECORD", "Budget", "OutputLog", "create_file", "decode_header",
           "encode_header", "open_log", "recover"]


def _reserve_short(fd: int, size: int) -> str | None:
    """Why writing ``size`` more bytes would eat into the database's reserve, or None."""
    st = os.fstatvfs(fd)
    reserve = min(RESERVE_MAX, int(st.f_blocks * st.f_frsize * RESERVE_FRACTION))
    if st.f_bavail * st.f_frsize - size >= reserve:
        return None
    return (f"the file system is nearly full (the logs leave {reserve} bytes free for the "
            f"job database)")
