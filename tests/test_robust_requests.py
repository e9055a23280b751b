"""Requests that are well-formed msgpack but hostile in size or value, against a real jobd.

Issue 13, items 1-3, 10 and 14: a start whose fields no longer fit a status
frame (a poison job that broke ``list`` for everyone, across restarts), device
lists that cost O(n^2), limits that are not finite, frames that decode to many
times their size, and refused starts that left no trace in the log.
"""

from __future__ import annotations

import json
import os
import threading
from pathlib import Path

import pytest

import protocol as p
from jobd.engine._store import Record, Store

from .conftest import JobdProcess, Pki, start_jobd
from .hostile import (
    AMPLIFIER,
    Bystander,
    RawTLS,
    Reply,
    attack,
    bystander,
    client_context,
    expect_error,
    frame,
    jobd,
    packed,
)

__all__ = ["bystander", "jobd"]  # the fixtures

BAD = p.ErrorCode.BAD_REQUEST


def refused(reply: Reply, *fragments: str) -> p.Error:
    """The one bad_request error frame *reply* holds, then the close."""
    return expect_error(reply, BAD, *fragments)


def listing(jobd: JobdProcess, who: str) -> list[dict[str, object]]:
    result = jobd.jobctl(who, "list", extra=["--json"])
    assert result.returncode == 0, result
    jobs: list[dict[str, object]] = json.loads(result.stdout)["jobs"]
    return jobs


def test_poison_cwd_is_refused_and_list_keeps_working(jobd: JobdProcess,
                                                      bystander: Bystander) -> None:
    """A start with a ~1 MiB cwd used to make a job whose status (its error echoing the
    cwd) no longer fit a frame: ``list`` then dropped every role's connection."""
    cwd = b"/" + b"d" * (p.MAX_FRAME_SIZE - 200)
    reply = attack(jobd, packed({"type": "start", "argv": [b"true"], "cwd": cwd}))
    refused(reply, "binary of 1048377 bytes exceeds the request limit of 262144")
    jobd.wait_for_log(r"start-refused .*who=alice role=control code=bad_request "
                      r".*binary of 1048377 bytes")
    for size in (p.MAX_PATH_BYTES + 1, p.MAX_ARG_BYTES):  # fits the decoder, not PATH_MAX
        reply = attack(jobd, packed({"type": "start", "argv": [b"true"],
                                     "cwd": b"/" + b"d" * (size - 1)}))
        refused(reply, f"cwd of {size} bytes is longer than 4095")
    for who in ("root", "olga", "alice", "bob"):
        listing(jobd, who)
    bystander.check()


def test_aliased_device_list_is_refused(jobd: JobdProcess, bystander: Bystander) -> None:
    """400 names of one device (``/dev/./././null``...): more than 16 entries per
    direction is bad_request, before any of them is stat-ed or stored."""
    devices = [["/dev" + "/." * i + "/null", 1 << 20] for i in range(400)]
    reply = attack(jobd, packed({"type": "start", "argv": [b"true"],
                                 "limits": {"io_read_bps": devices}}))
    refused(reply, "io_read_bps", "16")
    # two spellings of one path are one device: given twice
    twice = [["/dev/null", 1 << 20], ["/dev/./null", 1 << 20]]
    reply = attack(jobd, packed({"type": "start", "argv": [b"true"],
                                 "limits": {"io_write_bps": twice}}))
    refused(reply, "/dev/null", "more than once")
    bystander.check()


def test_o_n_squared_device_list_is_cheap(jobd: JobdProcess, bystander: Bystander) -> None:
    """174,700 three-letter device names in one 1 MiB start froze jobd for minutes
    (a list scan per entry, on the event loop). Now: refused at decoding."""
    names = [[f"{i:03x}"[-3:], 1] for i in range(174_700)]
    data = packed({"type": "start", "argv": [b"true"], "limits": {"io_read_bps": names}})
    assert len(data) <= p.MAX_FRAME_SIZE + 4
    refused(attack(jobd, data))
    bystander.check()


