"""The output log's record format, its files, and their recovery after a crash.

Theory of operation
-------------------

A job's output is one append-only file of records, in the order jobd read them
from the job's pipes. A record is a 20-byte header and the bytes::

    offset  size  field
    0       1     magic 0xA7
    1       1     fd: 1 (stdout), 2 (stderr), or 3 (a terminal size: see below)
    2       2     reserved, 0
    4       4     length of the data (uint32, 1..MAX_RECORD)
    8       8     time the bytes were read (int64 ns since the Unix epoch)
    16      4     check: CRC-32 of bytes 0..15 followed by the record's own file
                  offset (uint64); it makes a header recognisable *at its place*,
                  so a job that prints another job's log (headers and all) can
                  never make an offset inside its data pass for a record boundary.

A record with fd 3 is no output: the job's terminal was resized (issue 24).
Its 4 bytes are the new size, rows then columns (uint16 each), and its time
is when jobd resized the terminal. Readers skip these records unless asked
for them (``resizes``); positions count them like any record. The appender
writes one only just before the next output record (``OutputLog.resize``).

All integers are little-endian. A position handed to readers is a file offset
at a record boundary; ``_logreader.check_position`` verifies one by reading
the header there (O(1), no walk from the start).

The appender and its writer are ``_outputlog.py`` (:class:`OutputLog`), the
readers ``_logreader.py``; both read and write records with this module's
header functions, and open log files with :func:`open_log`.
"""

from __future__ import annotations

import contextlib
import logging
import os
import struct
import zlib
from pathlib import Path

from ._statedir import DIR_FLAGS

log = logging.getLogger("jobd.engine")

MAGIC = 0xA7
HEADER = struct.Struct("<BBHIqI")
HEADER_SIZE = HEADER.size  # 20
_OFFSET = struct.Struct("<Q")

#: Largest record payload: one pipe read. Readers need max_chunk >= this.
MAX_RECORD = 256 * 1024
#: The fd of a terminal size record, and its payload: rows, columns.
TERMINAL_FD = 3
TERMINAL_SIZE = struct.Struct("<HH")
#: Block size for the crash-recovery scan.
_SCAN_BLOCK = 1 << 20


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
    if (magic != MAGIC or reserved != 0 or not 0 < length <= MAX_RECORD
            or not (fd in (1, 2) or (fd == TERMINAL_FD and length == TERMINAL_SIZE.size))
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
                kind, length = decode_header(block, at, pos)
            except ValueError:
                break
            if pos + HEADER_SIZE + length > size:
                break
            pos += HEADER_SIZE + length
            if kind != TERMINAL_FD:
                data += length
        if pos < size:
            log.warning("output log %s: truncating a torn tail at %d (size %d)", path, pos, size)
            os.ftruncate(fd, pos)
        return pos, data
    finally:
        os.close(fd)
