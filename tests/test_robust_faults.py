"""Faults: jobd killed with SIGKILL mid-job, a full disk, SIGTERM with jobs and streams.

Each test runs real jobd processes on a real state directory (a small tmpfs
for the full disk, mounted and unmounted here: the tests run as root, as CI
does) and checks that nothing already kept is lost, that jobd keeps serving,
and that every process it started is accounted for.
"""

from __future__ import annotations

import contextlib
import os
import select
import signal
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import jobctl
import protocol as p

from .conftest import JOBCTL, RUN_CWD, JobdProcess, Pki, start_jobd

LOST = "error: lost: jobd stopped while the job ran"


def client(jobd: JobdProcess, who: str = "alice") -> jobctl.BlockingClient:
    return jobctl.connect_blocking(jobd.address, jobd.port, server_name="localhost",
                                   **jobd.pki.files(who))


def output_of(c: jobctl.BlockingClient, job: int) -> tuple[bytes, bytes, p.End]:
    out = {1: bytearray(), 2: bytearray()}
    end = None
    for event in c.output(job):
        if isinstance(event, p.OutputChunk):
            out[event.fd] += event.data
        else:
            end = event
    assert end is not None
    return bytes(out[1]), bytes(out[2]), end


def proc_start(pid: int) -> int:
    """Start time (clock ticks since boot) of a live process."""
    raw = Path(f"/proc/{pid}/stat").read_bytes()
    return int(raw[raw.rfind(b")") + 2:].split()[19])


def gone(pid: int, start: int) -> bool:
    """The process that had this pid and start time has exited (a zombie counts)."""
    try:
        raw = Path(f"/proc/{pid}/stat").read_bytes()
    except FileNotFoundError:
        return True
    fields = raw[raw.rfind(b")") + 2:].split()
    return fields[0] in (b"Z", b"X") or int(fields[19]) != start


def kill_if_alive(pid: int, start: int) -> None:
    if not gone(pid, start):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


# -- kill -9 --------------------------------------------------------------------------

TALKER = """
import itertools, sys, time
try:
    for i in itertools.count():
        sys.stdout.write(f"{i}\\n")
        if i % 512 == 0:
            sys.stdout.flush()
except BrokenPipeError:  # jobd is gone: stay alive, so that the restart must kill us
    sys.stderr = None
    time.sleep(1000)
"""


def test_kill_9_mid_job_then_restart(pki: Pki, tmp_path: Path) -> None:
    state = tmp_path / "state"
    server = start_jobd(pki, state)
    tracked: list[tuple[int, int]] = []
    try:
        with client(server) as c:
            done = c.start(["sh", "-c", "printf done-out; printf done-err >&2; exit 3"]).id
            for _ in c.stream(done):
                pass
            kept = output_of(c, done)
            assert kept[:2] == (b"done-out", b"done-err")
            sleeper = c.start(["sleep", "1000"])
            family = c.start(["sh", "-c", "trap '' INT TERM; sleep 1000 & echo $!; wait"])
            talker = c.start(["python3", "-c", TALKER])
            # the family's child pid, and the talker well into its output
            child = int(next(e.data for e in c.stream(family.id)
                             if isinstance(e, p.OutputChunk)))
            with client(server) as watcher:
                seen = 0
                for event in watcher.stream(talker.id):
                    assert isinstance(event, p.OutputChunk)
                    seen += len(event.data)
                    if seen >= 1 << 20:
                        break
        for pid in (sleeper.pid, family.pid, child, talker.pid):
            assert pid is not None
            tracked.append((pid, proc_start(pid)))
        server.proc.kill()
        assert server.proc.wait(10) == -signal.SIGKILL
        # the jobs outlived jobd (the talker only stopped writing)
        assert not any(gone(pid, start) for pid, start in tracked)

        server = start_jobd(pki, state)
        # ready: the lost jobs' processes were killed before jobd listened
        assert [pid for pid, start in tracked if not gone(pid, start)] == []
        with client(server) as c:
            assert c.status(done).describe() == "exited: 3"
            assert output_of(c, done)[:2] == kept[:2]
            for job in (sleeper.id, family.id, talker.id):
                status = c.status(job)
                assert status.describe() == LOST, status
                assert status.ended is not None and status.pid is not None
            # the talker's output survived up to the kill: whole records, in order
            out, _err, end = output_of(c, talker.id)
            assert len(out) >= 1 << 20
            assert end.status.output_bytes == len(out)
            lines = out.split(b"\n")
            assert lines[-1] == b"" or lines[-1].isdigit()  # a record may end mid-line
            whole = lines[:-1]
            assert whole == [str(i).encode() for i in range(len(whole))]
            # a stream of a lost job ends at once, with the recovered output
            streamed = b"".join(e.data for e in c.stream(talker.id)
                                if isinstance(e, p.OutputChunk))
            assert streamed == out
            # new IDs continue after the old ones
            assert c.start(["true"]).id == talker.id + 1
        server.wait_for_log(rf"job-lost id={talker.id} ")
    finally:
        for pid, start in tracked:
            kill_if_alive(pid, start)
        server.stop()


