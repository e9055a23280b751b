"""Job records in SQLite: one writer thread with group commit, reads on demand.

Layout of the state directory (opened, checked and locked by _statedir)::

    lock                  the lock of the jobd using it (its pid)
    jobs.db (-wal, -shm)  the job records (SQLite, WAL mode)
    logs/<shard>/<id>.log the job's output log (see _outputlog); shard = id // 1000
    jobs.migrated/        the msgpack records of an older jobd, once imported (_migrate)

The table ``jobs`` holds one row per job: ``id`` (the primary key), ``owner``,
``state``, ``created``, ``ended`` (NULL while running), ``log_size`` (the
committed size of the log at the end, 0 before) as columns for the indexes
and retention, and ``record``, the msgpack map of :class:`Record` (as in
_store). Indexes: (owner, id) for a control user's list, (state) for
recovery (only the running rows are read at start) and state filters,
(ended) for retention, (created) for ``since``. ``meta`` keeps the highest ID
ever given (so a deleted highest ID never comes back) and the schema version;
``usage`` the bytes of log each owner has on disk (for the per-user quota),
kept in the same transactions as the rows. ``labels`` (issue 23) has one row
per label of a job, keyed (key, value, job): ``list --label`` reads the
matching IDs from its key. It was added without a schema version: an older
database gets the empty table, and an older jobd ignores it (the rows of jobs
it deletes then stay behind, harmless: IDs never come back).

Writing. Every write (a job's start, its end, a deletion) is queued for the
writer thread, which takes everything queued, applies it in one transaction
and commits: one WAL fsync (``synchronous=FULL``) for the whole batch. The
caller's ``await`` returns once its batch is committed, so what jobd
acknowledges is durable, and while one batch syncs the next one gathers
(group commit). A failed commit (a full disk) fails every write of its batch
with OSError; the engine keeps such records in memory and writes them again
later (``Context.unsaved``).

Reading. Point reads (a job's status) use a connection of the event loop's
thread: a primary-key lookup in a B-tree of a few levels, tens of
microseconds when the pages are cached. List pages and retention scans run in
worker threads, each with a connection of its own from a small pool: WAL
readers never wait for the writer.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import sqlite3
import stat
import threading
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import msgpack
import trio

from protocol import JobState

from ._migrate import migrate
from ._rows import LOGS, apply_deletes, apply_puts, connect, log_name, rollback
from ._statedir import StateDir, StateDirError, open_state_dir
from ._store import Record, decode

log = logging.getLogger("jobd.engine")

DB_NAME = "jobs.db"
SCHEMA_VERSION = 1
#: Most writes in one transaction (a bound on one commit's work, not a tuning knob:
#: a batch that large is already one fsync for a thousand acknowledgements).
MAX_BATCH = 1000
#: Reader connections kept for worker threads (list pages, retention scans), opened
#: at start: that many listings at once never need a new file descriptor.
READERS = 4

_SCHEMA = """
CREATE TABLE IF NOT EXISTS jobs (
    id INTEGER PRIMARY KEY,
    owner TEXT NOT NULL,
    state TEXT NOT NULL,
    created REAL NOT NULL,
    ended REAL,
    log_size INTEGER NOT NULL DEFAULT 0,
    record BLOB NOT NULL
);
CREATE INDEX IF NOT EXISTS jobs_owner ON jobs(owner, id);
CREATE INDEX IF NOT EXISTS jobs_state ON jobs(state);
CREATE INDEX IF NOT EXISTS jobs_ended ON jobs(ended);
CREATE INDEX IF NOT EXISTS jobs_created ON jobs(created);
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS usage (owner TEXT PRIMARY KEY, log_bytes INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS labels (
    key TEXT NOT NULL, value TEXT NOT NULL, job INTEGER NOT NULL,
    PRIMARY KEY (key, value, job)
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS labels_job ON labels(job);
"""

#: What to do with a damaged database (one line: it ends a start-up-failed message).
REPAIR = ("stop jobd, keep a copy of the state directory, then restore jobs.db from a "
          "backup, or salvage it (sqlite3 jobs.db .recover | sqlite3 recovered.db, then "
          "move recovered.db to jobs.db), or move jobs.db and its -wal away to start with "
          "no history (IDs continue after the highest log in logs/)")
#: The longest start-up spends checking the database (PRAGMA quick_check): a big
#: history is checked as far as this goes (about 0.1 s per 50,000 jobs when cached).
CHECK_SECONDS = 3.0


def check(conn: sqlite3.Connection, path: Path) -> None:
    """PRAGMA quick_check, bounded by CHECK_SECONDS: damage found is StateDirError
    with what is damaged and what to do; a check cut short is logged (blocking)."""
    deadline = time.monotonic() + CHECK_SECONDS
    conn.set_progress_handler(lambda: 1 if time.monotonic() > deadline else 0, 10_000)
    try:
        rows = conn.execute("PRAGMA quick_check(20)").fetchall()
    except sqlite3.OperationalError as exc:
        if "interrupt" not in str(exc):
            raise
        log.warning("the check of the job database %s stopped after %g s (a big history): "
                    "damage further on is reported when it is read", path, CHECK_SECONDS)
        return
    finally:
        conn.set_progress_handler(None, 0)
    problems = [line for row in rows for line in str(row[0]).splitlines()
                if line != "ok" and not line.startswith("*** in database")]
    if problems:
        raise StateDirError(f"the job database {path} is damaged ({len(problems)} problems "
                            f"found by quick_check; the first: {problems[0]}): {REPAIR}")


@dataclass(frozen=True)
class Page:
    """One page of a listing: the records, whether more follow, the total (or None)."""

    records: list[Record]
    more: bool
    total: int | None


@dataclass
class _Op:
    kind: str  # "put" | "delete"
    record: Record | None = None
    job_ids: tuple[int, ...] = ()
    done: trio.Event = field(default_factory=trio.Event)
    error: OSError | None = None


def _db_error(exc: sqlite3.Error) -> OSError:
    text = str(exc)
    full = getattr(exc, "sqlite_errorcode", None) == sqlite3.SQLITE_FULL or "full" in text
    return OSError(errno.ENOSPC if full else errno.EIO, f"job database: {text}")


class JobDB:
    """The job records and logs of a state directory. Made by :meth:`open` (blocking)."""

    def __init__(self, state: StateDir, path: Path) -> None:
        self.state = state
        self.path = path
        self.logs_dir = state.path / LOGS
        self.logs_fd = state.sub(LOGS)
        self._reader = connect(path)  # the event loop's (point reads)
        self._reader.execute("PRAGMA query_only = 1")
        # Opened now, not on demand: a listing must work when descriptors run
        # out (each connection holds three: the file, the WAL, the shared memory).
        self._pool: list[sqlite3.Connection] = [_reader(path) for _ in range(READERS)]
        self._pool_lock = threading.Lock()
        self._cond = threading.Condition(threading.Lock())
        self._queue: list[_Op] = []
        self._closing = False
        self._thread: threading.Thread | None = None
        self._token: trio.lowlevel.TrioToken | None = None
        #: Commits so far and writes they carried (for tests and the benchmark).
        self.commits = 0
        self.committed_writes = 0

    # -- opening and closing --------------------------------------------------

    @classmethod
    def open(cls, state_dir: Path | str) -> JobDB:
        """Check, lock and open the state directory and its database (blocking);
        import the msgpack records of an older jobd first (see _migrate)."""
        state = open_state_dir(state_dir, (LOGS,))
        try:
            for name in (DB_NAME, DB_NAME + "-wal", DB_NAME + "-shm", DB_NAME + "-journal"):
                _refuse_symlink(state, name)
            # Made here, 0600, so that SQLite makes its -wal and -shm with that
            # mode too (it copies the database file's): rows hold argv.
            with contextlib.suppress(FileExistsError):
                os.close(os.open(DB_NAME, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW
                                 | os.O_CLOEXEC, 0o600, dir_fd=state.fd))
            os.chmod(DB_NAME, 0o600, dir_fd=state.fd, follow_symlinks=False)
            path = Path(os.path.realpath(state.path)) / DB_NAME
            conn = connect(path)
            try:
                conn.execute("PRAGMA journal_mode = WAL")
                conn.execute("PRAGMA synchronous = FULL")
                conn.executescript(_SCHEMA)
                conn.execute("INSERT OR IGNORE INTO meta (key, value) VALUES ('schema', ?)",
                             (SCHEMA_VERSION,))
                version = conn.execute("SELECT value FROM meta WHERE key = 'schema'").fetchone()
                if version[0] != SCHEMA_VERSION:
                    raise StateDirError(f"{path}: schema version {version[0]}, this jobd "
                                        f"knows {SCHEMA_VERSION}: use a newer jobd")
                check(conn, path)
                migrate(state, conn)
            finally:
                conn.close()
            return cls(state, path)
        except sqlite3.Error as exc:
            state.close()
            raise StateDirError(f"cannot open the job database {state.path / DB_NAME}: {exc}: "
                                f"{REPAIR}") from None
        except BaseException:
            state.close()
            raise

    def start_writer(self, token: trio.lowlevel.TrioToken) -> None:
        self._token = token
        self._thread = threading.Thread(target=self._run, name="jobd-db-writer", daemon=True)
        self._thread.start()

    def stop_writer(self) -> None:
        """Commit what is queued and end the writer thread (blocking)."""
        with self._cond:
            self._closing = True
            self._cond.notify()
        if self._thread is not None:
            self._thread.join()
            self._thread = None

    def close(self) -> None:
        self.stop_writer()
        with self._pool_lock:
            pool, self._pool = self._pool, []
        for conn in (*pool, self._reader):
            conn.close()
        self.state.close()

    # -- paths ------------------------------------------------------------------

    def log_path(self, job_id: int) -> Path:
        return self.logs_dir / log_name(job_id)

    # -- writing (from the event loop) ------------------------------------------

    async def write(self, record: Record) -> None:
        """Insert or replace the job's row; returns once committed (OSError if not)."""
        await self._submit(_Op("put", record=record))

    async def delete(self, *job_ids: int) -> None:
        """Remove the jobs' logs, then their rows in one commit (a crash in between
        leaves a job without output, never a log without a job)."""
        await self._submit(_Op("delete", job_ids=job_ids))

    async def _submit(self, op: _Op) -> None:
        assert self._thread is not None, "start_writer() first"
        with self._cond:
            self._queue.append(op)
            self._cond.notify()
        await op.done.wait()
        if op.error is not None:
            raise op.error

    def _run(self) -> None:
        conn = connect(self.path)
        conn.execute("PRAGMA synchronous = FULL")
        try:
            while True:
                with self._cond:
                    while not self._queue and not self._closing:
                        self._cond.wait()
                    if not self._queue:
                        return
                    batch = self._queue[:MAX_BATCH]
                    del self._queue[:MAX_BATCH]
                self._apply(conn, batch)
                assert self._token is not None
                self._token.run_sync_soon(_deliver, batch)
        finally:
            conn.close()

    def _apply(self, conn: sqlite3.Connection, batch: Sequence[_Op]) -> None:
        for op in batch:
            for job_id in op.job_ids:
                self.unlink_log(job_id)
        try:
            conn.execute("BEGIN IMMEDIATE")
            try:
                for op in batch:  # in order: a delete after a put of the same job wins
                    if op.kind == "put":
                        assert op.record is not None
                        _puts(conn, (op.record,))
                    else:
                        apply_deletes(conn, op.job_ids)
                conn.execute("COMMIT")
            except BaseException:
                rollback(conn)
                raise
        except sqlite3.Error as exc:
            error = _db_error(exc)
        except Exception as exc:  # a bug must not leave every writer waiting forever
            log.exception("job database writer failed")
            error = OSError(errno.EIO, f"job database: {exc}")
        else:
            self.commits += 1
            self.committed_writes += sum(len(op.job_ids) or 1 for op in batch)
            return
        for op in batch:
            op.error = error

    def unlink_log(self, job_id: int) -> None:
        """Remove a job's log (blocking); a missing one is fine."""
        shard, _, leaf = log_name(job_id).rpartition("/")
        try:
            shard_fd = os.open(shard, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW
                               | os.O_CLOEXEC, dir_fd=self.logs_fd)
        except FileNotFoundError:
            return
        try:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(leaf, dir_fd=shard_fd)
        except OSError as exc:
            log.warning("job %d: cannot remove its log: %s", job_id, exc.strerror)
        finally:
            os.close(shard_fd)

    def put_now(self, records: Sequence[Record]) -> None:
        """Write rows in one transaction of the calling thread (blocking; before the
        writer runs: a fast path for tests and the benchmark's history)."""
        assert self._thread is None, "the writer thread owns the writes"
        conn = connect(self.path)
        try:
            conn.execute("PRAGMA synchronous = FULL")
            conn.execute("BEGIN IMMEDIATE")
            try:
                apply_puts(conn, records)
                conn.execute("COMMIT")
            except BaseException:
                rollback(conn)
                raise
        finally:
            conn.close()

    # -- reading ----------------------------------------------------------------

    def get(self, job_id: int) -> Record | None:
        """The job's record (a point read, in the calling thread: the event loop's)."""
        row = self._reader.execute("SELECT record FROM jobs WHERE id = ?", (job_id,)).fetchone()
        return None if row is None else _decode(row[0], job_id)

    def load_running(self) -> tuple[list[Record], int]:
        """(The records still running, by ID; the highest ID ever given) (blocking)."""
        conn = self._reader
        try:
            rows = conn.execute("SELECT record FROM jobs WHERE state = ? ORDER BY id",
                                (JobState.RUNNING.value,)).fetchall()
            top = conn.execute("SELECT max(id) FROM jobs").fetchone()[0] or 0
            mark = conn.execute("SELECT value FROM meta WHERE key = 'highest'").fetchone()
        except sqlite3.Error as exc:
            raise StateDirError(f"cannot read the job database {self.path}: {exc}: "
                                f"{REPAIR}") from None
        highest = max(top, mark[0] if mark else 0)
        logs = self.highest_log()
        if logs > highest:
            # The database lost commits it had made: a deleted or damaged -wal, or a
            # restored backup. An ID whose log exists was given to someone: never again.
            log.warning("the job database %s knows jobs up to ID %d, but logs/ holds the log "
                        "of job %d: it lost its latest commits (a deleted or damaged %s-wal, "
                        "or an older backup?); those jobs are not listed, their logs are "
                        "kept, and new IDs start after %d", self.path, highest, logs,
                        DB_NAME, logs)
            highest = logs
        return _decode_all(rows), highest

    def highest_log(self) -> int:
        """The highest job ID that has a log in logs/ (blocking: two directory reads)."""
        with os.scandir(self.logs_fd) as entries:
            shards = sorted((int(e.name) for e in entries if e.name.isdigit()), reverse=True)
        for shard in shards:
            try:
                fd = os.open(str(shard), os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW
                             | os.O_CLOEXEC, dir_fd=self.logs_fd)
            except OSError:
                continue
            try:
                with os.scandir(fd) as entries:
                    ids = [int(stem) for e in entries
                           if (stem := e.name.removesuffix(".log")).isdigit()
                           and e.name.endswith(".log")]
            finally:
                os.close(fd)
            if ids:
                return max(ids)
        return 0

    def usage(self, owner: str) -> int:
        """Bytes of log the owner's jobs have on disk, as recorded at their ends."""
        row = self._reader.execute("SELECT log_bytes FROM usage WHERE owner = ?",
                                   (owner,)).fetchone()
        return int(row[0]) if row else 0

    def read(self, query: str, args: Sequence[Any]) -> list[Any]:
        """Run a read-only query with a pooled connection (blocking: a worker thread)."""
        with self._pool_lock:
            conn = self._pool.pop() if self._pool else None
        if conn is None:  # more at once than READERS: one more, for this query
            conn = _reader(self.path)
        try:
            return conn.execute(query, args).fetchall()
        finally:
            with self._pool_lock:
                if len(self._pool) < READERS:
                    self._pool.append(conn)
                    return_it = False
                else:
                    return_it = True
            if return_it:
                conn.close()

    def page(self, after: int, limit: int, *, owner: str | None = None,
             states: Sequence[str] = (), since: float | None = None,
             count: bool = False, labels: Sequence[tuple[str, str]] = ()) -> Page:
        """Up to ``limit`` records with ID > ``after`` matching the filters, in ID
        order (blocking: a worker thread). ``count``: also the total that match."""
        where, args = ["id > ?"], [after]
        filters: list[str] = []
        fargs: list[Any] = []
        if owner is not None:
            filters.append("owner = ?")
            fargs.append(owner)
        if states:
            filters.append(f"state IN ({', '.join('?' * len(states))})")
            fargs.extend(states)
        if since is not None:
            filters.append("created >= ?")
            fargs.append(since)
        for key, value in labels:  # each from the labels table's (key, value, job) key
            filters.append("id IN (SELECT job FROM labels WHERE key = ? AND value = ?)")
            fargs.extend((key, value))
        cond = " AND ".join(where + filters)
        rows = self.read(f"SELECT record FROM jobs WHERE {cond} ORDER BY id LIMIT ?",
                         [*args, *fargs, limit + 1])
        total = None
        if count:
            total = self.read(f"SELECT count(*) FROM jobs WHERE {' AND '.join(filters) or '1'}",
                              fargs)[0][0]
        return Page(_decode_all(rows[:limit]), len(rows) > limit, total)


def finished_oldest_first(db: JobDB, limit: int, *, ended_before: float | None = None,
                          with_log: bool = False) -> list[Record]:
    """Up to ``limit`` finished jobs, the oldest end first (the ``(ended)`` index;
    blocking: a worker thread)."""
    cond, args = "ended IS NOT NULL", []
    if ended_before is not None:
        cond, args = "ended < ?", [ended_before]
    if with_log:
        cond += " AND log_size > 0"
    rows = db.read(f"SELECT record FROM jobs WHERE {cond} ORDER BY ended LIMIT ?",
                   [*args, limit])
    return _decode_all(rows)


def finished_count(db: JobDB) -> int:
    return int(db.read("SELECT count(*) FROM jobs WHERE ended IS NOT NULL", ())[0][0])


def log_space(db: JobDB) -> int:
    """Bytes of log the finished jobs hold (the ``usage`` table: one row per owner)."""
    return int(db.read("SELECT coalesce(sum(log_bytes), 0) FROM usage", ())[0][0])


def _decode(raw: bytes, job_id: int) -> Record:
    """A row's record; a damaged one is a database error (never a crash)."""
    try:
        return decode(raw)
    except (ValueError, TypeError, msgpack.UnpackException) as exc:
        raise sqlite3.DatabaseError(f"job {job_id}: unreadable record: {exc}") from None


def _decode_all(rows: Sequence[Any]) -> list[Record]:
    """The records of rows (``record`` first); a damaged one is skipped with a
    warning, so that one bad row cannot break every listing."""
    out = []
    for row in rows:
        try:
            out.append(decode(row[0]))
        except (ValueError, TypeError, msgpack.UnpackException) as exc:
            log.warning("skipping an unreadable job record in the database: %s", exc)
    return out


def _puts(conn: sqlite3.Connection, records: Iterable[Record]) -> None:
    apply_puts(conn, records)  # looked up at each call: a seam for tests of a full disk


def _reader(path: Path) -> sqlite3.Connection:
    conn = connect(path)
    conn.execute("PRAGMA query_only = 1")
    conn.execute("SELECT count(*) FROM meta").fetchall()  # opens the WAL and shm files now
    return conn


def _deliver(batch: Sequence[_Op]) -> None:
    for op in batch:
        op.done.set()


def _refuse_symlink(state: StateDir, name: str) -> None:
    """SQLite opens its files by path, without O_NOFOLLOW: refuse links beforehand
    (the directory itself was checked: nobody else can plant one afterwards)."""
    try:
        st = os.stat(name, dir_fd=state.fd, follow_symlinks=False)
    except FileNotFoundError:
        return
    if not stat.S_ISREG(st.st_mode):
        raise StateDirError(f"state directory {state.path}: {name} is not a regular file "
                            f"(a symlink?): move it away")
