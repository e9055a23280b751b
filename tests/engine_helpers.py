"""Helpers for the job engine's tests (tests/test_engine_*.py)."""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import os
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import trio

from jobd.engine import EngineConfig, JobManager, OutputChunk, _outputlog, open_job_manager
from jobd.engine._outputlog import encode_header
from jobd.engine._store import Record, Store
from protocol import JobState, JobStatus

#: Grace between the stop sequence's steps in tests: short, but long enough to see steps.
GRACE = 0.2
#: Deadline for any condition a test waits for.
TIMEOUT = 30.0  # a deadline for what takes milliseconds: generous for a loaded machine


def config(tmp_path: Path, **overrides: Any) -> EngineConfig:
    options: dict[str, Any] = {"state_dir": tmp_path / "state", "stop_grace": GRACE}
    options.update(overrides)
    return EngineConfig(**options)


@pytest.fixture
async def manager(tmp_path: Path) -> AsyncIterator[JobManager]:
    async with open_job_manager(config(tmp_path)) as m:
        yield m


class Events:
    """Collects on_event calls."""

    def __init__(self) -> None:
        self.seen: list[tuple[str, int, str]] = []

    def __call__(self, kind: str, status: Any) -> None:
        self.seen.append((kind, status.id, status.describe()))


async def collect(chunks: AsyncIterator[OutputChunk]) -> list[OutputChunk]:
    with trio.fail_after(TIMEOUT):
        async with contextlib.aclosing(chunks):  # type: ignore[type-var]
            return [chunk async for chunk in chunks]


def data(chunks: list[OutputChunk], fd: int | None = None) -> bytes:
    return b"".join(c.data for c in chunks if fd is None or c.fd == fd)


async def wait_for_output(manager: JobManager, job_id: int, pattern: bytes,
                          fd: int | None = None) -> bytes:
    """Follow the job until its output (of ``fd``) contains ``pattern``; returns that output."""
    got = b""
    with trio.fail_after(TIMEOUT):
        chunks = manager.follow_output(job_id)
        async with contextlib.aclosing(chunks):  # type: ignore[type-var]
            async for chunk in chunks:
                if fd is None or chunk.fd == fd:
                    got += chunk.data
                if pattern in got:
                    return got
    raise AssertionError(f"output ended without {pattern!r}: {got!r}")


def stat_fields(pid: int) -> list[str] | None:
    """Fields 3.. of /proc/<pid>/stat, or None if there is no such process."""
    try:
        raw = Path(f"/proc/{pid}/stat").read_bytes()
    except (FileNotFoundError, ProcessLookupError):
        return None
    return raw[raw.rfind(b")") + 2:].decode().split()


def start_ticks(pid: int) -> int:
    fields = stat_fields(pid)
    assert fields is not None, f"no process {pid}"
    return int(fields[19])


def alive(pid: int, start: int) -> bool:
    """True while the process with this pid and start time exists and is not a zombie."""
    fields = stat_fields(pid)
    return fields is not None and int(fields[19]) == start and fields[0] not in ("Z", "X")


async def wait_gone(pid: int, start: int) -> None:
    """Wait (pidfd, no polling) until that process has exited."""
    try:
        pidfd = os.pidfd_open(pid)
    except ProcessLookupError:
        return
    try:
        if not alive(pid, start):
            return
        with trio.fail_after(TIMEOUT):
            await trio.lowlevel.wait_readable(pidfd)
    finally:
        os.close(pidfd)


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def log_file(tmp_path: Path, job_id: int) -> Path:
    """Where the engine keeps a job's output log (sharded by thousands of IDs)."""
    return tmp_path / "state" / "logs" / str(job_id // 1000) / f"{job_id}.log"


def legacy_job(store: Store, job_id: int, output: bytes = b"", *, running: bool = False,
               owner: str = "alice") -> JobStatus:
    """Write a job the way a jobd before 2026-11-30 did: a msgpack record (the start
    entry, then for an ended job the end entry appended) and a flat log."""
    now = time.time() - 3600
    log = encode_header(1, len(output), 0, 0) + output if output else b""
    start = JobStatus(id=job_id, owner=owner, argv=(b"echo", b"x"), state=JobState.RUNNING,
                      pid=1 << 22, created=now, started=now)
    store.write(Record(start, 0, "another-boot"))
    if log:
        (store.logs_dir / f"{job_id}.log").write_bytes(log)
    if running:
        return start
    end = dataclasses.replace(start, state=JobState.EXITED, exit_code=0, ended=now + 1,
                              output_bytes=len(output))
    store.write(Record(end, 0, "another-boot", len(log)))
    return end


def escapee_then_exit(tmp_path: Path) -> list[bytes]:
    """argv of a job whose main process starts a ``setsid`` escapee (which prints its
    pid and keeps stdout open) and exits, but only once the escapee has printed: an
    end racing the escapee's start would kill it before anyone learns its pid."""
    fifo = tmp_path / "escapee.fifo"
    os.mkfifo(fifo)
    script = b"""setsid sh -c 'echo $$; echo >"$0"; exec sleep 1000' "$0" & read x <"$0" """
    return [b"sh", b"-c", script, os.fsencode(fifo)]


def disk_that_fills(monkeypatch: pytest.MonkeyPatch, space: int) -> None:
    """Make the output logs' writes go to a "disk" that takes *space* more bytes: a
    short write at the limit, then ENOSPC."""
    budget = [space]
    real = os.pwritev

    def full_disk(fd: int, buffers: list[bytes], offset: int) -> int:
        if budget[0] <= 0:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        blob = b"".join(buffers)[:budget[0]]
        budget[0] -= len(blob)
        return real(fd, [blob], offset)

    monkeypatch.setattr(_outputlog, "_pwritev", full_disk)