# -- a full disk ------------------------------------------------------------------------


@contextlib.contextmanager
def small_tmpfs(where: Path, size: str = "2m") -> Iterator[Path]:
    where.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size},mode=0700", "tmpfs",
                    str(where)], check=True)
    try:
        yield where
    finally:
        if subprocess.run(["umount", str(where)]).returncode != 0:
            subprocess.run(["umount", "-l", str(where)], check=True)


def fill(path: Path) -> int:
    """Write zeros to *path* until the file system is full; the bytes written."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    written = 0
    block = b"\0" * 4096
    try:
        while True:
            written += os.write(fd, block)
    except OSError as exc:
        assert exc.errno == 28, exc  # ENOSPC
    finally:
        os.close(fd)
    return written


WRITER = """
import sys
for i in range(64):
    sys.stdout.buffer.write(bytes([65 + i % 26]) * 65536)
    sys.stdout.buffer.flush()
print("finished", file=sys.stderr)
"""
WRITER_BYTES = 64 * 65536 + len("finished\n")


def test_a_full_disk_drops_output_but_nothing_else(pki: Pki, tmp_path: Path) -> None:
    """State on a 2 MiB tmpfs: a job writing 4 MiB runs to its end with the excess counted
    and reported; jobd keeps serving on a disk that is completely full; once space returns,
    output is kept again."""
    with small_tmpfs(tmp_path / "small") as disk:
        server = start_jobd(pki, disk / "state")
        try:
            big = server.jobctl("alice", "start", "python3", "-c", WRITER)
            assert big.returncode == 0, big
            job = int(big.stdout)
            # The stream ends, with the job's end on disk: the logs stopped short of the
            # space they leave to the job database (else the end could not be written
            # and would not be shown until space came back).
            streamed = server.jobctl("alice", "stream", str(job))
            assert streamed.returncode == 0, streamed
            server.wait_for_log(r"the file system is nearly full \(the logs leave \d+ bytes "
                                r"free for the job database\); dropping further output")
            with client(server) as c:
                status = c.status(job)
                assert status.describe() == "exited: 0"
                assert status.dropped_bytes > 0
                assert status.output_bytes + status.dropped_bytes == WRITER_BYTES
                notice = (f"jobctl: output truncated: {status.dropped_bytes} bytes dropped "
                          "by the server\n").encode()
                assert streamed.stderr.endswith(notice)
                job_stderr = streamed.stderr[:-len(notice)]
                assert len(streamed.stdout) + len(job_stderr) == status.output_bytes
                assert status.output_bytes < 2 << 20
                # what was kept is a prefix of what was written
                assert streamed.stdout == b"".join(bytes([65 + i % 26]) * 65536
                                                   for i in range(64))[:len(streamed.stdout)]
                # now completely full: jobd still serves status and list, and refuses
                # a start whose record it cannot commit (never acknowledged from memory)
                fill(disk / "filler")
                assert c.status(job).describe() == "exited: 0"
                assert [s.id for s in c.list()] == [job]
                refused = server.jobctl("alice", "start", "sh", "-c", "echo hello")
                assert (refused.returncode, refused.stdout) == (1, b""), refused
                assert refused.stderr == (b"job not started: its record cannot be "
                                          b"written: job database: database or disk is full\n")
                assert [s.id for s in c.list()] == [job]
                server.wait_for_log(r"job \d+ refused: its record cannot be written")
                # space returns: new jobs' output is kept again. (The filler alone
                # may be a few KiB, which the job database's WAL can take first when
                # it writes the records it kept in memory: delete the big job too.)
                (disk / "filler").unlink()
                c.delete(job)
                again = c.start(["sh", "-c", "echo hello; echo there >&2"]).id
                out, err, end = [], [], None
                for event in c.stream(again):
                    if isinstance(event, p.OutputChunk):
                        (out if event.fd == 1 else err).append(event.data)
                    else:
                        end = event
                assert (b"".join(out), b"".join(err)) == (b"hello\n", b"there\n")
                assert end is not None and end.status.dropped_bytes == 0
                assert [s.id for s in c.list()] == [again]
        finally:
            assert server.stop() == 0


def test_delete_on_a_full_disk_frees_space(pki: Pki, tmp_path: Path) -> None:
    """On a completely full disk, deleting the newest job (which must also record the ID
    high-water mark) still succeeds and frees the space. (It used to fail with "cannot
    delete job 1: [Errno 28] No space left on device".)"""
    with small_tmpfs(tmp_path / "small") as disk:
        server = start_jobd(pki, disk / "state")
        try:
            with client(server) as c:
                job = c.start(["head", "-c", "4000000", "/dev/zero"]).id
                for _ in c.stream(job):
                    pass
                fill(disk / "filler")
                c.delete(job)
                assert c.list() == []
                assert os.statvfs(disk).f_bfree > 0
        finally:
            assert server.stop() == 0


def test_a_delete_that_cannot_be_written_is_refused(pki: Pki, tmp_path: Path) -> None:
    """A job without output frees nothing when deleted: on a full disk its deletion
    cannot be committed and is refused with the reason, and the job stays. (It used to
    be acknowledged, and the record stayed for ever.)"""
    with small_tmpfs(tmp_path / "small") as disk:
        server = start_jobd(pki, disk / "state")
        try:
            with client(server) as c:
                job = c.start(["true"]).id
                assert c.wait(job).describe() == "exited: 0"
                fill(disk / "filler")
                refused = server.jobctl("alice", "delete", str(job))
                assert refused.returncode == 1, refused
                assert refused.stderr.startswith(
                    f"cannot delete job {job}: job database: database or disk is "
                    "full".encode()), refused
                assert [s.id for s in c.list()] == [job]
                (disk / "filler").unlink()
                c.delete(job)
                assert c.list() == []
        finally:
            assert server.stop() == 0
        server = start_jobd(pki, disk / "state")
        try:
            with client(server) as c:
                assert c.list() == []
        finally:
            assert server.stop() == 0


def test_a_job_ending_on_a_full_disk_is_shown_ended_once_its_end_is_written(
        pki: Pki, tmp_path: Path) -> None:
    """A job that ends while the disk is full (its final record cannot be written then)
    shows running until space returns, then its real end, also after a restart. (Its
    end used to be shown from memory, and a crash then lost what a client had seen.)"""
    trigger = tmp_path / "go"
    with small_tmpfs(tmp_path / "small") as disk:
        server = start_jobd(pki, disk / "state")
        try:
            with client(server) as c:
                job = c.start(["sh", "-c", f'echo a; while [ ! -e "{trigger}" ]; do '
                               "sleep 0.05; done; echo b"]).id
                fill(disk / "filler")
                trigger.touch()
                server.wait_for_log(rf"cannot write the record of job {job}: .*disk is full")
                assert c.status(job).describe() == "running"
                stopped = server.jobctl("alice", "stop", str(job))
                assert stopped.returncode == 1
                assert b"its end cannot be recorded yet" in stopped.stderr
                (disk / "filler").unlink()  # space returns: jobd writes the end
                for _ in c.stream(job):
                    pass
                assert c.status(job).describe() == "exited: 0"
        finally:
            assert server.stop() == 0
        server = start_jobd(pki, disk / "state")
        try:
            with client(server) as c:
                assert c.status(job).describe() == "exited: 0"
        finally:
            assert server.stop() == 0


# -- SIGTERM with jobs and streams ---------------------------------------------------------


class Streamer:
    """``jobctl stream ID`` in a child process, its output read as it comes."""

    def __init__(self, jobd: JobdProcess, job: int, who: str = "alice") -> None:
        cmd = [*JOBCTL, *jobd.pki.client_args(who), "-a", jobd.address,
               "-p", str(jobd.port), "stream", str(job)]
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                     stdin=subprocess.DEVNULL, cwd=RUN_CWD)
        self.out = bytearray()
        self.err = bytearray()
        self._cond = threading.Condition()
        self._threads = [threading.Thread(target=self._read, args=(f, buf), daemon=True)
                         for f, buf in ((self.proc.stdout, self.out),
                                        (self.proc.stderr, self.err))]
        for t in self._threads:
            t.start()

    def _read(self, f: object, buf: bytearray) -> None:
        fd = f.fileno()  # type: ignore[attr-defined]
        while True:
            ready, _, _ = select.select([fd], [], [], 60)
            data = os.read(fd, 1 << 16) if ready else b""
            with self._cond:
                buf += data
                self._cond.notify_all()
            if not data:
                return

    def wait_for(self, marker: bytes, timeout: float = 10) -> None:
        deadline = time.monotonic() + timeout
        with self._cond:
            while marker not in self.out:
                remaining = deadline - time.monotonic()
                assert remaining > 0, f"no {marker!r} in {bytes(self.out[-200:])!r}"
                self._cond.wait(remaining)

    def finish(self, timeout: float = 30) -> int:
        code = self.proc.wait(timeout)
        for t in self._threads:
            t.join(timeout)
        return code

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        for f in (self.proc.stdout, self.proc.stderr):
            if f is not None:
                f.close()


