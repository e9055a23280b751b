"""Load and slow peers against a real jobd: idle connections, the connection limit,
a client that stops reading, many clients at once (SPEC §7).

Every wait is on a condition with a deadline (``select``/``poll`` on sockets,
the server's log, a stream's bytes), never a fixed sleep.
"""

from __future__ import annotations

import hashlib
import os
import select
import socket
import threading
import time
from pathlib import Path

import trio

import jobctl
import protocol as p

from .conftest import JobdProcess, Pki, start_jobd
from .hostile import (
    HELLO,
    RawTLS,
    ensure_fd_limit,
    many,
    open_now,
    soft_fd_limit,
    vm_rss,
    wait_all_closed,
)

IDLE_TCP = 300
IDLE_TLS = 40
SLOW_HELLO = 10


def blocking_client(jobd: JobdProcess, who: str = "alice") -> jobctl.BlockingClient:
    return jobctl.connect_blocking(jobd.address, jobd.port, server_name="localhost",
                                   **jobd.pki.files(who))


def tls_no_hello(jobd: JobdProcess) -> RawTLS:
    return RawTLS.to(jobd)


def test_idle_and_slow_connections_are_dropped_after_the_handshake_timeout(
        pki: Pki, tmp_path: Path) -> None:
    """300 TCP connections that never start TLS, TLS connections that never say hello and
    ones that send their hello a byte at a time: each is closed once the handshake timeout
    (6 s) has passed, and a real client is served meanwhile, before any of them timed out."""
    ensure_fd_limit(4096)
    server = start_jobd(pki, tmp_path / "state", "--handshake-timeout", "6")
    try:
        address = (server.address, server.port)
        opened = time.monotonic()
        # Bare sockets come from ten loopback addresses, 30 each: one address may hold
        # 32 handshakes at once (--max-handshakes-per-source); more would be closed
        # at once instead of timing out.
        sources = iter(range(IDLE_TCP))
        with many(IDLE_TCP, lambda: socket.create_connection(
                address, timeout=10, source_address=(f"127.0.1.{next(sources) % 10 + 1}", 0))
                  ) as tcp, \
                many(IDLE_TLS, lambda: tls_no_hello(server)) as tls, \
                many(SLOW_HELLO, lambda: tls_no_hello(server)) as slow:
            # a real client, while all of those wait (served, not queued behind them:
            # none of them has reached its timeout yet)
            with blocking_client(server) as client:
                job = client.start(["true"]).id
                assert [s.id for s in client.list()] == [job]
            assert "connection-timeout" not in server.log_text(), \
                "the real client was served only after idle connections timed out"
            # the slow ones send one byte of a valid hello every 0.25 s (their whole
            # hello would take over 12 s) until jobd hangs up
            done = _drip(slow, HELLO, interval=0.25, timeout=60)
            assert done == len(slow), "a slow hello was not cut off"
            still_open = wait_all_closed([*tcp, *(t.tls for t in tls)], timeout=60)
            elapsed = time.monotonic() - opened
            assert not still_open, f"{len(still_open)} connections still open after {elapsed:.1f}s"
        timeouts = server.wait_for_log_count("connection-timeout",
                                             IDLE_TCP + IDLE_TLS + SLOW_HELLO)
        assert timeouts >= IDLE_TCP + IDLE_TLS + SLOW_HELLO, timeouts
        with blocking_client(server) as client:  # and afterwards
            assert [s.id for s in client.list()] == [job]
    finally:
        assert server.stop() == 0


def _drip(conns: list[RawTLS], data: bytes, *, interval: float, timeout: float) -> int:
    """Send *data* one byte per *interval* on each connection until the server closes it
    (waiting on the sockets, not sleeping); the number of connections the server closed."""
    closed = 0
    deadline = time.monotonic() + timeout
    pending = {c.tls.fileno(): c for c in conns}
    for offset in range(len(data)):
        for conn in pending.values():
            conn.send(data[offset:offset + 1])
        tick = time.monotonic() + interval
        while pending and (now := time.monotonic()) < min(tick, deadline):
            ready, _, _ = select.select(list(pending), [], [], min(tick, deadline) - now)
            for fd in ready:
                if pending[fd].read_until_closed(timeout=1).closed:
                    del pending[fd]
                    closed += 1
        if not pending or time.monotonic() >= deadline:
            break
    return closed


