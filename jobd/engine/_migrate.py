"""The one-time import of an older jobd's msgpack records into the database.

A state directory of a jobd before 2026-11-30 holds ``jobs/<id>.msgpack``
records and flat ``logs/<id>.log`` files. On the first start of a newer jobd
(blocking, inside :meth:`JobDB.open`, before anything is served):

1. Read every record with the careful recovery of _store (torn last entries
   cut and logged, damaged records reported and left out, deletion marks
   counted for the highest ID), and check each finished job's log against its
   recorded size (a torn tail is cut, as at every start before).
2. Insert them all, the highest ID and a ``migrated`` mark in one
   transaction: a crash before its commit leaves nothing half imported, and
   the next start imports again from scratch.
3. Move each flat log into its shard directory (``logs/<id // 1000>/``).
4. Rename ``jobs/`` to ``jobs.migrated/``: kept for whoever wants to check
   the import, deleted by the operator.

Steps 3 and 4 are repeated by a start that finds the mark and ``jobs/`` still
there (a crash after the commit). Each step is logged.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import re
import sqlite3

from ._logformat import recover
from ._rows import HIGHEST, LOGS, SHARD, apply_puts, log_name, rollback
from ._statedir import StateDir, open_subdir
from ._store import JOBS, Record, Store

log = logging.getLogger("jobd.engine")

#: Where the imported records are kept.
DONE = "jobs.migrated"
_FLAT_LOG = re.compile(r"[0-9]+\.log")


def migrate(state: StateDir, conn: sqlite3.Connection) -> None:
    """Import ``jobs/`` if there is one (blocking); see the module docstring."""
    try:
        os.stat(JOBS, dir_fd=state.fd, follow_symlinks=False)
    except FileNotFoundError:
        return
    open_subdir(state, JOBS)  # a symlink or a directory of someone else's is refused
    try:
        done = conn.execute("SELECT value FROM meta WHERE key = 'migrated'").fetchone()
        if done is None:
            _import(state, conn)
        moved = _shard_logs(state.sub(LOGS))
        kept = DONE
        for n in range(1, 1000):
            try:
                os.stat(kept, dir_fd=state.fd, follow_symlinks=False)
            except FileNotFoundError:
                break
            kept = f"{DONE}.{n}"
        os.rename(JOBS, kept, src_dir_fd=state.fd, dst_dir_fd=state.fd)
    finally:
        with contextlib.suppress(OSError):
            os.close(state.subdirs.pop(JOBS))
    log.warning("migration: moved %d output logs into shard directories; the old records "
                "are kept in %s: delete it once satisfied", moved, state.path / kept)


def _import(state: StateDir, conn: sqlite3.Connection) -> None:
    store = Store(state)
    records, highest = store.load()  # part of it: recovery of each record, logged
    checked = [_check_log(store, r) for r in records]
    conn.execute("BEGIN IMMEDIATE")
    try:
        apply_puts(conn, checked)
        conn.execute(HIGHEST, (highest,))
        conn.execute("INSERT INTO meta (key, value) VALUES ('migrated', ?)", (len(checked),))
        conn.execute("COMMIT")
    except BaseException:
        rollback(conn)
        raise
    log.warning("migration: imported %d job records (highest ID %d) from %s into the job "
                "database", len(checked), highest, store.jobs_dir)


def _check_log(store: Store, record: Record) -> Record:
    """A finished job's log cut back to its last whole record if its size is off."""
    status = record.status
    if record.log_size is None:
        return record  # running: the engine's start-up recovery checks it
    path = store.log_path(status.id)
    try:
        size = os.stat(path.name, dir_fd=store.logs_fd, follow_symlinks=False).st_size
    except FileNotFoundError:
        size = 0
    if size == record.log_size:
        return record
    try:
        end, _data = recover(path, store.logs_fd)
    except OSError as exc:
        log.warning("migration: job %d: cannot check its log: %s", status.id, exc.strerror)
        return record
    log.warning("migration: job %d: log is %d bytes, its record says %s", status.id, end,
                record.log_size)
    return dataclasses.replace(record, log_size=end)


def _shard_logs(logs_fd: int) -> int:
    """Move flat ``<id>.log`` files into their shard directories; how many moved."""
    with os.scandir(logs_fd) as entries:
        names = [e.name for e in entries if _FLAT_LOG.fullmatch(e.name)
                 and e.is_file(follow_symlinks=False)]
    for name in names:
        job_id = int(name.partition(".")[0])
        with contextlib.suppress(FileExistsError):
            os.mkdir(str(job_id // SHARD), 0o700, dir_fd=logs_fd)
        os.rename(name, log_name(job_id), src_dir_fd=logs_fd, dst_dir_fd=logs_fd)
    return len(names)
