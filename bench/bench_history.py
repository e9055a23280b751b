"""jobd with a long history: N finished jobs on disk (issue 17).

    .venv/bin/python bench/bench_history.py                       # 10k, 100k, 1M
    .venv/bin/python bench/bench_history.py --jobs 10000 --running 100   # quick

For each history size N:

1. *generate*: N finished jobs written straight into a fresh state directory's
   jobs.db (the fast path: one transaction of rows, no processes, no log
   files), 100 owners, ends spread over 60 days;
2. *restart to serving*: from starting jobd on it to its ``listening`` line
   (median of 3 starts);
3. *starts/s*: ``true`` started over one library connection, real processes,
   for a few seconds;
4. ``--running`` (default 1,000) ``sleep 600`` jobs started and kept running;
5. *status*: the status of random finished jobs, one round trip each over one
   connection (p50, p99); *list page*: a page at a random position, as an admin
   and filtered by one owner (p50, p99); *count*: a first page with the total;
6. jobd's RSS after all that, and the state directory's size.

Latencies are client-side round trips over loopback TLS (a status round trip
with an empty history is the floor). Prints one Markdown table row per size.
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import random
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _harness as h

import jobctl
from jobd.engine._db import JobDB
from jobd.engine._store import Record, encode
from protocol import JobState, JobStatus

OWNERS = 100
#: Rows per executemany in the generator.
CHUNK = 50_000
DAY = 86400.0


def generate(state_dir: Path, n: int) -> float:
    """N finished jobs in a new state directory's jobs.db; seconds it took."""
    t0 = time.perf_counter()
    JobDB.open(state_dir).close()  # the schema, the lock, the modes
    conn = sqlite3.connect(state_dir / "jobs.db", isolation_level=None)
    conn.execute("PRAGMA synchronous = OFF")
    now = time.time()
    rng = random.Random(17)
    conn.execute("BEGIN")
    for base in range(1, n + 1, CHUNK):
        rows = []
        for i in range(base, min(base + CHUNK, n + 1)):
            ended = now - 60 * DAY * (1 - i / n) - rng.random()
            state = (JobState.EXITED if i % 20 else JobState.KILLED) if i % 33 else \
                JobState.ERROR
            status = JobStatus(
                id=i, owner=f"user{i % OWNERS}", argv=(b"/usr/bin/make", b"-C", b"build",
                                                       b"test-%d" % (i % 997)),
                state=state, exit_code=i % 3 if state is JobState.EXITED else None,
                signal="SIGKILL" if state is JobState.KILLED else None,
                error="command not found: make" if state is JobState.ERROR else None,
                pid=1000 + i % 30000, created=ended - 5, started=ended - 5, ended=ended,
                output_bytes=1000 + i % 5000)
            record = Record(status, 123456 + i, "bench-boot", 0)
            rows.append((i, status.owner, state.value, status.created, ended, 0,
                         encode(record)))
        conn.executemany("INSERT INTO jobs (id, owner, state, created, ended, log_size, "
                         "record) VALUES (?, ?, ?, ?, ?, ?, ?)", rows)
    conn.execute("COMMIT")
    conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    conn.close()
    return time.perf_counter() - t0


class History:
    """A jobd on an existing state directory."""

    def __init__(self, work: Path, pki: h.Pki, state_dir: Path):
        self.pki = pki
        t0 = time.perf_counter()
        cmd = [*h.jobd_command(), "-c", pki.path("server.pem"), "-k", pki.path("server.key"),
               "-C", pki.path("ca.pem"), "-a", "127.0.0.1", "-p", "0", "--state-dir",
               str(state_dir), "--stop-grace", "0.5"]
        self.proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                     env=h.child_env(work))
        self.log = h._LogReader(self.proc, "jobd")
        self.port = int(self.log.wait_for(r"listening address=\S*:(\d+)", 120).group(1))
        self.ready_seconds = time.perf_counter() - t0

    def connect(self, who: str = "root") -> jobctl.BlockingClient:
        return jobctl.connect_blocking("127.0.0.1", self.port, certificate=self.pki.path(
            f"{who}.pem"), key=self.pki.path(f"{who}.key"), ca=self.pki.path("ca.pem"))

    def stop(self) -> None:
        h._stop(self.proc, 120)