def test_connection_limit_refuses_clearly_and_recovers(pki: Pki, tmp_path: Path) -> None:
    # No admin reserve and no per-identity share below the limit: the limit alone.
    server = start_jobd(pki, tmp_path / "state", "--max-connections", "5",
                        "--handshake-timeout", "1", "--admin-reserved-connections", "0",
                        "--max-connections-per-identity", "5",
                        "--max-handshakes-per-source", "3")
    busy = "server busy: too many connections (limit 5)"
    try:
        with many(5, lambda: RawTLS.to(server, "bob")) as holders:
            for holder in holders:
                holder.hello()
            # the CLI: exit 3 and a clear line, not a wait (a wait would outlast the
            # subprocess timeout: the holders never leave)
            result = server.jobctl("alice", "list", timeout=60)
            assert result.returncode == 3, result
            assert result.stderr == f"server refused the connection: {busy}\n".encode()
            # the wire: an error frame with code unavailable, then the close
            with RawTLS.to(server, "root") as extra:
                assert extra.send(HELLO)
                reply = extra.read_until_closed(timeout=10)
            assert reply.closed and reply.only_error() == p.Error(p.ErrorCode.UNAVAILABLE, busy)
            # a burst from one address: 3 handshakes at most, the rest closed at once;
            # all end quickly
            with many(100, lambda: socket.create_connection((server.address, server.port))
                      ) as burst:
                assert not wait_all_closed(burst, timeout=15)
            # the five holders were never disturbed
            for holder in holders:
                assert holder.send(p.encode_frame(p.ListJobs()))
                assert isinstance(holder.next_message(10), p.JobList)
            # one goes away (jobd closes its side too); then a new client is served
            holders[0].half_close()
            assert holders[0].read_until_closed(timeout=10).closed
            with blocking_client(server) as client:
                assert client.list() == []
            for holder in holders[1:]:  # the others go away, and jobd has closed them
                holder.half_close()
                assert holder.read_until_closed(timeout=10).closed
        server.wait_for_log(r"connection-refused .*who=alice .*reason=\"server busy: too many "
                            r"connections \(limit 5\)\"")
        # Unauthenticated connections take handshake slots, not connection slots, and
        # at most 3 from one address: five idle TCP connections from another address
        # do not keep a client out.
        with many(5, lambda: socket.create_connection(
                (server.address, server.port), source_address=("127.0.0.2", 0))) as idle:
            with blocking_client(server) as client:
                assert client.list() == []
            assert not wait_all_closed(idle, timeout=10)
        with blocking_client(server) as client:
            assert client.list() == []
    finally:
        assert server.stop() == 0


BLOCKS = 96  # MiB the noisy job writes
HALF = BLOCKS // 2
# Halfway, the job waits for the test (a fifo named by its argument): the test then
# sees it running with exactly half its output kept, whatever the machine's speed.
NOISY = ("import sys\n"
         f"for i in range({BLOCKS}):\n"
         f"    if i == {HALF}:\n"
         "        open(sys.argv[1]).read()\n"
         "    sys.stdout.buffer.write(bytes([i % 251]) * (1 << 20))\n"
         "    sys.stdout.buffer.flush()\n")


def _expected_digest() -> str:
    h = hashlib.sha256()
    for i in range(BLOCKS):
        h.update(bytes([i % 251]) * (1 << 20))
    return h.hexdigest()


def test_a_client_that_stops_reading_slows_only_itself(pki: Pki, tmp_path: Path) -> None:
    """A client asks for a stream of a job writing 96 MiB and never reads: the job runs
    and writes on, other clients stream all of it, jobd's memory stays flat."""
    server = start_jobd(pki, tmp_path / "state")
    try:
        with blocking_client(server) as client:
            client.list()
            rss_before = vm_rss(server.proc.pid)
            fifo = tmp_path / "halfway"
            os.mkfifo(fifo)
            job = client.start(["python3", "-c", NOISY, str(fifo)]).id
            with RawTLS.to(server) as stalled:
                stalled.tls.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
                stalled.hello()
                assert stalled.send(p.encode_frame(p.Stream(job)))
                # two well-behaved readers; the first says when it has half the output
                results: dict[int, tuple[str, int, p.End | None]] = {}
                half = threading.Event()
                readers = [threading.Thread(target=_read_all, args=(server, job, i, results,
                                                                     half if i == 0 else None))
                           for i in range(2)]
                for reader in readers:
                    reader.start()
                # the job ran and wrote half its output while the stalled client held
                # its stream, and it is still running: it waits for us
                assert half.wait(120), "the first half never arrived"
                midway = client.status(job)
                assert midway.running and midway.output_bytes == HALF << 20, midway
                fifo.write_bytes(b"go on\n")
                for reader in readers:
                    reader.join(120)
                assert all(not r.is_alive() for r in readers), "a reader did not finish"
                final = client.status(job)
                assert final.describe() == "exited: 0"
                assert final.output_bytes == BLOCKS << 20 and final.dropped_bytes == 0
                assert sorted(results) == [0, 1], "a reader failed"
                for digest, size, end in results.values():
                    assert (digest, size) == (_expected_digest(), BLOCKS << 20)
                    assert end is not None and end.status.describe() == "exited: 0"
                # memory: the stalled stream holds at most a chunk, not the output
                grown = vm_rss(server.proc.pid) - rss_before
                assert grown < 30 * 2**20, f"jobd grew by {grown / 2**20:.1f} MiB"
            # ... and once it goes away, jobd is still fine
            assert client.status(job).describe() == "exited: 0"
        result = server.jobctl("alice", "output", str(job))
        assert result.returncode == 0 and len(result.stdout) == BLOCKS << 20
    finally:
        assert server.stop() == 0


