"""Job records on disk.

Layout of the state directory::

    jobs/<id>.msgpack   one record per job (msgpack map, below)
    logs/<id>.log       the job's output log (see _outputlog)
    last-id             the ID high-water mark, decimal text

A record is the map ``{"v": 1, "status": JobStatus.to_wire(), "proc_start":
ticks | None, "boot_id": str | None, "log_size": int | None}``: ``proc_start``
and ``boot_id`` identify the main process across a jobd restart (so that a
recycled pid is never killed), ``log_size`` is the committed size of the log
at the job's end (a longer file is cut back to it, a shorter one is scanned).

Every file is written atomically: a temporary file in the same directory,
fsync, rename over the old one. A crash leaves the old or the new version,
never a mix; stray ``*.tmp`` files are removed on load.

IDs. The next ID is one more than the largest of the high-water mark and every
record's ID. The mark is only written when a job is deleted (before its record
goes), so starts cost no extra write; a crash between allocating an ID and
writing its record can only reuse an ID nobody was ever told about.

All methods block: call them from a worker thread.
"""

from __future__ import annotations

import contextlib
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import msgpack

from protocol import FieldError, JobStatus

log = logging.getLogger("jobd.engine")

RECORD_VERSION = 1


@dataclass(frozen=True)
class Record:
    status: JobStatus
    proc_start: int | None = None
    boot_id: str | None = None
    log_size: int | None = None


def atomic_write(path: Path, data: bytes, *, sync_dir: bool = False) -> None:
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)
    if sync_dir:
        dfd = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)


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
    def __init__(self, state_dir: Path) -> None:
        self.jobs_dir = state_dir / "jobs"
        self.logs_dir = state_dir / "logs"
        self.highwater_path = state_dir / "last-id"

    def record_path(self, job_id: int) -> Path:
        return self.jobs_dir / f"{job_id}.msgpack"

    def log_path(self, job_id: int) -> Path:
        return self.logs_dir / f"{job_id}.log"

    def load(self) -> tuple[list[Record], int]:
        """(records by ID, the largest ID ever given). Creates the directories."""
        self.jobs_dir.mkdir(parents=True, exist_ok=True)
        self.logs_dir.mkdir(parents=True, exist_ok=True)
        highest = self._read_highwater()
        records: list[Record] = []
        known: set[int] = set()
        for entry in os.scandir(self.jobs_dir):
            name = entry.name
            if name.endswith(".tmp"):
                with contextlib.suppress(OSError):
                    os.unlink(entry.path)
                continue
            stem = name.split(".", 1)[0]
            if not stem.isdigit():
                continue
            job_id = int(stem)
            known.add(job_id)
            highest = max(highest, job_id)
            if not name.endswith(".msgpack"):
                continue
            try:
                with open(entry.path, "rb") as f:
                    record = decode(f.read())
                if record.status.id != job_id:
                    raise ValueError(f"record holds job {record.status.id}")
            except (OSError, ValueError, TypeError, FieldError, msgpack.UnpackException) as exc:
                log.warning("skipping unreadable job record %s: %s", entry.path, exc)
                continue
            records.append(record)
        for entry in os.scandir(self.logs_dir):
            stem = entry.name.split(".", 1)[0]
            # A log without a record: a delete or a start that a crash interrupted.
            if not stem.isdigit() or int(stem) not in known:
                with contextlib.suppress(OSError):
                    os.unlink(entry.path)
        records.sort(key=lambda r: r.status.id)
        return records, highest

    def _read_highwater(self) -> int:
        try:
            return int(self.highwater_path.read_text().strip() or 0)
        except FileNotFoundError:
            return 0
        except (OSError, ValueError) as exc:
            log.warning("ignoring unreadable %s: %s", self.highwater_path, exc)
            return 0

    def write(self, record: Record) -> None:
        atomic_write(self.record_path(record.status.id), encode(record))

    def write_highwater(self, job_id: int) -> None:
        atomic_write(self.highwater_path, f"{job_id}\n".encode(), sync_dir=True)

    def remove(self, job_id: int) -> None:
        for path in (self.record_path(job_id), self.log_path(job_id)):
            with contextlib.suppress(FileNotFoundError):
                path.unlink()
