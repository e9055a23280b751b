"""Job records on disk.

Layout of the state directory (opened, checked and locked by _statedir)::

    lock                the lock of the jobd using it (its pid)
    jobs/<id>.msgpack   one record per job (entries, below)
    jobs/<id>.deleted   a deletion mark: keeps a deleted job's ID retired
    logs/<id>.log       the job's output log (see _outputlog)

Every file is opened relative to its directory's descriptor with O_NOFOLLOW.

A record is the map ``{"v": 1, "status": JobStatus.to_wire(), "proc_start":
ticks | None, "boot_id": str | None, "log_size": int | None}``: ``proc_start``
and ``boot_id`` identify the main process across a jobd restart (so that a
recycled pid is never killed), ``log_size`` is the committed size of the log
at the job's end (a log of another size is walked and cut after its last whole
record).

A record file is the 4 bytes MAGIC, then entries: a uint32 length, the CRC-32
of the payload (both little-endian), and the payload, the record's msgpack
map. The last whole entry whose CRC checks is the record. The first version is
written atomically: a temporary file in the same directory, fsync, rename.
Later versions (the job's end) are appended, and fsynced; a failed append is
truncated away. A crash thus leaves the old or the new version, never a mix;
on load a torn last entry is cut off (and logged), so that the entry before it
is the record and later appends are read, and stray ``*.tmp`` files are
removed. Appending rather than renaming over the old file matters: a rename
deletes the old inode, and ext4 skips recently deleted inodes when it
allocates one (without a journal), a scan that grew with every job and made a
job start cost milliseconds (docs/engine.md). A file without MAGIC is a record
of the first format, the bare map, still read.

Deletion is said by a name, never by an empty file: an empty or otherwise
unreadable record is damage (a crash, a disk), logged and kept with its log,
never taken for a deletion.

IDs. The next ID is one more than the highest ID among the record files and
deletion marks, so starts cost no extra write. Deleting the job with the
highest ID on disk renames its record ``<id>.deleted`` and empties it, so that
its ID never comes back; deleting any other job removes its files. Load
removes the marks a higher ID has made unnecessary. A delete thus needs no
free space: on a full disk it is what frees some. A crash between allocating
an ID and writing its record can only reuse an ID nobody was ever told about.

All methods block: call them from a worker thread.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import struct
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import msgpack

from protocol import FieldError, JobStatus

from ._statedir import StateDir, open_state_dir

log = logging.getLogger("jobd.engine")

RECORD_VERSION = 1
#: The first bytes of a record file of entries.
MAGIC = b"\xa7JR2"
_ENTRY = struct.Struct("<II")  # payload length, CRC-32 of the payload
#: The subdirectories of the state directory.
JOBS, LOGS = "jobs", "logs"
#: The suffix of a deletion mark, ``jobs/<id>.deleted``.
DELETED = "deleted"


@dataclass(frozen=True)
class Record:
    status: JobStatus
    proc_start: int | None = None
    boot_id: str | None = None
    log_size: int | None = None
    #: How the job was asked for, for ``rerun`` (the server's: cwd, the env as the
    #: request gave it, env_merge, the requested limits); None for a record of a
    #: jobd before issue 23.
    spec: dict[str, Any] | None = None


#: Flags of every record file open: never through a symlink, never inherited.
_OPEN = os.O_NOFOLLOW | os.O_CLOEXEC


def atomic_write(dir_fd: int, name: str, data: bytes) -> None:
    """Write ``name`` in the directory whole: a fresh temporary (O_EXCL, so never
    through a planted symlink), fsync, rename over ``name``."""
    tmp = name + ".tmp"
    with contextlib.suppress(FileNotFoundError):
        os.unlink(tmp, dir_fd=dir_fd)  # a crash's leftover, or something planted
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | _OPEN, 0o600, dir_fd=dir_fd)
    try:
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view):]
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, name, src_dir_fd=dir_fd, dst_dir_fd=dir_fd)
    except OSError:
        with contextlib.suppress(OSError):
            # On a full disk, a half-written temporary holds what is left.
            os.unlink(tmp, dir_fd=dir_fd)
        raise


def append_entry(dir_fd: int, name: str, payload: bytes) -> bool:
    """Append one entry to a record file of entries and fsync it.

    False, with nothing written, if there is no such file or it is not one of
    entries (the first format): the caller writes it whole. A failed write is
    truncated away, so the file keeps ending at a whole entry.
    """
    try:
        fd = os.open(name, os.O_RDWR | _OPEN, dir_fd=dir_fd)
    except FileNotFoundError:
        return False
    try:
        if os.pread(fd, len(MAGIC), 0) != MAGIC:
            return False
        size = os.lseek(fd, 0, os.SEEK_END)
        try:
            data = entry(payload)
            written = os.pwrite(fd, data, size)
            if written != len(data):
                raise OSError(errno.ENOSPC, f"short write ({written} of {len(data)} bytes)")
            os.fsync(fd)
        except OSError:
            with contextlib.suppress(OSError):
                os.ftruncate(fd, size)
            raise
        return True
    finally:
        os.close(fd)


def entry(payload: bytes) -> bytes:
    return _ENTRY.pack(len(payload), zlib.crc32(payload)) + payload


def last_entry(raw: bytes) -> tuple[bytes, int]:
    """(The payload of the last whole, checked entry of a record file's bytes,
    the offset just after it). Bytes beyond that offset are a torn append."""
    if not raw:
        raise ValueError("the record file is empty (a deletion is a .deleted file, not this: "
                         "a crash emptied it, or a jobd older than 2026-11-30 left a tombstone)")
    if not raw.startswith(MAGIC):
        return raw, len(raw)  # the first format: the bare map
    at, last = len(MAGIC), None
    while at + _ENTRY.size <= len(raw):
        length, crc = _ENTRY.unpack_from(raw, at)
        payload = raw[at + _ENTRY.size:at + _ENTRY.size + length]
        if len(payload) < length or zlib.crc32(payload) != crc:
            break  # a torn append: what came before stands
        last, at = payload, at + _ENTRY.size + length
    if last is None:
        raise ValueError("no whole entry in the record file")
    return last, at


def encode(record: Record) -> bytes:
    data: bytes = msgpack.packb({
        "v": RECORD_VERSION,
        "status": record.status.to_wire(),
        "proc_start": record.proc_start,
        "boot_id": record.boot_id,
        "log_size": record.log_size,
        **({"spec": record.spec} if record.spec is not None else {}),
    }, use_bin_type=True)
    return data


def decode(raw: bytes) -> Record:
    m: Any = msgpack.unpackb(raw, raw=False)
    if not isinstance(m, dict) or m.get("v") != RECORD_VERSION or not isinstance(
            m.get("status"), dict):
        raise ValueError("not a job record")
    proc_start, boot, size = m.get("proc_start"), m.get("boot_id"), m.get("log_size")
    if not (proc_start is None or isinstance(proc_start, int)) or not (
            boot is None or isinstance(boot, str)) or not (size is None or isinstance(size, int)):
        raise ValueError("bad field types in job record")
    spec = m.get("spec")
    if spec is not None and not isinstance(spec, dict):
        raise ValueError("bad spec in job record")
    return Record(JobStatus.from_wire(m["status"]), proc_start, boot, size, spec)


def read_record(dir_fd: int, name: str, job_id: int) -> Record:
    """Read and recover one record file (blocking).

    A torn last entry (a crash mid-append) is cut off the file, so that the next
    append is read after the entry before it, and the recovery is logged.
    Raises OSError (ELOOP for a symlink), ValueError, FieldError or a msgpack
    error for a file with nothing usable.
    """
    fd = os.open(name, os.O_RDWR | _OPEN, dir_fd=dir_fd)
    try:
        size = os.fstat(fd).st_size
        raw = os.pread(fd, size, 0) if size else b""
        payload, whole = last_entry(raw)
        record = decode(payload)
        if record.status.id != job_id:
            raise ValueError(f"record holds job {record.status.id}")
        if whole < len(raw):
            os.ftruncate(fd, whole)
            os.fsync(fd)
            log.warning("job %d: its record was cut inside its last entry (a crash mid-write): "
                        "dropped %d torn bytes and recovered the entry before it (state %s)",
                        job_id, len(raw) - whole, record.status.state.value)
        return record
    finally:
        os.close(fd)


class Store:
    """The records and logs of an open state directory (see _statedir)."""

    def __init__(self, state: StateDir) -> None:
        self.state = state
        self.jobs_dir = state.path / JOBS
        self.logs_dir = state.path / LOGS
        self.jobs_fd = state.sub(JOBS)
        self.logs_fd = state.sub(LOGS)

    @classmethod
    def open(cls, state_dir: Path | str) -> Store:
        """Check, lock and open the state directory (blocking); close() when done."""
        return cls(open_state_dir(state_dir, (JOBS, LOGS)))

    def close(self) -> None:
        self.state.close()

    def __enter__(self) -> Store:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def record_path(self, job_id: int) -> Path:
        return self.jobs_dir / _record_name(job_id)

    def log_path(self, job_id: int) -> Path:
        return self.logs_dir / f"{job_id}.log"

    def load(self) -> tuple[list[Record], int]:
        """(records by ID, the largest ID ever given).

        Removes what a crash or a delete left behind: temporary files, logs
        without a record, deletion marks that a higher ID makes unnecessary.
        A record with nothing usable is logged and kept (with its log) for
        whoever investigates; its ID stays retired.
        """
        jobs_fd = self.jobs_fd
        highest = 0
        records: dict[int, Record] = {}
        deleted: list[int] = []
        unreadable: set[int] = set()
        with os.scandir(jobs_fd) as entries:
            names = [e.name for e in entries]
        for name in names:
            if name.endswith(".tmp"):
                with contextlib.suppress(OSError):
                    os.unlink(name, dir_fd=jobs_fd)
                continue
            stem, _, suffix = name.partition(".")
            if not stem.isdigit() or suffix not in ("msgpack", DELETED):
                continue
            job_id = int(stem)
            highest = max(highest, job_id)
            if suffix == DELETED:
                deleted.append(job_id)
                continue
            try:
                records[job_id] = read_record(jobs_fd, name, job_id)
            except (OSError, ValueError, TypeError, FieldError, msgpack.UnpackException) as exc:
                reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else exc
                log.warning("job %d: unreadable record %s, left out of the list with its log "
                            "(its ID stays retired): %s", job_id, self.record_path(job_id),
                            reason)
                unreadable.add(job_id)
        for job_id in deleted:
            if records.pop(job_id, None) is not None:  # cannot happen but by hand: the delete won
                with contextlib.suppress(OSError):
                    os.unlink(_record_name(job_id), dir_fd=jobs_fd)
            if job_id < highest:
                with contextlib.suppress(OSError):
                    os.unlink(f"{job_id}.{DELETED}", dir_fd=jobs_fd)
        keep = set(records) | unreadable
        with os.scandir(self.logs_fd) as entries:
            log_names = [e.name for e in entries]
        for name in log_names:
            stem = name.partition(".")[0]
            # A log without a record: a start or a delete that a crash cut short.
            if not stem.isdigit() or int(stem) not in keep:
                with contextlib.suppress(OSError):
                    os.unlink(name, dir_fd=self.logs_fd)
        return [records[i] for i in sorted(records)], highest

    def write(self, record: Record) -> None:
        """Write the job's record: appended if its file exists, else created whole."""
        name = _record_name(record.status.id)
        payload = encode(record)
        if not append_entry(self.jobs_fd, name, payload):
            atomic_write(self.jobs_fd, name, MAGIC + entry(payload))

    def delete(self, job_id: int, *, keep_id: bool) -> None:
        """Remove a job's record and log; needs no free space (it may be what is short).

        With ``keep_id`` the record is renamed ``<id>.deleted`` and emptied, a
        mark that keeps the ID retired across restarts (for the highest ID on disk).
        """
        name, jobs_fd = _record_name(job_id), self.jobs_fd
        if keep_id:
            mark = f"{job_id}.{DELETED}"
            try:
                os.rename(name, mark, src_dir_fd=jobs_fd, dst_dir_fd=jobs_fd)
            except FileNotFoundError:  # its record was never written (full disk)
                os.close(os.open(mark, os.O_WRONLY | os.O_CREAT | _OPEN, 0o600, dir_fd=jobs_fd))
            else:
                with contextlib.suppress(OSError):  # frees the space; the name says it all
                    os.close(os.open(mark, os.O_WRONLY | os.O_TRUNC | _OPEN, dir_fd=jobs_fd))
        else:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(name, dir_fd=jobs_fd)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.log_path(job_id).name, dir_fd=self.logs_fd)


def _record_name(job_id: int) -> str:
    return f"{job_id}.msgpack"
