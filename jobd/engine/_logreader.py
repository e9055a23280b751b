"""Reading an output log: any number of readers, each at its own pace.

Theory of operation
-------------------

The log's appender and writer (``_outputlog.py``) commit whole records and
advance ``end``; readers read only up to ``end``, so they never see a
half-written record, and wait for more on the log's commit event
(:meth:`OutputLog.wait_beyond`). Apart from that they share nothing with the
writer: each opens the file on its own (:meth:`OutputLog.open_for_reading`).

Reading. :func:`chunks` reads large blocks with ``preadv`` and
``RWF_NOWAIT`` in the event loop (page-cache hits, the live case, cost no
thread hop) and falls back to a worker thread when the data is not cached.
Consecutive records of one fd are coalesced into one chunk of at most
``max_chunk`` bytes (with ``timestamps``, every record is its own chunk, with
its time: :func:`_records`). A follower waits on an event the appender sets
after each commit: no polling. Every reader has its own file descriptor, so a slow one
slows only itself.

Following from memory. A follower registers with the log (:meth:`OutputLog.follow`)
and, at each step, first asks the log's tail of just-committed records
(:meth:`OutputLog.chunk_from_memory`): a follower that keeps up with the job takes
its chunks from there and never reads the file (it opens it only when it falls
behind the tail). Both paths give the same bytes at the same record boundaries.
"""

from __future__ import annotations

import errno
import logging
import os
from collections.abc import AsyncGenerator
from pathlib import Path
from typing import Protocol

import trio

from ._logformat import HEADER, HEADER_SIZE, MAGIC, TERMINAL_FD, decode_header
from ._types import BadPosition, EngineError, OutputChunk

logger = logging.getLogger("jobd.engine")

#: Read beyond max_chunk for the headers of the records a chunk coalesces (200 of them).
_HEADER_ALLOWANCE = 200 * HEADER_SIZE


class ReadableLog(Protocol):
    """What a reader needs of a log (:class:`jobd.engine._outputlog.OutputLog`)."""

    path: Path
    #: The committed size: whole records only.
    end: int
    #: No more records will be appended: a reader at ``end`` is done.
    closed: bool

    def open_for_reading(self) -> int:
        """A new read-only descriptor of the log file (FileNotFoundError: gone)."""
        ...

    async def wait_beyond(self, position: int) -> None:
        """Until the log has bytes after ``position`` or is closed."""
        ...

    def follow(self, delta: int) -> None:
        """A follower comes (+1) or goes (-1)."""
        ...

    def chunk_from_memory(self, position: int, max_chunk: int, *, timestamps: bool = False,
                          resizes: bool = False) -> tuple[OutputChunk | None, int] | None:
        """The committed chunk at ``position`` and the position after it if still in
        memory (the chunk None: only skipped size records), else None."""
        ...


def check_position(log: ReadableLog, position: int) -> None:
    """Raise BadPosition unless ``position`` is a record boundary of this log."""
    if not isinstance(position, int) or isinstance(position, bool):
        raise BadPosition(f"position must be an integer, not {type(position).__name__}")
    if position < 0 or position > log.end:
        raise BadPosition(f"{position} is outside the log (0..{log.end})")
    if position in (0, log.end):
        return
    try:
        fd = log.open_for_reading()
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
    if position + HEADER_SIZE + length > log.end:
        raise BadPosition(f"{position} is not a record boundary")


def recent_position(log: ReadableLog, back: int) -> int:
    """The first record boundary at or after ``end - back`` (0 if the log is
    shorter; ``end`` if no record starts there), to replay a screen from. One
    read of ``back`` bytes: a header is recognised by its magic and its check,
    which covers its own offset, so no walk from the start is needed."""
    end = log.end
    start = end - back
    if start <= 0:
        return 0
    try:
        fd = log.open_for_reading()
    except FileNotFoundError:
        return end
    try:
        block = os.pread(fd, end - start, start)
    finally:
        os.close(fd)
    magic = MAGIC.to_bytes(1, "little")
    at = block.find(magic)
    while 0 <= at <= len(block) - HEADER_SIZE:
        try:
            _fd, length = decode_header(block, at, start + at)
        except ValueError:
            at = block.find(magic, at + 1)
            continue
        if start + at + HEADER_SIZE + length <= end:
            return start + at
        break
    return end


