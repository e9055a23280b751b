"""jobd's memory under attack and over a soak (issue 21 item 7).

    .venv/bin/python bench/bench_memory.py                      # attack rounds + 30 min soak
    .venv/bin/python bench/bench_memory.py --soak-minutes 3     # quick
    .venv/bin/python bench/bench_memory.py --no-soak
    .venv/bin/python bench/bench_memory.py --no-soak --tree /tmp/old   # git archive of a commit

Each part starts its own jobd (bench/_harness.py) on loopback and reads its
RSS from /proc every 0.2 s.

- **Bad frames**: rounds of ``--attackers`` threads (default 60) that each,
  for ``--round-seconds`` (default 20), connect with a valid certificate, say
  hello, send a 1 MiB frame header and 1 MiB of garbage, and read the error
  until jobd closes. Reported per round: connections, peak RSS, and RSS once
  the round is over and jobd idle.
- **Stalled streams**: ``--stalled`` connections (default 100) each ask for
  the stream of a job that wrote 64 MiB and never read. Reported: RSS per
  stalled stream, then RSS after they closed.
- **Soak**: for ``--soak-minutes`` (default 30) two clients in a loop start
  a job writing 100 KB, stream it, ask its status, list, delete it, and a
  third connects and disconnects. RSS every 10 s; the slope is a least-squares
  fit over the second half of the run (KiB/min), so the start-up's caches
  filling do not count as a leak.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import os
import platform
import socket
import ssl
import struct
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _harness as h

import protocol as p

GARBAGE = struct.pack(">I", 1 << 20) + b"\xc1" * (1 << 20)
HELLO = p.encode_frame(p.Hello(software="bench-memory"))


class Sampler:
    """Samples a pid's RSS every ``interval`` seconds in a thread; keeps the peak."""

    def __init__(self, pid: int, interval: float = 0.2):
        self.pid = pid
        self.interval = interval
        self.peak = 0
        self.samples: list[tuple[float, int]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> Sampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def reset(self) -> None:
        self.peak = 0

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            rss = h.rss_kib(self.pid)
            self.peak = max(self.peak, rss)
            self.samples.append((time.monotonic(), rss))


def _tls(jobd: h.Jobd) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    ctx.load_verify_locations(jobd.pki.path("ca.pem"))
    ctx.load_cert_chain(jobd.pki.path("alice.pem"), jobd.pki.path("alice.key"))
    return ctx


def _bad_frame(jobd: h.Jobd, ctx: ssl.SSLContext) -> None:
    with socket.create_connection(("127.0.0.1", jobd.port), timeout=30) as raw, \
            ctx.wrap_socket(raw, server_hostname="localhost") as tls:
        tls.sendall(HELLO)
        with contextlib.suppress(OSError):
            tls.sendall(GARBAGE)
            while tls.recv(65536):
                pass


#: Seconds jobd is left idle before "after" is read (--settle): more than its trim delay.
SETTLE = 10.0


def _settle(jobd: h.Jobd, seconds: float | None = None) -> int:
    """RSS once jobd has had a few seconds with nothing to do."""
    time.sleep(SETTLE if seconds is None else min(seconds, SETTLE))
    return jobd.rss_kib()


def attack_rounds(jobd: h.Jobd, rounds: int, attackers: int, seconds: float) -> list[str]:
    ctx = _tls(jobd)
    lines = [f"RSS before: {jobd.rss_kib() / 1024:.0f} MiB"]
    with Sampler(jobd.pid) as sampler:
        for index in range(1, rounds + 1):
            sampler.reset()
            done = [0]
            lock = threading.Lock()
            deadline = time.monotonic() + seconds

            def attacker(done: list[int] = done, lock: threading.Lock = lock,
                         deadline: float = deadline) -> None:
                while time.monotonic() < deadline:
                    with contextlib.suppress(OSError):
                        _bad_frame(jobd, ctx)
                    with lock:
                        done[0] += 1

            threads = [threading.Thread(target=attacker) for _ in range(attackers)]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            after = _settle(jobd)
            line = (f"round {index}: {done[0]} connections, peak {sampler.peak / 1024:.0f} MiB,"
                    f" after {after / 1024:.0f} MiB")
            print(line, file=sys.stderr, flush=True)
            lines.append(line)
    return lines


def stalled_streams(jobd: h.Jobd, count: int) -> list[str]:
    with jobd.connect() as client:
        job = client.start(["head", "-c", str(64 << 20), "/dev/zero"])
        client.wait(job.id)
    before = _settle(jobd, 2)
    ctx = _tls(jobd)
    conns = []
    try:
        for _ in range(count):
            raw = socket.create_connection(("127.0.0.1", jobd.port), timeout=30)
            raw.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
            tls = ctx.wrap_socket(raw, server_hostname="localhost")
            tls.sendall(HELLO)
            tls.recv(65536)  # the welcome
            tls.sendall(p.encode_frame(p.Stream(job.id)))
            conns.append(tls)
        held = _settle(jobd, 5)
    finally:
        for tls in conns:
            with contextlib.suppress(OSError):
                tls.close()
    after = _settle(jobd)
    lines = [f"{count} stalled streams: RSS {before / 1024:.0f} -> {held / 1024:.0f} MiB, "
             f"{(held - before) / count:.0f} KiB per stream; after they closed "
             f"{after / 1024:.0f} MiB"]
    print(lines[0], file=sys.stderr, flush=True)
    return lines


def _slope(samples: list[tuple[float, int]]) -> float:
    """Least-squares slope of RSS over time, KiB per minute."""
    n = len(samples)
    if n < 2:
        return 0.0
    mt = sum(t for t, _ in samples) / n
    mr = sum(r for _, r in samples) / n
    num = sum((t - mt) * (r - mr) for t, r in samples)
    den = sum((t - mt) ** 2 for t, _ in samples)
    return num / den * 60 if den else 0.0


def soak(jobd: h.Jobd, minutes: float) -> list[str]:
    stop = threading.Event()
    counts = {"jobs": 0, "connections": 0, "errors": 0}
    lock = threading.Lock()

    def worker() -> None:
        while not stop.is_set():
            try:
                with jobd.connect() as client:
                    for _ in range(20):
                        if stop.is_set():
                            break
                        job = client.start(["sh", "-c", "head -c 75000 /dev/urandom | base64"])
                        size = sum(len(e.data) for e in client.stream(job.id)
                                   if isinstance(e, p.OutputChunk))
                        assert size > 100_000, size
                        client.status(job.id)
                        client.list_page()
                        client.delete(job.id)
                        with lock:
                            counts["jobs"] += 1
            except Exception as exc:  # count and go on: the soak measures memory
                print(f"soak worker: {exc!r}", file=sys.stderr)
                with lock:
                    counts["errors"] += 1

    def connector() -> None:
        while not stop.is_set():
            try:
                with jobd.connect() as client:
                    client.list_page()
            except Exception as exc:
                print(f"soak connector: {exc!r}", file=sys.stderr)
                with lock:
                    counts["errors"] += 1
            with lock:
                counts["connections"] += 1

    start_rss = jobd.rss_kib()
    samples: list[tuple[float, int]] = []
    threads = [threading.Thread(target=f) for f in (worker, worker, connector)]
    for t in threads:
        t.start()
    t0 = time.monotonic()
    interval = min(10.0, minutes * 60 / 4)
    try:
        while time.monotonic() - t0 < minutes * 60:
            time.sleep(interval)
            rss = jobd.rss_kib()
            samples.append((time.monotonic(), rss))
            print(f"soak {(time.monotonic() - t0) / 60:5.1f} min: RSS {rss / 1024:.1f} MiB, "
                  f"{counts}", file=sys.stderr, flush=True)
    finally:
        stop.set()
        for t in threads:
            t.join()
    idle = _settle(jobd)
    half = samples[len(samples) // 2:]
    return [f"soak {minutes:g} min: {counts['jobs']} jobs streamed, {counts['connections']} "
            f"extra connections, {counts['errors']} errors; RSS {start_rss / 1024:.1f} -> "
            f"{samples[-1][1] / 1024:.1f} MiB (peak {max(r for _, r in samples) / 1024:.1f}), "
            f"{idle / 1024:.1f} MiB idle after; slope over the second half "
            f"{_slope(half):.0f} KiB/min (whole run {_slope(samples):.0f} KiB/min)"]


def main(argv: list[str] | None = None) -> int:
    global SETTLE
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--attackers", type=int, default=60)
    parser.add_argument("--round-seconds", type=float, default=20.0)
    parser.add_argument("--stalled", type=int, default=100)
    parser.add_argument("--soak-minutes", type=float, default=30.0)
    parser.add_argument("--no-soak", action="store_true")
    parser.add_argument("--only-soak", action="store_true")
    parser.add_argument("--settle", type=float, default=SETTLE,
                        help="seconds of idleness before an 'after' figure (default: %(default)s)")
    parser.add_argument("--tree", type=Path, metavar="DIR",
                        help="measure the jobd in DIR (e.g. an older commit from git archive)")
    ns = parser.parse_args(argv)
    if ns.tree is not None:
        h.CODE_TREE = ns.tree.resolve()
    SETTLE = ns.settle
    h.ensure_tools()
    lines: list[str] = []
    with tempfile.TemporaryDirectory(prefix="jobd-memory-") as tmp:
        work = Path(tmp)
        os.chmod(work, 0o700)
        pki = h.Pki(work / "pki")
        if not ns.only_soak:
            jobd = h.Jobd(work, pki, "--max-connections-per-identity", "250",
                          "--max-handshakes-per-source", "400",
                          "--max-connections", "1000")
            try:
                lines += attack_rounds(jobd, ns.rounds, ns.attackers, ns.round_seconds)
                lines += stalled_streams(jobd, ns.stalled)
            finally:
                jobd.stop()
        if not ns.no_soak:
            jobd = h.Jobd(work, pki)
            try:
                lines += soak(jobd, ns.soak_minutes)
            finally:
                jobd.stop()
    cpu = h.machine().get("cpu", "?")
    print(f"\n{datetime.date.today().isoformat()}, {os.cpu_count()} x {cpu}, "
          f"Linux {platform.release()}, Python {platform.python_version()}\n")
    for line in lines:
        print(f"- {line}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
