"""Fair shares (issue 13, items 11 and 12): no identity, source address or user can
lock the admin (or everyone else) out: connection shares, an admin reserve, a cap on
handshakes per source, running jobs per user, a descriptor reserve, and an accept
loop that survives running out of descriptors."""

from __future__ import annotations

import os
import resource
import socket
import ssl
import struct
import subprocess
import threading
from pathlib import Path

import pytest

import jobctl
import protocol as p

from .conftest import JOBD, RUN_CWD, JobdProcess, Pki, start_jobd
from .hostile import (
    HELLO,
    RawTLS,
    client_context,
    ensure_fd_limit,
    many,
    soft_fd_limit,
    wait_all_closed,
)

OTHER_SOURCE = "127.0.0.2"  # loopback: jobd on 127.0.0.1 sees this as another address


def welcomed(server: JobdProcess, who: str) -> tuple[RawTLS, p.Message | None]:
    """A TLS connection as ``who`` that has sent its hello, and jobd's first answer."""
    conn = RawTLS.to(server, who)
    assert conn.send(HELLO)
    return conn, conn.next_message(30)


def blocking(server: JobdProcess, who: str) -> jobctl.BlockingClient:
    return jobctl.connect_blocking(server.address, server.port, server_name="localhost",
                                   **server.pki.files(who))


def test_options_are_in_help() -> None:
    out = subprocess.run([*JOBD, "--help"], capture_output=True, timeout=60, cwd=RUN_CWD,
                         check=True).stdout.decode()
    for option in ("--max-connections-per-identity", "--admin-reserved-connections",
                   "--max-handshakes-per-source", "--max-jobs-per-user"):
        assert option in out, option


# -- item 11: lock-out -------------------------------------------------------------


def test_idle_observers_do_not_lock_out_the_admin(pki: Pki, tmp_path: Path) -> None:
    """20 slots and no per-identity cap below 20: an observe certificate gets the 17
    slots open to all, its 18th connection is refused (unavailable), and the admin
    still gets in, twice (its reserve is 3)."""
    server = start_jobd(pki, tmp_path / "state", "--max-connections", "20",
                        "--max-connections-per-identity", "20")
    held: list[RawTLS] = []
    try:
        for _ in range(17):
            conn, answer = welcomed(server, "olga")
            held.append(conn)
            assert isinstance(answer, p.Welcome), answer
        with RawTLS.to(server, "olga") as extra:
            assert extra.send(HELLO)
            reply = extra.read_until_closed(30)
        busy = "server busy: too many connections (limit 17, 3 more reserved for admin)"
        assert reply.only_error() == p.Error(p.ErrorCode.UNAVAILABLE, busy)
        server.wait_for_log(r"connection-refused .*who=olga .*reserved for admin")
        # a control user is refused the same way; the admin is not
        refused = server.jobctl("alice", "list")
        assert refused.returncode == 3
        assert refused.stderr.decode() == f"server refused the connection: {busy}\n"
        with blocking(server, "root") as root, blocking(server, "root") as root2:
            assert root.list() == [] and root2.list() == []
        # an observer that leaves frees its slot for anyone
        held.pop().close()
        with blocking(server, "root") as root:  # the admin sees the slot come back
            for _ in range(100):
                if server.jobctl("alice", "list").returncode == 0:
                    break
            else:
                raise AssertionError("the freed slot never came back")
            assert root.list() == []
    finally:
        for conn in held:
            conn.close()
        assert server.stop() == 0


def test_one_identity_is_held_to_its_share(pki: Pki, tmp_path: Path) -> None:
    """With 20 slots the default share is 5: olga's sixth connection is refused with
    limit_exceeded, and other identities still get in."""
    server = start_jobd(pki, tmp_path / "state", "--max-connections", "20")
    held: list[RawTLS] = []
    try:
        for _ in range(5):
            conn, answer = welcomed(server, "olga")
            held.append(conn)
            assert isinstance(answer, p.Welcome), answer
        conn, answer = welcomed(server, "olga")
        conn.close()
        assert answer == p.Error(p.ErrorCode.LIMIT_EXCEEDED,
                                 "too many connections for olga (limit 5 per identity)")
        result = server.jobctl("olga", "list")
        assert result.returncode == 3
        assert b"too many connections for olga" in result.stderr
        server.wait_for_log(r"connection-refused .*who=olga .*per identity")
        assert server.jobctl("alice", "list").returncode == 0
        assert server.jobctl("root", "list").returncode == 0
    finally:
        for conn in held:
            conn.close()
        assert server.stop() == 0