def pct(samples: list[float], q: float) -> float:
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def dir_size(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def measure(work: Path, pki: h.Pki, n: int, running: int, start_seconds: float) -> dict[str, str]:
    state = work / f"history-{n}"
    gen = generate(state, n)
    print(f"generated {n:,} finished jobs in {gen:.1f} s", file=sys.stderr, flush=True)
    readies = []
    for _ in range(3):
        jobd = History(work, pki, state)
        readies.append(jobd.ready_seconds)
        jobd.stop()
    jobd = History(work, pki, state)
    try:
        c = jobd.connect()
        for _ in range(20):
            c.start(["true"])
        count, t0 = 0, time.perf_counter()
        while time.perf_counter() - t0 < start_seconds:
            c.start(["true"])
            count += 1
        starts = count / (time.perf_counter() - t0)
        sleepers = [c.start(["sleep", "600"]).id for _ in range(running)]
        rng = random.Random(5)
        status_ms = []
        for _ in range(2000):
            job = rng.randint(1, n)
            t = time.perf_counter()
            c.status(job)
            status_ms.append((time.perf_counter() - t) * 1000)
        page_ms, owner_ms = [], []
        for _ in range(200):
            after = rng.randint(0, n)
            t = time.perf_counter()
            page = c.list_page(after)
            page_ms.append((time.perf_counter() - t) * 1000)
            assert page.jobs
            t = time.perf_counter()
            c.list_page(after, owner=f"user{rng.randrange(OWNERS)}")
            owner_ms.append((time.perf_counter() - t) * 1000)
        t = time.perf_counter()
        total = c.list_page(0, count=True).total
        count_ms = (time.perf_counter() - t) * 1000
        assert total is not None and total >= n + running
        rss = h.rss_kib(jobd.proc.pid)
        for job in sleepers:
            c.stop(job, 0)
        c.close()
    finally:
        jobd.stop()
    size = dir_size(state)
    return {
        "finished jobs": f"{n:,}",
        "generate": f"{gen:.1f} s",
        "restart to serving": f"{statistics.median(readies):.2f} s",
        "starts/s": f"{starts:.0f}",
        "status p50 / p99": f"{pct(status_ms, .5):.2f} / {pct(status_ms, .99):.2f} ms",
        "list page p50 / p99": f"{pct(page_ms, .5):.1f} / {pct(page_ms, .99):.1f} ms",
        "owner page p50 / p99": f"{pct(owner_ms, .5):.1f} / {pct(owner_ms, .99):.1f} ms",
        "count (first page)": f"{count_ms:.0f} ms",
        f"RSS with {running:,} running": f"{rss / 1024:.0f} MB",
        "state dir": f"{size / (1 << 20):.0f} MB",
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--jobs", type=int, action="append",
                        help="history sizes (repeatable; default 10k, 100k, 1M)")
    parser.add_argument("--running", type=int, default=1000)
    parser.add_argument("--start-seconds", type=float, default=5.0)
    ns = parser.parse_args(argv)
    sizes = ns.jobs or [10_000, 100_000, 1_000_000]
    with tempfile.TemporaryDirectory(prefix="jobd-history-") as tmp:
        work = Path(tmp)
        os.chmod(work, 0o700)
        pki = h.Pki(work / "pki")
        rows = []
        for n in sizes:
            row = measure(work, pki, n, ns.running, ns.start_seconds)
            print(row, file=sys.stderr, flush=True)
            rows.append(row)
    cpu = next((line.split(":", 1)[1].strip() for line in
                Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), "?")
    print(f"\n{datetime.date.today().isoformat()}, {os.cpu_count()} x {cpu}, "
          f"Linux {platform.release()}, Python {platform.python_version()}, "
          f"SQLite {sqlite3.sqlite_version}\n")
    keys = list(rows[0])
    print("| " + " | ".join(keys) + " |")
    print("| " + " | ".join("---:" for _ in keys) + " |")
    for row in rows:
        print("| " + " | ".join(row[k] for k in keys) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