@pytest.mark.parametrize(("name", "limits", "fragment"), [
    ("cpus +inf", {"cpus": float("inf")}, "cpus"),
    ("cpus -inf", {"cpus": float("-inf")}, "cpus"),
    ("cpus nan", {"cpus": float("nan")}, "cpus"),
    ("cpus 1e300", {"cpus": 1e300}, "cpus"),
    ("memory 2**64-1", {"memory": 2**64 - 1}, "memory"),
    ("pids 2**63", {"pids": 2**63}, "pids"),
    ("io rate 2**64-1", {"io_read_bps": [["/dev/null", 2**64 - 1]]}, "io_read_bps"),
])
def test_limits_out_of_range_spend_no_job_id(jobd: JobdProcess, bystander: Bystander,
                                             name: str, limits: dict[str, object],
                                             fragment: str) -> None:
    """``limits.cpus = +inf`` raised OverflowError in jobd: the client got EOF and a job
    ID was spent. Now the protocol refuses it: bad_request, no ID spent."""
    with RawTLS.to(jobd) as conn:
        conn.hello()
        assert conn.send(p.encode_frame(p.Start((b"true",))))
        before = conn.next_message(10)
        assert isinstance(before, p.Started), before
    reply = attack(jobd, packed({"type": "start", "argv": [b"true"], "limits": limits}))
    refused(reply, fragment)
    with RawTLS.to(jobd) as conn:
        conn.hello()
        assert conn.send(p.encode_frame(p.Start((b"true",))))
        after = conn.next_message(10)
        assert isinstance(after, p.Started), after
    assert after.status.id == before.status.id + 1
    assert "connection-failed" not in jobd.log_text()
    bystander.check()


def test_decode_amplification_is_refused_cheaply(jobd: JobdProcess,
                                                 bystander: Bystander) -> None:
    """The 1 MiB frame of a million empty arrays, from 16 connections at once (and
    before the hello, where a certificate without a role can send it): each is refused
    from the array's header, and the bystander is served throughout."""
    replies: list[Reply] = []
    errors: list[BaseException] = []

    def one(hello: bool) -> None:
        try:
            replies.append(attack(jobd, AMPLIFIER, hello=hello))
        except BaseException as exc:  # reported below
            errors.append(exc)

    threads = [threading.Thread(target=one, args=(i % 2 == 0,)) for i in range(16)]
    for thread in threads:
        thread.start()
    bystander.check()
    for thread in threads:
        thread.join(60)
    assert not errors, errors
    assert len(replies) == 16
    for reply in replies:
        refused(reply, "array of 1048551 elements")
    bystander.check()


def test_refused_starts_are_logged_with_who_asked(jobd: JobdProcess,
                                                  bystander: Bystander) -> None:
    """Every refused start is an event naming the identity, role and reason."""
    refused(attack(jobd, packed({"type": "start", "argv": [b"true"],
                                 "limits": {"cpus": float("inf")}})))
    jobd.wait_for_log(r"start-refused .*who=alice role=control code=bad_request "
                      r".*reason=.*cpus")
    result = jobd.jobctl("alice", "start", "--cpus", "0.001", "true")
    assert result.returncode != 0
    jobd.wait_for_log(r"start-refused .*who=alice role=control code=limit_exceeded "
                      r".*reason=.*below the kernel")
    result = jobd.jobctl("bob", "start", "--io-read-bps", "/dev/nonexistent=1M", "true")
    assert result.returncode != 0
    jobd.wait_for_log(r"start-refused .*who=bob role=control .*nonexistent")
    result = jobd.jobctl("olga", "start", "true")
    assert result.returncode != 0
    jobd.wait_for_log(r"start-refused .*who=olga role=observe code=permission_denied")
    bystander.check()


def test_control_characters_are_escaped_in_the_text_log(jobd: JobdProcess,
                                                        bystander: Bystander,
                                                        tmp_path: Path) -> None:
    """A command whose name holds terminal escapes, CR, DEL and C1 controls (and no
    space, which used to be the only thing that made the log quote a value) reaches
    the text event log escaped: one line, no control character in it."""
    name = "\x1b]0;PWNED\x07\x1b[2J\x1b[1;1H\rforged-row\x7f\x9b31m"
    command = tmp_path / name
    command.symlink_to("/bin/true")
    with RawTLS.to(jobd) as conn:
        conn.hello()
        assert conn.send(p.encode_frame(p.Start((os.fsencode(command),))))
        started = conn.next_message(10)
        assert isinstance(started, p.Started), started
    line = jobd.wait_for_log(rf"job-started id={started.status.id} ")
    assert "PWNED" in line and "forged-row" in line
    assert not any(ord(c) < 0x20 or 0x7F <= ord(c) <= 0x9F for c in line), repr(line)
    bystander.check()


# -- across a restart --------------------------------------------------------------


def test_poison_start_then_restart_list_works_for_everyone(pki: Pki, tmp_path: Path) -> None:
    """Issue 13 item 1 as reported: a start with a ~1 MiB cwd, then ``list`` by every
    role, before and after a restart of jobd on the same state directory."""
    state = tmp_path / "state"
    server = start_jobd(pki, state)
    try:
        cwd = b"/" + b"d" * ((1 << 20) - 300)
        with RawTLS(server.address, server.port, client_context(pki)) as conn:
            conn.hello()
            assert conn.send(packed({"type": "start", "argv": [b"true"], "cwd": cwd}))
            reply = conn.read_until_closed()
        assert [type(m) for m in reply.messages] == [p.Error], reply.messages
        for who in ("root", "olga", "alice"):
            listing(server, who)
    finally:
        assert server.stop() == 0
    server = start_jobd(pki, state)
    try:
        for who in ("root", "olga", "alice"):
            listing(server, who)
    finally:
        assert server.stop() == 0


