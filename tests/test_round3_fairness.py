"""Issue 22 items 9-11: jobs get a minimal environment, never jobd's secrets;
retention takes from the owners over their share first; one user's output does not
slow everyone's requests."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

from .conftest import JOBD, RUN_CWD, Pki, start_jobd


def job_output(server: object, who: str, *argv: str) -> bytes:
    from .conftest import JobdProcess

    assert isinstance(server, JobdProcess)
    started = server.jobctl(who, "run", *argv)
    assert started.returncode == 0, started
    return started.stdout


def test_jobs_never_see_jobds_environment(pki: Pki, tmp_path: Path) -> None:
    """Every job saw jobd's whole environment, e.g. OTEL_EXPORTER_OTLP_HEADERS with a
    bearer token: any user could read it with ``env``."""
    env = {"PATH": os.environ["PATH"], "LANG": "C.UTF-8", "HOME": "/root",
           "OTEL_EXPORTER_OTLP_HEADERS": "authorization=Bearer s3cret",
           "AWS_SECRET_ACCESS_KEY": "s3cret", "SITE": "berlin", "PYTHONPATH":
           os.environ.get("PYTHONPATH", "")}
    server = start_jobd(pki, tmp_path / "state", "--job-env", "SITE",
                        "--job-env", "TZ=UTC", "--job-env", "ABSENT", env=env)
    try:
        lines = set(job_output(server, "alice", "env").decode().splitlines())
        assert lines == {f"PATH={os.environ['PATH']}", "LANG=C.UTF-8", "SITE=berlin",
                         "TZ=UTC"}, lines
        merged = server.jobctl("alice", "run", "--env", "X=1", "env")
        assert merged.returncode == 0, merged
        assert set(merged.stdout.decode().splitlines()) == lines | {"X=1"}
    finally:
        assert server.stop() == 0


def test_job_env_option_is_checked(pki: Pki, tmp_path: Path) -> None:
    for bad, message in (("=x", "not NAME or NAME=VALUE"),
                         ("NOTIFY_SOCKET", "belongs to jobd itself")):
        result = subprocess.run(
            [*JOBD, "-c", pki.path("server.pem"), "-k", pki.path("server.key"), "-C",
             pki.path("ca.pem"), "--state-dir", str(tmp_path / "s"), "--job-env", bad],
            capture_output=True, text=True, timeout=60, cwd=RUN_CWD)
        assert result.returncode == 2, result
        assert message in result.stderr
