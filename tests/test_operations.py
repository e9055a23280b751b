"""Operations: systemd readiness, SIGHUP reload of certificates and CRL."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
from pathlib import Path

from cryptography import x509

from .conftest import JOBCTL, JOBD, RUN_CWD, Pki, crl_pem, start_jobd


def write_crl(pki: Pki, path: Path, revoked: list[str]) -> None:
    """A CRL signed by the test CA, revoking the named clients' certificates."""
    serials = [x509.load_pem_x509_certificate(Path(pki.path(f"{who}.pem")).read_bytes())
               .serial_number for who in revoked]
    tmp = path.with_suffix(".tmp")
    tmp.write_bytes(crl_pem(pki.ca, serials))
    tmp.replace(path)


def test_sighup_reloads_crl_without_touching_jobs(pki: Pki, tmp_path: Path) -> None:
    crl = tmp_path / "crl.pem"
    write_crl(pki, crl, [])
    server = start_jobd(pki, tmp_path / "state", "--crl", str(crl))
    try:
        assert server.jobctl("bob", "list").returncode == 0
        job = int(server.jobctl("alice", "start", "sh", "-c",
                                "echo before; exec sleep 1000").stdout)
        cmd = [*JOBCTL, *pki.client_args("alice"), "-a", server.address,
               "-p", str(server.port), "stream", str(job)]
        with subprocess.Popen(cmd, stdout=subprocess.PIPE, cwd=RUN_CWD) as streamer:
            assert streamer.stdout is not None
            assert streamer.stdout.readline() == b"before\n"
            write_crl(pki, crl, ["bob"])
            server.proc.send_signal(signal.SIGHUP)
            server.wait_for_log(r"info reloaded ")
            refused = server.jobctl("bob", "list")
            assert refused.returncode == 3, refused.stderr
            assert refused.stderr.startswith(b"server refused the connection: TLS alert: ")
            server.wait_for_log(r"connection-refused .*reason=.*revoked")
            assert server.jobctl("alice", "status", str(job)).stdout == b"running\n"
            # a broken CRL is refused and the old files stay in use
            crl.write_text("not a CRL\n")
            server.proc.send_signal(signal.SIGHUP)
            server.wait_for_log(r"error reload-failed .*cannot load CRL")
            assert server.jobctl("alice", "list").returncode == 0
            assert server.jobctl("bob", "list").returncode == 3
            # the stream opened before the reloads is still live
            assert server.jobctl("alice", "stop", str(job)).returncode == 0
            out, _ = streamer.communicate(timeout=30)
            assert out == b""
            assert streamer.returncode == 0
    finally:
        assert server.stop() == 0


def test_systemd_notify_and_job_environment(pki: Pki, tmp_path: Path) -> None:
    path = str(tmp_path / "notify.sock")
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind(path)
        sock.settimeout(20)
        env = dict(os.environ, NOTIFY_SOCKET=path)
        server = start_jobd(pki, tmp_path / "state", env=env)
        try:
            ready = sock.recv(4096).decode()
            assert ready == f"READY=1\nSTATUS=listening on port {server.port}"
            job = server.jobctl("alice", "start", "sh", "-c", 'echo "${NOTIFY_SOCKET-unset}"')
            assert server.jobctl("alice", "stream", job.stdout.decode().strip()).stdout \
                == b"unset\n"
            server.proc.send_signal(signal.SIGHUP)
            reloading = sock.recv(4096).decode()
            assert reloading.startswith("RELOADING=1\nMONOTONIC_USEC=")
            assert sock.recv(4096).decode().startswith("READY=1")
            server.proc.send_signal(signal.SIGTERM)
            assert sock.recv(4096).decode() == "STOPPING=1"
            assert server.proc.wait(30) == 0
        finally:
            server.stop()


def test_bad_configuration_is_one_line(pki: Pki, tmp_path: Path) -> None:
    cmd = [*JOBD, "-c", pki.path("server.pem"), "-k", str(tmp_path / "nokey"),
           "-C", pki.path("ca.pem"), "-p", "0", "--state-dir", str(tmp_path / "s")]
    result = subprocess.run(cmd, capture_output=True, timeout=30, cwd=RUN_CWD)
    assert result.returncode == 1
    lines = result.stderr.decode().splitlines()
    assert len(lines) == 1 and "startup-failed" in lines[0] and "nokey" in lines[0], lines
    busy = start_jobd(pki, tmp_path / "state")
    try:
        cmd = [*JOBD, "-c", pki.path("server.pem"), "-k",
               pki.path("server.key"), "-C", pki.path("ca.pem"), "-a", "127.0.0.1",
               "-p", str(busy.port), "--state-dir", str(tmp_path / "other")]
        result = subprocess.run(cmd, capture_output=True, timeout=30, cwd=RUN_CWD)
        assert result.returncode == 1
        lines = result.stderr.decode().splitlines()
        assert len(lines) == 1 and "address already in use" in lines[0], lines
    finally:
        assert busy.stop() == 0
