"""list: server-side filters (owner, states, since), the total count, resumable pages."""

from __future__ import annotations

import time

import pytest

import jobctl
import protocol as p
from tests.conftest import JobdProcess, Pki


def client(jobd: JobdProcess, pki: Pki, who: str) -> jobctl.BlockingClient:
    return jobctl.connect_blocking(jobd.address, jobd.port, server_name="localhost",
                                   **pki.files(who))


def finish(conn: jobctl.BlockingClient, job_id: int) -> None:
    for _event in conn.stream(job_id):
        pass


def test_filters_and_count_are_answered_by_the_server(jobd: JobdProcess, pki: Pki) -> None:
    with client(jobd, pki, "alice") as alice, client(jobd, pki, "bob") as bob, \
            client(jobd, pki, "root") as root, client(jobd, pki, "olga") as olga:
        a = [alice.start(["true"]).id for _ in range(3)]
        b = [bob.start(["true"]).id for _ in range(2)]
        for job_id in a:
            finish(alice, job_id)
        for job_id in b:
            finish(bob, job_id)
        cut = time.time()
        sleeper = alice.start(["sleep", "1000"]).id
        try:
            assert [s.id for s in root.list(owner="bob")] == b
            assert [s.id for s in olga.list(owner="alice")] == [*a, sleeper]
            assert [s.id for s in root.list(states=[p.JobState.RUNNING])] == [sleeper]
            assert [s.id for s in root.list(
                states=[p.JobState.EXITED], owner="alice")] == a
            assert [s.id for s in root.list(since=cut)] == [sleeper]
            page = root.list_page(count=True)
            assert page.total == 6 and [s.id for s in page.jobs] == [*a, *b, sleeper]
            assert root.list_page(owner="bob", count=True).total == 2
            assert root.list_page(a[0], owner="alice").jobs[0].id == a[1]  # resumable
            # A control user sees only its own jobs, whatever it asks for.
            assert [s.id for s in bob.list()] == b
            assert bob.list(owner="alice") == []
            assert bob.list_page(owner="alice", count=True).total == 0
            assert bob.list_page(count=True).total == 2
        finally:
            alice.stop(sleeper, 0)


def test_bad_filters_are_refused_up_front() -> None:
    with pytest.raises(p.FieldError, match="unknown job state"):
        p.ListJobs.from_wire({"type": "list", "states": ["sleeping"]})
    with pytest.raises(p.FieldError, match="owner longer"):
        p.ListJobs(owner="x" * 5000)
    with pytest.raises(p.FieldError, match="finite"):
        p.ListJobs(since=float("nan"))
    request = p.ListJobs(7, "bob", (p.JobState.RUNNING,), 1.5, True)
    assert p.ListJobs.from_wire(request.to_wire()) == request
    assert p.ListJobs(3).to_wire() == {"type": "list", "after": 3}  # 1.0 servers see the same
    reply = p.JobList((), False, 12)
    assert p.JobList.from_wire(reply.to_wire()) == reply


def test_jobctl_list_filters(jobd: JobdProcess) -> None:
    ids = {}
    for who in ("alice", "bob"):
        ids[who] = jobd.jobctl(who, "start", "true").stdout.decode().strip()
        assert jobd.jobctl(who, "stream", ids[who]).returncode == 0
    sleeper = jobd.jobctl("alice", "start", "sleep", "1000").stdout.decode().strip()
    try:
        def listed(*args: str) -> list[str]:
            result = jobd.jobctl("root", "list", *args)
            assert result.returncode == 0, result.stderr
            return [line.split("\t")[0] for line in result.stdout.decode().splitlines()]

        assert listed("--owner", "bob") == [ids["bob"]]
        assert listed("--state", "running") == [sleeper]
        assert listed("--owner", "alice", "--state", "exited", "--state", "running") == [
            ids["alice"], sleeper]
        assert listed("--since", "1h") == [ids["alice"], ids["bob"], sleeper]
        bad = jobd.jobctl("root", "list", "--state", "sleeping")
        assert bad.returncode == 2 and b"invalid choice" in bad.stderr
    finally:
        assert jobd.jobctl("alice", "stop", "--grace", "0", sleeper).returncode == 0