def test_bare_sockets_from_one_source_do_not_block_others(pki: Pki, tmp_path: Path) -> None:
    """20 slots: 100 TCP connections from one address that never start TLS hold at most
    10 handshake slots (half) while they wait for the 60 s timeout; the rest are closed
    at once, and a client from another address is served meanwhile."""
    ensure_fd_limit(4096)
    server = start_jobd(pki, tmp_path / "state", "--max-connections", "20",
                        "--handshake-timeout", "60")
    try:
        with many(100, lambda: socket.create_connection(
                (server.address, server.port), source_address=(OTHER_SOURCE, 0))) as flood:
            # the 90 beyond the share are closed at once; the wait ends then (the
            # deadline only bounds a failure)
            still_open = wait_all_closed(flood, timeout=50, leave=10)
            assert len(still_open) == 10, len(still_open)
            for _ in range(3):
                result = server.jobctl("alice", "list")
                assert result.returncode == 0, result
            with blocking(server, "root") as root:
                assert root.list() == []
        server.wait_for_log(rf"connection-refused peer={OTHER_SOURCE}:\d+ "
                            rf"reason=\"too many handshakes from {OTHER_SOURCE} \(limit 10\)\"")
    finally:
        assert server.stop() == 0


def test_explicit_handshakes_per_source(pki: Pki, tmp_path: Path) -> None:
    server = start_jobd(pki, tmp_path / "state", "--max-handshakes-per-source", "3",
                        "--handshake-timeout", "60")
    try:
        with many(10, lambda: socket.create_connection(
                (server.address, server.port), source_address=(OTHER_SOURCE, 0))) as flood:
            still_open = wait_all_closed(flood, timeout=50, leave=3)
            assert len(still_open) == 3, len(still_open)
            assert server.jobctl("alice", "list").returncode == 0
    finally:
        assert server.stop() == 0


@pytest.mark.parametrize(("args", "message"), [
    (["--max-connections", "5", "--admin-reserved-connections", "5"],
     "--admin-reserved-connections must be below --max-connections"),
    (["--max-connections-per-identity", "0"], "must be at least 1"),
    (["--max-handshakes-per-source", "0"], "must be at least 1"),
    (["--max-jobs-per-user", "-1"], "must not be negative"),
])
def test_bad_share_options_are_usage_errors(args: list[str], message: str) -> None:
    cmd = [*JOBD, "-c", "s.pem", "-k", "s.key", "-C", "ca.pem", *args]
    result = subprocess.run(cmd, capture_output=True, timeout=60, cwd=RUN_CWD)
    assert result.returncode == 2
    assert message in result.stderr.decode()


# -- item 12: quotas ---------------------------------------------------------------


def test_running_jobs_per_user(pki: Pki, tmp_path: Path) -> None:
    server = start_jobd(pki, tmp_path / "state", "--max-jobs-per-user", "2")
    try:
        with blocking(server, "alice") as alice, blocking(server, "bob") as bob, \
                blocking(server, "root") as root:
            first = alice.start(["sleep", "1000"])
            alice.start(["sleep", "1000"])
            with pytest.raises(jobctl.ServerError) as refused:
                alice.start(["sleep", "1000"])
            assert refused.value.code is p.ErrorCode.LIMIT_EXCEEDED
            assert refused.value.message == "too many running jobs for alice (limit 2 per user)"
            # jobs that never ran are not running: a failed start does not count
            assert bob.start(["/nonexistent/cmd"]).state is p.JobState.ERROR
            bob.start(["sleep", "1000"])
            bob.start(["sleep", "1000"])
            for _ in range(3):  # admin is exempt
                root.start(["sleep", "1000"])
            alice.stop(first.id, grace=0)
            alice.start(["sleep", "1000"])  # a place again once one ended
        result = server.jobctl("alice", "start", "sleep", "1")
        assert result.returncode == 1
        assert result.stderr == b"too many running jobs for alice (limit 2 per user)\n"
    finally:
        assert server.stop() == 0


