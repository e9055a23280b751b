"""The client library against an in-process server (``serve`` under nursery.start)."""

from __future__ import annotations

import contextlib
import hashlib
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import trio

import jobctl
import protocol as p
from jobd import Server, ServerConfig, serve
from jobd._log import EventLog

from .conftest import Pki


@contextlib.asynccontextmanager
async def running_server(pki: Pki, state_dir: Path, **overrides: object
                         ) -> AsyncIterator[Server]:
    config = ServerConfig(certificate=Path(pki.path("server.pem")),
                          key=Path(pki.path("server.key")), ca=Path(pki.path("ca.pem")),
                          address="127.0.0.1", port=0, state_dir=state_dir, stop_grace=0.5,
                          **overrides)  # type: ignore[arg-type]
    async with trio.open_nursery() as nursery:
        server: Server = await nursery.start(
            lambda task_status: serve(config, log=EventLog(level="error"),
                                      task_status=task_status))
        try:
            yield server
        finally:
            server.request_shutdown()


async def collect(events: AsyncIterator[p.OutputChunk | p.End], fd: int = 1
                  ) -> tuple[bytes, p.End]:
    """The bytes of one stream (stdout by default) and the end event."""
    out = bytearray()
    end = None
    async for event in events:
        if isinstance(event, p.OutputChunk):
            if event.fd == fd:
                out += event.data
        else:
            end = event
    assert end is not None
    return bytes(out), end


async def test_async_client_round_trip(pki: Pki, tmp_path: Path) -> None:
    async with running_server(pki, tmp_path) as server, jobctl.connect(
            "127.0.0.1", server.port, server_name="localhost", **pki.files("alice")) as client:
        assert (client.identity, client.role) == ("alice", "control")
        status = await client.start(["sh", "-c", "echo hi; echo err >&2"])
        assert status.state is p.JobState.RUNNING
        data, end = await collect(client.stream(status.id))
        assert data == b"hi\n"
        assert (await collect(client.output(status.id), fd=2))[0] == b"err\n"
        assert end.status.describe() == "exited: 0"
        assert (await client.status(status.id)).exit_code == 0
        assert [s.id for s in await client.list()] == [status.id]
        sleeper = await client.start([b"sleep", b"1000"])
        stopped = await client.stop(sleeper.id)
        assert stopped.state is p.JobState.STOPPED
        with pytest.raises(jobctl.InvalidState, match="process not running: stopped"):
            await client.stop(sleeper.id)
        await client.delete(sleeper.id)
        with pytest.raises(jobctl.NotFound, match="process not found"):
            await client.status(sleeper.id)


async def test_resume_after_lost_connection(pki: Pki, tmp_path: Path) -> None:
    blob = tmp_path / "blob"
    blob.write_bytes(bytes(range(256)) * 8192)  # 2 MiB: several chunks
    async with running_server(pki, tmp_path / "state") as server:
        connect = {"server_name": "localhost", **pki.files("alice")}
        async with jobctl.connect("127.0.0.1", server.port, **connect) as client:
            job = await client.start(["cat", str(blob)])
            received = bytearray()
            position = 0
            async with contextlib.aclosing(client.stream(job.id)) as events:
                async for event in events:
                    assert isinstance(event, p.OutputChunk)
                    received += event.data
                    position = event.position
                    break  # the connection is dropped mid-stream
        async with jobctl.connect("127.0.0.1", server.port, **connect) as client:
            rest, end = await collect(client.stream(job.id, position))
        assert 0 < len(received) < len(blob.read_bytes())
        whole = bytes(received) + rest
        assert hashlib.sha256(whole).digest() == hashlib.sha256(blob.read_bytes()).digest()
        assert end.status.describe() == "exited: 0"


async def test_blocking_client(pki: Pki, tmp_path: Path) -> None:
    async with running_server(pki, tmp_path) as server:
        def script() -> tuple[bytes, str]:
            with jobctl.connect_blocking("127.0.0.1", server.port, server_name="localhost",
                                         **pki.files("alice")) as client:
                job = client.start(["printf", "%s", "blocking"])
                data = b"".join(e.data for e in client.stream(job.id)
                                if isinstance(e, p.OutputChunk))
                return data, client.status(job.id).describe()

        assert await trio.to_thread.run_sync(script) == (b"blocking", "exited: 0")


async def test_vanished_streamer_leaves_server_serving(pki: Pki, tmp_path: Path) -> None:
    async with running_server(pki, tmp_path) as server:
        connect = {"server_name": "localhost", **pki.files("alice")}
        async with jobctl.connect("127.0.0.1", server.port, **connect) as client:
            job = await client.start(["sleep", "1000"])
        for _ in range(3):
            # stream a silent job, then vanish without a word
            async with jobctl.connect("127.0.0.1", server.port, **connect) as client:
                events = client.stream(job.id)
                with trio.move_on_after(0.2):
                    await events.__anext__()
                await events.aclose()
        async with jobctl.connect("127.0.0.1", server.port, **connect) as client:
            assert (await client.status(job.id)).state is p.JobState.RUNNING
            assert (await client.stop(job.id, grace=0)).state is p.JobState.STOPPED