JOBS = {
    # exits on SIGINT (the first step)
    "plain": "echo plain-ready; exec sleep 1000",
    # ignores SIGINT and SIGTERM: only the last step, SIGKILL, ends it
    "stubborn": "trap '' INT TERM; echo stubborn-ready; while :; do sleep 0.1; done",
    # says something on SIGINT: the stream must still carry it
    "polite": "trap 'echo polite-bye; exit 5' INT; echo polite-ready; "
              "while :; do sleep 0.1; done",
    # in the middle of output when the signal comes
    "noisy": "echo noisy-ready; i=0; while :; do echo $i; i=$((i+1)); done",
}


def test_sigterm_with_running_jobs_and_open_streams(pki: Pki, tmp_path: Path) -> None:
    state = tmp_path / "state"
    server = start_jobd(pki, state)  # --stop-grace 0.5
    streamers: list[tuple[str, Streamer]] = []
    tracked: list[tuple[int, int]] = []
    try:
        ids: dict[str, int] = {}
        with client(server) as c:
            for name, script in JOBS.items():
                status = c.start(["sh", "-c", script])
                ids[name] = status.id
                assert status.pid is not None
                tracked.append((status.pid, proc_start(status.pid)))
        for name in JOBS:
            streamers.append((name, Streamer(server, ids[name])))
        streamers.append(("polite", Streamer(server, ids["polite"], who="root")))
        for name, streamer in streamers:
            streamer.wait_for(f"{name}-ready\n".encode())
        server.proc.send_signal(signal.SIGTERM)
        assert server.proc.wait(30) == 0
        # SIGINT, 0.5 s, SIGTERM, 0.5 s, SIGKILL for the stubborn job, then every
        # stream flushed its end frame: jobd did not have to cut any off.
        assert "shutdown-flush-timeout" not in server.log_text()
        for name, streamer in streamers:
            assert streamer.finish() == 0, (name, bytes(streamer.err))
        server.wait_for_log(r"info stopped")
        assert all(gone(pid, start) for pid, start in tracked)
    finally:
        for _, streamer in streamers:
            streamer.kill()
        for pid, start in tracked:
            kill_if_alive(pid, start)
        server.stop()
    # everything each stream printed is exactly the job's output, kept across the restart
    server = start_jobd(pki, state)
    try:
        with client(server) as c:
            for name, streamer in streamers:
                out, err, end = output_of(c, ids[name])
                assert end.status.describe() == "stopped", (name, end.status)
                assert bytes(streamer.out) == out, name
                assert bytes(streamer.err) == err, name
            assert output_of(c, ids["polite"])[0] == b"polite-ready\npolite-bye\n"
            noisy = output_of(c, ids["noisy"])[0].split(b"\n")
            assert noisy[0] == b"noisy-ready" and len(noisy) > 2
            assert noisy[1:-1] == [str(i).encode() for i in range(len(noisy) - 2)]
            assert c.start(["true"]).id == max(ids.values()) + 1
    finally:
        assert server.stop() == 0
