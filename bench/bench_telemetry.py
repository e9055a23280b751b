"""What telemetry "off" costs: the no-op hooks jobd calls, timed in one process.

    .venv/bin/python bench/bench_telemetry.py

A start request makes jobd call: ``request()`` (enter and exit), ``replied()``,
``job_event("started")``, and for the connection ``connection()``,
``welcomed()``, ``closed()``; a streamed chunk calls ``streamed()``. This
times those calls on :data:`jobd._telemetry.NULL` (best of 5 repeats), and
checks that importing jobd's server did not import opentelemetry.
"""

from __future__ import annotations

import sys
import timeit
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import jobd._server  # noqa: F401  (what jobd imports, off)
import protocol as p
from jobd._telemetry import NULL

NUMBER = 200_000


def main() -> int:
    assert not any(m.startswith("opentelemetry") for m in sys.modules), "opentelemetry imported"
    conn = NULL.connection("127.0.0.1:1")
    request = p.Start((b"true",))
    reply = p.Started(p.JobStatus(1, "alice", (b"true",), p.JobState.RUNNING))
    status = reply.status

    def per_request() -> None:
        with conn.request(request):
            NULL.job_event("started", status)
            conn.replied(reply)

    def per_connection() -> None:
        c = NULL.connection("127.0.0.1:1")
        c.welcomed("alice", "control", "TLSv1.3")
        c.closed()

    def per_chunk() -> None:
        conn.streamed(65536)

    def baseline() -> None:
        pass

    for name, fn in (("empty function (baseline)", baseline),
                     ("hooks of one request (start)", per_request),
                     ("hooks of one connection", per_connection),
                     ("hook of one streamed chunk", per_chunk)):
        best = min(timeit.repeat(fn, number=NUMBER, repeat=5)) / NUMBER
        print(f"{name:32} {best * 1e9:8.0f} ns")
    return 0


if __name__ == "__main__":
    sys.exit(main())