# -- a poison record left by an older jobd -------------------------------------------


def test_legacy_status_too_large_for_a_frame(pki: Pki, tmp_path: Path) -> None:
    """A record an older jobd could write (half a million empty arguments, an error
    echoing a 1 MiB cwd) loads after a restart: ``list`` still works for every role (the
    entry is shortened to fit), and a request whose answer cannot be encoded gets an
    ``internal`` error frame instead of a dropped connection."""
    state = tmp_path / "state"
    poison = p.JobStatus(id=1, owner="alice", argv=(b"true",) + (b"",) * 600_000,
                         state=p.JobState.ERROR, error="cannot change to directory /"
                         + "d" * (1 << 20), created=1.0, ended=1.0)
    # A record file of an older jobd (imported into jobs.db at the start below).
    with Store.open(state) as store:
        store.write(Record(poison, log_size=0))
    server = start_jobd(pki, state)
    try:
        ok = server.jobctl("alice", "start", "true")
        assert ok.returncode == 0, ok
        for who in ("root", "olga", "alice"):
            jobs = listing(server, who)
            assert [j["id"] for j in jobs][:1] == [1], jobs
            assert len(str(jobs[0]["status"])) < 4096
        with RawTLS(server.address, server.port, client_context(pki)) as conn:
            conn.hello()
            assert conn.send(p.encode_frame(p.GetStatus(1)))
            answer = conn.next_message(10)
            assert isinstance(answer, p.Error), answer
            assert answer.code is p.ErrorCode.INTERNAL
            # the connection goes on
            assert conn.send(p.encode_frame(p.ListJobs()))
            assert isinstance(conn.next_message(10), p.JobList)
        server.wait_for_log(r"response-failed .*who=alice")
    finally:
        assert server.stop() == 0


def test_frame_of_unknown_containers_is_bounded(jobd: JobdProcess,
                                                bystander: Bystander) -> None:
    """Many small arrays instead of one large one: the number of arrays and maps in one
    request is capped too, so nesting cannot sidestep the per-array limit."""
    body = {"type": "status", "job": 1, "x": [[[]] * 4000] * 60}
    refused(attack(jobd, packed(body)), "arrays, maps and elements")
    bystander.check()



@pytest.mark.parametrize(("args", "fragment"), [
    (["--cpus", "inf"], "argument --cpus: must be a finite positive number: 'inf'"),
    (["--cpus", "nan"], "argument --cpus: must be a finite positive number: 'nan'"),
    ([f"--io-read-bps=/dev/d{i}=1M" for i in range(17)], "17 entries, more than 16"),
    (["--memory", str(2**64)], "argument --memory: must be at most"),
])
def test_cli_refuses_out_of_range_limits_locally(jobd: JobdProcess, args: list[str],
                                                 fragment: str) -> None:
    """The CLI builds the same validated request: a clear one-line error, exit 2."""
    result = jobd.jobctl("alice", "start", *args, "true")
    err = result.stderr.decode()
    assert result.returncode == 2, result
    assert fragment in err and err.count("\n") == 1 and "Traceback" not in err, err


def _peak_rss(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise AssertionError(f"no VmHWM for pid {pid}")


def test_amplification_frame_costs_what_garbage_costs(pki: Pki, tmp_path: Path) -> None:
    """Peak memory, not just what stays: a 1 MiB frame of a million empty arrays used
    to peak at ~85 MB while it decoded (and was freed again). Now its peak is that of
    any 1 MiB frame being buffered. The peak is reset through /proc/PID/clear_refs."""
    server = start_jobd(pki, tmp_path / "state")
    try:
        clear_refs = Path(f"/proc/{server.proc.pid}/clear_refs")
        garbage = frame(b"\xc1" * (p.MAX_FRAME_SIZE - 64))
        attack(server, garbage)  # warm up: the receive buffer of a whole frame
        try:
            clear_refs.write_text("5")  # reset VmHWM to the current RSS
        except OSError as exc:
            pytest.skip(f"cannot reset the peak RSS of jobd: {exc}")
        before = _peak_rss(server.proc.pid)
        replies = [attack(server, AMPLIFIER) for _ in range(3)]
        grown = _peak_rss(server.proc.pid) - before
        assert grown < 24 * 2**20, f"peak RSS grew by {grown / 2**20:.1f} MiB"
        for reply in replies:
            refused(reply, "an array of 1048551 elements")
    finally:
        assert server.stop() == 0
