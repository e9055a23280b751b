"""Micro-benchmark of the protocol's encode and decode, per message kind.

Run: ``.venv/bin/python bench/bench_protocol.py`` (from the repository root).
Prints microseconds per call: the best of several repeats, each long enough
(about 0.1 s) to average out timer noise. Figures go in bench/README.md.
"""

from __future__ import annotations

import os
import platform
import sys
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import protocol as p

REPEATS = 3
TARGET_SECONDS = 0.1


def per_call(fn: Callable[[], object]) -> float:
    """Best time of one call of *fn*, in microseconds."""
    n = 1
    while True:  # find n such that n calls take about TARGET_SECONDS
        start = time.perf_counter()
        for _ in range(n):
            fn()
        elapsed = time.perf_counter() - start
        if elapsed >= TARGET_SECONDS / 4:
            break
        n *= 4
    n = max(1, int(n * TARGET_SECONDS / elapsed))
    best = float("inf")
    for _ in range(REPEATS):
        start = time.perf_counter()
        for _ in range(n):
            fn()
        best = min(best, (time.perf_counter() - start) / n)
    return best * 1e6


def status(job: int) -> p.JobStatus:
    return p.JobStatus(
        id=job, owner="alice", argv=(b"/usr/bin/python3", b"-m", b"http.server", b"8080"),
        state=p.JobState.EXITED, exit_code=0, pid=4000 + job, created=1_795_000_000.25,
        started=1_795_000_000.5, ended=1_795_000_100.75, output_bytes=123_456,
    )


def cases() -> list[tuple[str, p.Message]]:
    st = status(7)
    return [
        ("hello", p.Hello(software="jobctl 0.1.0")),
        ("welcome", p.Welcome(1, 0, "jobd 0.1.0", "alice", "control", p.MAX_FRAME_SIZE)),
        ("start", p.Start((b"make", b"-j8", b"all"), cwd=b"/srv/build",
                          limits=p.Limits(memory=1 << 30, cpus=2.0))),
        ("stop", p.Stop(7, grace=2.0)),
        ("status", p.GetStatus(7)),
        ("list", p.ListJobs(after=100)),
        ("stream", p.Stream(7, position=123_456)),
        ("output", p.Output(7)),
        ("delete", p.Delete(7)),
        ("started", p.Started(st)),
        ("stopped", p.Stopped(st)),
        ("status_result", p.StatusResult(st)),
        ("jobs (100 statuses)", p.JobList(tuple(status(i) for i in range(100)), more=True)),
        ("deleted", p.Deleted(7)),
        ("out (100 B)", p.OutputChunk(1, b"x" * 100, 1_000_000)),
        ("out (64 KiB)", p.OutputChunk(1, os.urandom(64 * 1024), 1_000_000)),
        ("out (512 KiB)", p.OutputChunk(1, os.urandom(p.MAX_OUTPUT_CHUNK), 1_000_000)),
        ("end", p.End(st, 1_000_000)),
        ("error", p.Error(p.ErrorCode.NOT_FOUND, "process not found")),
    ]


def main() -> None:
    print(f"python {platform.python_version()}, msgpack {'.'.join(map(str, _msgpack()))}")
    print(f"{'message':<22}{'bytes':>9}{'encode µs':>12}{'decode µs':>12}{'fast enc µs':>13}")
    for name, msg in cases():
        frame = p.encode_frame(msg)
        payload = frame[4:]
        assert p.decode_payload(payload) == msg
        enc = per_call(lambda msg=msg: p.encode_frame(msg))  # type: ignore[misc]
        dec = per_call(lambda payload=payload: p.decode_payload(payload))  # type: ignore[misc]
        fast = ""
        if isinstance(msg, p.OutputChunk):
            args = (msg.fd, msg.data, msg.position)
            assert p.encode_output_chunk(*args) == frame
            fast = f"{per_call(lambda args=args: p.encode_output_chunk(*args)):.2f}"  # type: ignore[misc]
        print(f"{name:<22}{len(frame):>9}{enc:>12.2f}{dec:>12.2f}{fast:>13}")
    print()
    print("through connection objects (send + receive_data + next_event):")
    for size in (64 * 1024, p.MAX_OUTPUT_CHUNK):
        us = per_call(_connection_round(size))
        print(f"  out ({size // 1024} KiB): {us:.2f} µs per chunk, "
              f"{size / us / 1e3:.2f} GB/s")


def _connection_round(size: int) -> Callable[[], object]:
    client, server = p.ClientConnection(), p.ServerConnection()
    server.receive_data(client.send(p.Hello()))
    server.next_event()
    client.receive_data(server.send(p.Welcome(1, 0, "jobd", "a", "admin", p.MAX_FRAME_SIZE)))
    client.next_event()
    server.receive_data(client.send(p.Stream(1)))
    server.next_event()
    data = os.urandom(size)

    def step() -> object:
        client.receive_data(server.send_output(1, data, 5))
        return client.next_event()

    return step


def _msgpack() -> tuple[int, ...]:
    import msgpack

    return tuple(msgpack.version)


if __name__ == "__main__":
    main()
