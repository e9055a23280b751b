"""The job database's rows: where logs live, and the statements that write rows.

Below both :mod:`._db` (the store: its writer thread, reads, pages) and
:mod:`._migrate` (the one-time import of an older jobd's records, run by the
store as it opens), which write rows the same way.
"""

from __future__ import annotations

import contextlib
import sqlite3
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from ._store import Record, encode

LOGS = "logs"
#: Logs per shard directory: a million jobs make a thousand directories of a
#: thousand files, no directory that a lookup or a backup has to crawl.
SHARD = 1000

_UPSERT = (
    "INSERT INTO jobs (id, owner, state, created, ended, log_size, record) "
    "VALUES (?, ?, ?, ?, ?, ?, ?) ON CONFLICT(id) DO UPDATE SET owner = excluded.owner, "
    "state = excluded.state, created = excluded.created, ended = excluded.ended, "
    "log_size = excluded.log_size, record = excluded.record")
_USAGE = ("INSERT INTO usage (owner, log_bytes) VALUES (?, ?) ON CONFLICT(owner) "
          "DO UPDATE SET log_bytes = log_bytes + excluded.log_bytes")
HIGHEST = ("INSERT INTO meta (key, value) VALUES ('highest', ?) ON CONFLICT(key) "
            "DO UPDATE SET value = max(value, excluded.value)")


def log_name(job_id: int) -> str:
    """The log's path relative to ``logs/``."""
    return f"{job_id // SHARD}/{job_id}.log"


def row_values(record: Record) -> tuple[Any, ...]:
    s = record.status
    return (s.id, s.owner, s.state.value, s.created, s.ended, record.log_size or 0,
            encode(record))


def connect(path: Path) -> sqlite3.Connection:
    conn = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
    conn.execute("PRAGMA busy_timeout = 10000")
    return conn


def apply_puts(conn: sqlite3.Connection, records: Iterable[Record]) -> None:
    """Insert or replace rows and keep ``usage`` right (inside a transaction)."""
    for record in records:
        s = record.status
        old = conn.execute("SELECT owner, log_size FROM jobs WHERE id = ?", (s.id,)).fetchone()
        conn.execute(_UPSERT, row_values(record))
        if s.labels and old is None:  # a job's labels never change: written with its first row
            conn.executemany("INSERT OR IGNORE INTO labels (key, value, job) VALUES (?, ?, ?)",
                             [(k, v, s.id) for k, v in s.labels])
        if old is not None and old[1]:
            conn.execute(_USAGE, (old[0], -old[1]))
        if record.log_size:
            conn.execute(_USAGE, (s.owner, record.log_size))


def apply_deletes(conn: sqlite3.Connection, job_ids: Iterable[int]) -> None:
    for job_id in job_ids:
        old = conn.execute("DELETE FROM jobs WHERE id = ? RETURNING owner, log_size",
                           (job_id,)).fetchone()
        if old is not None and old[1]:
            conn.execute(_USAGE, (old[0], -old[1]))
        conn.execute("DELETE FROM labels WHERE job = ?", (job_id,))
        conn.execute(HIGHEST, (job_id,))


def rollback(conn: sqlite3.Connection) -> None:
    """Roll back the open transaction, if SQLite has not done so itself.

    On SQLITE_FULL (and some I/O errors) SQLite may already have rolled back:
    a ROLLBACK then fails with "cannot rollback - no transaction is active",
    which would hide the real error ("database or disk is full").
    """
    if conn.in_transaction:
        with contextlib.suppress(sqlite3.Error):  # the first error is the one to report
            conn.execute("ROLLBACK")