async def chunks(log: ReadableLog, position: int, max_chunk: int, until: int | None, *,
                 timestamps: bool = False,
                 resizes: bool = False) -> AsyncGenerator[OutputChunk, None]:
    """Chunks from ``position`` (validated by the caller).

    With ``until`` None it follows: waits for more until the log is closed
    and every byte was given. Else it stops at offset ``until``. With
    ``timestamps``, every record is its own chunk, with its time. A terminal's
    size records are skipped, or with ``resizes`` given as chunks of their own
    (fd TERMINAL_FD, the 4 bytes of the size, with its time).
    """
    fd = -1  # opened once there is something to read: the first write makes the log
    following = until is None
    if following:
        log.follow(1)
    try:
        while True:
            end = log.end if until is None else min(until, log.end)
            if position >= end:
                if until is not None or log.closed:
                    return
                await log.wait_beyond(position)
                continue
            if following:
                found = log.chunk_from_memory(position, max_chunk, timestamps=timestamps,
                                              resizes=resizes)
                if found is not None:
                    chunk, position = found
                    if chunk is not None:
                        yield chunk
                    continue
            if fd < 0:
                try:
                    fd = log.open_for_reading()
                except FileNotFoundError:
                    return  # deleted meanwhile: nothing more to give
            block = await _read_block(fd, position, min(end - position,
                                                        max_chunk + _HEADER_ALLOWANCE))
            records: list[OutputChunk] = []
            spans: list[tuple[int, list[tuple[int, int]], int]] = []
            try:
                if timestamps:
                    records, after = _records(block, position, resizes)
                else:
                    spans, after = _parse(block, position, max_chunk, resizes)
            except EngineError as exc:  # damage on disk: the operator must hear of it
                logger.warning("output log %s is damaged: %s; its output from there on "
                               "cannot be read (restore the file, or delete the job)",
                               log.path, exc)
                raise
            for chunk in records:  # with timestamps: one chunk per record
                yield chunk
                position = chunk.position
            view = memoryview(block)
            for i, (chunk_fd, parts, stop) in enumerate(spans):
                data = b"".join(view[a:b] for a, b in parts)
                time_ns = (HEADER.unpack_from(view, parts[0][0] - HEADER_SIZE)[4]
                           if chunk_fd == TERMINAL_FD else None)  # a size: with its time
                if i == len(spans) - 1:
                    del block, view  # hold only the chunk while the consumer works
                yield OutputChunk(chunk_fd, data, stop, time_ns)
                position = stop
            position = after  # past size records skipped at the end of the block
    finally:
        if following:
            log.follow(-1)
        if fd >= 0:
            os.close(fd)


def _parse(block: bytearray | bytes, base: int, max_chunk: int,
           resizes: bool = False) -> tuple[list[tuple[int, list[tuple[int, int]], int]], int]:
    """Split a block read at file offset ``base`` into chunks.

    Returns ([(fd, [(start, stop) slices of block], position after)], the
    position after the last whole record), covering the whole records the
    block holds (at least one: blocks are read at least one maximal record
    long, or up to the committed end). A terminal's size record ends the chunk
    before it, and is a chunk of its own with ``resizes``, else skipped.
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
        if parts and (fd != cur_fd or size + length > max_chunk or fd == TERMINAL_FD):
            spans.append((cur_fd, parts, base + at))
            parts, size = [], 0
        if fd == TERMINAL_FD:
            if resizes:
                spans.append((fd, [(at + HEADER_SIZE, stop)], base + stop))
            at = stop
            continue
        cur_fd = fd
        parts.append((at + HEADER_SIZE, stop))
        size += length
        at = stop
    if parts:
        spans.append((cur_fd, parts, base + at))
    if at == 0:
        raise EngineError(f"output log corrupt at offset {base}")
    return spans, base + at


def _records(block: bytearray | bytes, base: int,
             resizes: bool = False) -> tuple[list[OutputChunk], int]:
    """The whole records of a block read at file offset ``base``, one chunk each,
    with its time (the ``timestamps`` reading; :func:`_parse` is the fast one),
    and the position after the last; a terminal's size records only with
    ``resizes``."""
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
        if fd != TERMINAL_FD or resizes:
            time_ns = HEADER.unpack_from(block, at)[4]
            chunks.append(OutputChunk(fd, bytes(block[at + HEADER_SIZE:stop]), base + stop,
                                      time_ns))
        at = stop
    if at == 0:
        raise EngineError(f"output log corrupt at offset {base}")
    return chunks, base + at


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