def test_descriptor_reserve_for_admin(pki: Pki, tmp_path: Path) -> None:
    """Under a small descriptor limit, a control user's jobs stop well before jobd runs
    out (unavailable), the admin can still start jobs, and not even the admin's starts
    take the last descriptors: every job can still be stopped."""
    ensure_fd_limit(4096)
    with soft_fd_limit(400):
        server = start_jobd(pki, tmp_path / "state", "--max-jobs-per-user", "0")
    try:
        with blocking(server, "alice") as alice, blocking(server, "root") as root:
            mine = []
            for _ in range(200):
                try:
                    mine.append(alice.start(["sleep", "1000"]).id)
                except jobctl.ServerError as exc:
                    assert exc.code is p.ErrorCode.UNAVAILABLE
                    assert "short of file descriptors" in exc.message
                    break
            else:
                raise AssertionError("a control user's jobs were never refused")
            assert len(mine) >= 10
            server.wait_for_log(r"start-refused .*who=alice .*short of file descriptors")
            admins = []
            for _ in range(300):
                try:
                    status = root.start(["sleep", "1000"])
                except jobctl.ServerError as exc:
                    assert exc.code is p.ErrorCode.UNAVAILABLE
                    assert "out of file descriptors" in exc.message
                    break
                assert status.state is p.JobState.RUNNING, status.describe()
                admins.append(status.id)
            else:
                raise AssertionError("the admin's starts were never refused")
            assert len(admins) >= 5
            for job in admins + mine:
                assert root.stop(job, grace=0).describe() == "stopped"
            assert root.start(["true"]).state is not p.JobState.ERROR
        assert "Traceback" not in server.log_text()
    finally:
        assert server.stop() == 0


def lowest_free_fd(pid: int) -> int:
    used = {int(name) for name in os.listdir(f"/proc/{pid}/fd")}
    return next(n for n in range(len(used) + 1) if n not in used)


def test_accept_backs_off_on_emfile(jobd: JobdProcess) -> None:
    """With no descriptor left (jobd's soft limit lowered to its lowest free descriptor
    with prlimit), accept() fails with EMFILE: jobd logs it once, without a traceback,
    keeps serving the clients it has, and accepts the waiting client once descriptors
    are free again."""
    pid = jobd.proc.pid
    soft, hard = resource.prlimit(pid, resource.RLIMIT_NOFILE)
    with blocking(jobd, "root") as root:
        resource.prlimit(pid, resource.RLIMIT_NOFILE, (lowest_free_fd(pid), hard))
        try:
            waiting = socket.create_connection((jobd.address, jobd.port), timeout=120)
            answers: list[p.Message | None] = []

            def handshake_when_accepted() -> None:
                ctx = client_context(jobd.pki, "olga")
                with ctx.wrap_socket(waiting, server_hostname="localhost") as tls:
                    tls.sendall(HELLO)
                    answers.append(read_frame(tls))

            waiter = threading.Thread(target=handshake_when_accepted)
            waiter.start()
            jobd.wait_for_log(r"error accept-paused reason=\"too many open files\"")
            assert root.list() == []  # a connected client is served meanwhile
            assert not answers
        finally:
            resource.prlimit(pid, resource.RLIMIT_NOFILE, (soft, hard))
        waiter.join(120)
        assert not waiter.is_alive()
        assert len(answers) == 1 and isinstance(answers[0], p.Welcome), answers
        jobd.wait_for_log(r"info accept-resumed")
        assert root.list() == []
    log = jobd.log_text()
    assert log.count("accept-paused") == 1, log
    assert "Traceback" not in log


