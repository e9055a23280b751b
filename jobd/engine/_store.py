"""Job records on disk.

Layout of the state directory::

    jobs/<id>.msgpack   one record per job (msgpack map, below); empty: a tombstone
    logs/<id>.log       the job's output log (see _outputlog)

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
truncated away. A crash thus leaves the old or the new version, never a mix,
and stray ``*.tmp`` files are removed on load. Appending rather than renaming
over the old file matters: a rename deletes the old inode, and ext4 skips
recently deleted inodes when it allocates one (without a journal), a scan
that grew with every job and made a job start cost milliseconds
(docs/engine.md). A file without MAGIC is a record of the first format, the
bare map, still read.

IDs. The next ID is one more than the highest ID among the record files, so
starts cost no extra write. Deleting the job with the highest ID on disk
leaves its record as an empty file, a tombstone, so that its ID never comes
back; deleting any other job removes its files. Load removes the tombstones a
higher ID has made unnecessary. A delete thus needs no free space: on a full
disk it is what frees some. A crash between allocating an ID and writing its
record can only reuse an ID nobody was ever told about.

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

log = logging.getLogger("jobd.engine")

RECORD_VERSION = 1
#: The first bytes of a record file of entries.
MAGIC = b"\xa7JR2"
_ENTRY = struct.Struct("<II")  # payload length, CRC-32 of the payload


@dataclass(frozen=True)
class Record:
    status: JobStatus
    proc_start: int | None = None
    boot_id: str | None = None
    log_size: int | None = None


def atomic_write(path: Path, data: bytes) -> None:
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
    try:
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view):]
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except OSError:
        with contextlib.suppress(OSError):
            os.unlink(tmp)  # on a full disk, a half-written temporary holds what is left
        raise


def append_entry(path: Path, payload: bytes) -> bool:
    """Append one entry to a record file of entries and fsync it.

    False, with nothing written, if there is no such file or it is not one of
    entries (a tombstone, the first format): the caller writes it whole. A
    failed write is truncated away, so the file keeps ending at a whole entry.
    """
    try:
        fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
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


def last_entry(raw: bytes) -> bytes:
    """The payload of the last whole, checked entry of a record file's bytes."""
    if not raw.startswith(MAGIC):
        return raw  # the first format: the bare map
    at, last = len(MAGIC), None
    while at + _ENTRY.size <= len(raw):
        length, crc = _ENTRY.unpack_from(raw, at)
        payload = raw[at + _ENTRY.size:at + _ENTRY.size + length]
        if len(payload) < length or zlib.crc32(payload) != crc:
            break  # a torn append: what came before stands
        last, at = payload, at + _ENTRY.size + length
    if last is None:
        raise ValueError("no whole entry in the record file")
    return last


def encode(record: Record) -> bytes:
    data: bytes = msgpack.packb({
        "v": RECORD_VERSION,
        "status": record.status.to_wire(),
        "proc_start": record.proc_start,
        "boot_id": record.boot_id,
        "log_size": record.log_size,
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
    return Record(JobStatus.from_wire(m["status"]), proc_start, boot, size)


class Store:
    def __init__(self, state_dir: Path | str) -> None:
        state_dir = Path(state_dir)
        self.jobs_dir = state_dir / "jobs"
        self.logs_dir = state_dir / "logs"

    def record_path(self, job_id: int) -> Path:
        return self.jobs_dir / f"{job_id}.msgpack"

    def log_path(self, job_id: int) -> Path:
        return self.logs_dir / f"{job_id}.log"

    def load(self) -> tuple[list[Record], int]:
        """(records by ID, the largest ID ever given). Creates the directories.

        Removes what a crash or a delete left behind: temporary files, logs
        without a record, tombstones that a higher ID makes unnecessary.
        """
        self.jobs_dir.mkdir(parents=True, exist_ok=True)
        self.logs_dir.mkdir(parents=True, exist_ok=True)
        highest = 0
        records: list[Record] = []
        tombstones: list[int] = []
        unreadable: set[int] = set()
        for entry in os.scandir(self.jobs_dir):
            name = entry.name
            if name.endswith(".tmp"):
                with contextlib.suppress(OSError):
                    os.unlink(entry.path)
                continue
            stem, _, suffix = name.partition(".")
            if not stem.isdigit() or suffix != "msgpack":
                continue
            job_id = int(stem)
            highest = max(highest, job_id)
            try:
                with open(entry.path, "rb") as f:
                    raw = f.read()
                if not raw:
                    tombstones.append(job_id)
                    continue
                record = decode(last_entry(raw))
                if record.status.id != job_id:
                    raise ValueError(f"record holds job {record.status.id}")
            except (OSError, ValueError, TypeError, FieldError, msgpack.UnpackException) as exc:
                log.warning("skipping unreadable job record %s: %s", entry.path, exc)
                unreadable.add(job_id)  # its log stays, for whoever investigates
                continue
            records.append(record)
        for job_id in tombstones:
            if job_id < highest:
                with contextlib.suppress(OSError):
                    self.record_path(job_id).unlink()
        keep = {r.status.id for r in records} | unreadable
        for entry in os.scandir(self.logs_dir):
            stem = entry.name.partition(".")[0]
            # A log without a record: a start or a delete that a crash cut short.
            if not stem.isdigit() or int(stem) not in keep:
                with contextlib.suppress(OSError):
                    os.unlink(entry.path)
        records.sort(key=lambda r: r.status.id)
        return records, highest

    def write(self, record: Record) -> None:
        """Write the job's record: appended if its file exists, else created whole."""
        path = self.record_path(record.status.id)
        payload = encode(record)
        if not append_entry(path, payload):
            atomic_write(path, MAGIC + entry(payload))

    def delete(self, job_id: int, *, keep_id: bool) -> None:
        """Remove a job's record and log; needs no free space (it may be what is short).

        With ``keep_id`` the record becomes a tombstone (an empty file) that keeps
        the ID retired across restarts, for the highest ID on disk.
        """
        path = self.record_path(job_id)
        if keep_id:
            try:
                os.truncate(path, 0)
            except FileNotFoundError:  # its record was never written (full disk)
                os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC, 0o600))
        else:
            with contextlib.suppress(FileNotFoundError):
                path.unlink()
        with contextlib.suppress(FileNotFoundError):
            self.log_path(job_id).unlink()