def _read_all(server: JobdProcess, job: int, index: int,
              results: dict[int, tuple[str, int, p.End | None]],
              half: threading.Event | None) -> None:
    h = hashlib.sha256()
    size = 0
    end = None
    with blocking_client(server) as client:
        for event in client.stream(job):
            if isinstance(event, p.OutputChunk):
                h.update(event.data)
                size += len(event.data)
                if half is not None and size >= HALF << 20:
                    half.set()
            else:
                end = event
    results[index] = (h.hexdigest(), size, end)


CLIENTS = 20
LINES = 300


async def test_many_clients_at_once(pki: Pki, tmp_path: Path) -> None:
    """20 clients start, stream, stop and list jobs concurrently: every result is right."""
    server = start_jobd(pki, tmp_path / "state")
    who = ["alice", "bob", "root"]
    ids: list[int] = []
    try:
        async def one(k: int) -> None:
            name = who[k % len(who)]
            async with jobctl.connect(server.address, server.port, server_name="localhost",
                                      **pki.files(name)) as client:
                assert client.identity == name
                script = f'i=0; while [ $i -lt {LINES} ]; do echo "$1-$i"; i=$((i+1)); done'
                talker = await client.start(["sh", "-c", script, "sh", f"client{k}"])
                sleeper = await client.start(["sleep", "1000"])
                ids.extend((talker.id, sleeper.id))
                out = bytearray()
                end = None
                async for event in client.stream(talker.id):
                    if isinstance(event, p.OutputChunk):
                        assert event.fd == 1
                        out += event.data
                    else:
                        end = event
                expected = "".join(f"client{k}-{i}\n" for i in range(LINES)).encode()
                assert bytes(out) == expected
                assert end is not None and end.status.describe() == "exited: 0"
                assert (await client.status(sleeper.id)).running
                stopped = await client.stop(sleeper.id, grace=0)
                assert stopped.describe() == "stopped"
                assert (await client.status(talker.id)).describe() == "exited: 0"
                listed = {s.id: s for s in await client.list()}
                assert listed[talker.id].owner == name
                assert listed[sleeper.id].describe() == "stopped"
                if name != "root":
                    assert all(s.owner == name for s in listed.values())

        with trio.fail_after(60):
            async with trio.open_nursery() as nursery:
                for k in range(CLIENTS):
                    nursery.start_soon(one, k)
        assert sorted(ids) == list(range(1, 2 * CLIENTS + 1))
    finally:
        assert server.stop() == 0


def test_a_flood_leaves_file_descriptors_for_the_jobs(pki: Pki, tmp_path: Path) -> None:
    """Under a plain ``ulimit -n`` (soft limit 512 here), a flood of idle connections must
    not take every descriptor jobd has: jobd lowers its connection limit to what the
    descriptors allow (and says so), keeps accepting and refusing, and a client connected
    before the flood still starts jobs and gets their output while the flood lasts."""
    ensure_fd_limit(4096)
    with soft_fd_limit(512):
        # A handshake timeout far beyond what any step below needs, even on a loaded
        # machine: nothing here may depend on the flood timing out, or not, in time.
        server = start_jobd(pki, tmp_path / "state", "--handshake-timeout", "120")
    try:
        line = server.wait_for_log(r"connection-limit-lowered")
        assert "configured=1000 limit=85 nofile=512" in line, line
        with blocking_client(server) as client, \
                many(600, lambda: socket.create_connection((server.address, server.port))
                     ) as flood:
            # A connection behind the flood in the accept queue is accepted and dropped
            # (beyond its address's handshake share) long before the flood's
            # 120 s handshake timeout: jobd is not stuck on EMFILE with a full backlog.
            with socket.create_connection((server.address, server.port)) as probe:
                assert not wait_all_closed([probe], timeout=60)
            assert len(os.listdir(f"/proc/{server.proc.pid}/fd")) < 512 - 128
            # jobs start, and their output is kept, while the flood holds its slots
            jobs = [client.start(["sh", "-c", f"echo job-{k}"]) for k in range(20)]
            for k, status in enumerate(jobs):
                assert status.state is not p.JobState.ERROR, status.describe()
                out = b"".join(e.data for e in client.stream(status.id)
                               if isinstance(e, p.OutputChunk))
                assert out == f"job-{k}\n".encode()
            # ... while the flood, all from one address, still held the handshake
            # slots one address may hold (--max-handshakes-per-source, 32 by default).
            assert len(open_now(flood)) == 32
        assert "Too many open files" not in server.log_text()
        assert "EMFILE" not in server.log_text()
    finally:
        assert server.stop() == 0