def read_frame(sock: ssl.SSLSocket) -> p.Message:
    def exactly(n: int) -> bytes:
        data = b""
        while len(data) < n:
            chunk = sock.recv(n - len(data))
            assert chunk, "closed before a whole frame"
            data += chunk
        return data

    size = struct.unpack(">I", exactly(4))[0]
    return p.decode_payload(exactly(size))


def test_fd_helpers_count_this_process() -> None:
    from jobd._admission import descriptors_in_use

    before = descriptors_in_use()
    r, w = os.pipe()
    try:
        assert descriptors_in_use() == before + 2
    finally:
        os.close(r)
        os.close(w)


def test_the_cheap_bound_is_never_below_the_count() -> None:
    """A start skips the count only when the table's size already leaves enough
    (issue 26): that size must bound the count, also past a table's growth."""
    from jobd._admission import descriptors_at_most, descriptors_in_use

    opened: list[int] = []
    try:
        for _ in range(3):
            bound = descriptors_at_most()
            assert bound is not None and bound >= descriptors_in_use()
            assert bound > max(opened, default=0)
            opened += os.pipe()  # the highest descriptor grows past the bound
            while opened[-1] < bound:
                opened += os.pipe()
    finally:
        for fd in opened:
            os.close(fd)


# -- the admission rules themselves (jobd/_admission.py), without a server -----------


def test_default_shares_follow_the_connection_limit() -> None:
    from jobd._admission import Limits

    with soft_fd_limit(4096):  # room for 1,000 slots: (4096 - 256) // 3 = 1280
        assert Limits.derive(1000, 3, None, None) == Limits(1000, 3, 64, 32)
        assert Limits.derive(20, 3, None, None) == Limits(20, 3, 5, 10)
        assert Limits.derive(2, 3, None, None) == Limits(2, 1, 1, 1)
        assert Limits.derive(20, 0, 50, 50) == Limits(20, 0, 20, 20)  # never above the slots


def test_admission_counts_and_releases() -> None:
    from jobd._admission import Admission, Limits, Ticket
    from jobd._auth import Identity, Role

    admission = Admission(Limits(connections=4, admin_reserved=1, per_identity=2,
                                 handshakes_per_source=2))
    olga, bob, root = (Identity("olga", Role.OBSERVE), Identity("bob", Role.CONTROL),
                       Identity("root", Role.ADMIN))
    tickets = [Ticket("10.0.0.1") for _ in range(3)]
    assert admission.begin_handshake(tickets[0]) is None
    assert admission.begin_handshake(tickets[1]) is None
    assert admission.begin_handshake(tickets[2]) == "too many handshakes from 10.0.0.1 (limit 2)"
    assert admission.admit(tickets[0], olga) is None  # leaves the handshake slot
    assert admission.begin_handshake(tickets[2]) is None
    assert admission.admit(tickets[1], olga) is None
    refused = admission.admit(tickets[2], olga)
    assert refused == (p.ErrorCode.LIMIT_EXCEEDED,
                       "too many connections for olga (limit 2 per identity)")
    admission.release(tickets[2])
    more = [Ticket(f"10.0.1.{k}") for k in range(3)]
    for ticket in more:
        assert admission.begin_handshake(ticket) is None
    assert admission.admit(more[0], bob) is None  # 3 of the 3 slots open to all
    assert admission.admit(more[1], bob) == (
        p.ErrorCode.UNAVAILABLE,
        "server busy: too many connections (limit 3, 1 more reserved for admin)")
    assert admission.admit(more[2], root) is None  # the reserved slot
    admission.release(more[1])
    extra = Ticket("10.0.2.1")
    assert admission.begin_handshake(extra) is None
    assert admission.admit(extra, root) == (
        p.ErrorCode.UNAVAILABLE, "server busy: too many connections (limit 4)")
    for ticket in [*tickets, *more, extra]:
        admission.release(ticket)
        admission.release(ticket)  # idempotent
    assert (admission.handshaking, admission.welcomed, admission.welcomed_admin) == (0, 0, 0)
