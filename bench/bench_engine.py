"""Job engine benchmarks (plain script): ``.venv/bin/python bench/bench_engine.py``.

1. write: appending a 64 KiB record (header + data, one pwritev) 16,384 times
   (1 GiB), in the event loop versus through ``trio.to_thread.run_sync``: time
   per append and how long the event loop is blocked.
2. stream: a job writing 1 GiB (``head -c 1073741824 /dev/zero``) followed live
   by one follower in the same process: MB/s from start to the follower's end,
   CPU of the event loop's thread and of the process, the loop's worst lag,
   the process's RSS (VmRSS/VmHWM) before/after.
3. idle: 1,000 running ``sleep`` jobs: RSS per job.

Options: ``--dir DIR`` (scratch directory, default: a new one under /tmp),
``--only write|stream|idle`` (repeatable), ``--jobs N`` for the idle part,
``--write-gib N`` for longer write runs.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import platform
import shutil
import sys
import tempfile
import time
from collections.abc import AsyncIterator
from pathlib import Path

import trio

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from jobd.engine import EngineConfig, OutputChunk, open_job_manager
from jobd.engine._outputlog import encode_header

GIB = 1 << 30
RECORD = 64 * 1024


def memory() -> dict[str, int]:
    """VmRSS and VmHWM of this process, in KiB."""
    out = {}
    for line in Path("/proc/self/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            out[key] = int(value.split()[0])
    return out


def machine() -> str:
    model = "?"
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            model = line.split(":", 1)[1].strip()
            break
    return (f"nproc {os.cpu_count()}, {model}, Linux {platform.release()}, "
            f"Python {platform.python_version()}, trio {trio.__version__}")


def percentiles(values: list[float]) -> str:
    values = sorted(values)

    def at(q: float) -> float:
        return values[min(len(values) - 1, int(len(values) * q))] * 1e6

    return (f"p50 {at(0.5):7.1f} us  p99 {at(0.99):7.1f} us  p99.9 {at(0.999):8.1f} us  "
            f"max {values[-1] * 1e3:6.2f} ms")


async def bench_write(scratch: Path, gib: int) -> None:
    payload = os.urandom(RECORD)
    count = gib * GIB // RECORD
    path = scratch / "write.log"
    for mode in ("loop", "thread", "loop", "thread"):
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        lat: list[float] = []
        offset = 0
        begin = time.perf_counter()
        for _ in range(count):
            iov = [encode_header(1, RECORD, time.time_ns(), offset), payload]
            t = time.perf_counter()
            if mode == "loop":
                os.pwritev(fd, iov, offset)
            else:
                await trio.to_thread.run_sync(os.pwritev, fd, iov, offset)
            lat.append(time.perf_counter() - t)
            offset += len(iov[0]) + RECORD
        total = time.perf_counter() - begin
        os.close(fd)
        blocked = "= loop blocked" if mode == "loop" else "(loop free)"
        print(f"  {mode:6}: {count * RECORD / total / 1e6:6.0f} MB/s; per append "
              f"{percentiles(lat)} {blocked}")
    path.unlink()


async def lag_monitor(worst: list[float]) -> None:
    """The event loop's worst scheduling delay for a 1 ms sleep."""
    while True:
        t = trio.current_time()
        await trio.sleep(0.001)
        worst[0] = max(worst[0], trio.current_time() - t - 0.001)


async def bench_stream(scratch: Path) -> None:
    state = scratch / "stream-state"
    before = memory()
    async with open_job_manager(EngineConfig(state)) as manager:
        worst = [0.0]
        async with trio.open_nursery() as nursery:
            nursery.start_soon(lag_monitor, worst)
            begin = time.perf_counter()
            cpu = time.thread_time(), time.process_time()
            status = await manager.start([b"head", b"-c", str(GIB).encode(), b"/dev/zero"],
                                         "bench")
            received = chunks = 0
            follower: AsyncIterator[OutputChunk] = manager.follow_output(status.id)
            async with contextlib.aclosing(follower):  # type: ignore[type-var]
                async for chunk in follower:
                    received += len(chunk.data)
                    chunks += 1
            elapsed = time.perf_counter() - begin
            loop_cpu, all_cpu = time.thread_time() - cpu[0], time.process_time() - cpu[1]
            nursery.cancel_scope.cancel()
        final = await manager.wait(status.id)
        after = memory()
    assert received == GIB == final.output_bytes, (received, final)
    print(f"  1 GiB job + 1 live follower: {GIB / elapsed / 1e6:.0f} MB/s "
          f"({elapsed:.2f} s, {chunks} chunks of {received / chunks / 1024:.0f} KiB on average)")
    print(f"  CPU: event loop thread {loop_cpu:.2f} s, whole process {all_cpu:.2f} s; "
          f"event loop worst lag {worst[0] * 1e3:.1f} ms")
    print(f"  RSS before {before['VmRSS'] / 1024:.1f} MiB, after {after['VmRSS'] / 1024:.1f} MiB, "
          f"peak (VmHWM) {after['VmHWM'] / 1024:.1f} MiB")
    shutil.rmtree(state)


async def bench_idle(scratch: Path, jobs: int) -> None:
    state = scratch / "idle-state"
    async with open_job_manager(EngineConfig(state, stop_grace=1.0)) as manager:
        for _ in range(5):  # warm up allocator and thread cache
            await manager.start([b"true"], "bench")
        before = memory()["VmRSS"]
        begin = time.perf_counter()
        for _ in range(jobs):
            await manager.start([b"sleep", b"1000"], "bench")
        started = time.perf_counter() - begin
        after = memory()["VmRSS"]
        begin = time.perf_counter()
        await manager.shutdown()
        stopped = time.perf_counter() - begin
    print(f"  {jobs} running sleep jobs: RSS +{(after - before) / 1024:.1f} MiB = "
          f"{(after - before) / jobs:.1f} KiB per job; started at {jobs / started:.0f}/s, "
          f"all stopped in {stopped:.2f} s")
    shutil.rmtree(state)


async def main(args: argparse.Namespace) -> None:
    scratch = Path(args.dir) if args.dir else Path(tempfile.mkdtemp(prefix="bench-engine-"))
    scratch.mkdir(parents=True, exist_ok=True)
    only = set(args.only or ("write", "stream", "idle"))
    print(f"machine: {machine()}")
    print(f"scratch: {scratch}")
    try:
        if "write" in only:
            print(f"write: append a 64 KiB record {args.write_gib * 16384} times "
                  f"({args.write_gib} GiB)")
            await bench_write(scratch, args.write_gib)
        if "stream" in only:
            print("stream:")
            await bench_stream(scratch)
        if "idle" in only:
            print("idle:")
            await bench_idle(scratch, args.jobs)
    finally:
        if not args.dir:
            shutil.rmtree(scratch, ignore_errors=True)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dir", help="scratch directory (default: a new one under /tmp)")
    parser.add_argument("--only", action="append", choices=("write", "stream", "idle"))
    parser.add_argument("--jobs", type=int, default=1000)
    parser.add_argument("--write-gib", type=int, default=1,
                        help="GiB per write run (beyond the dirty limits writeback throttles)")
    trio.run(main, parser.parse_args())
