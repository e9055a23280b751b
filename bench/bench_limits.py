"""What limits and isolation cost per job start (plain script, as root).

``.venv/bin/python bench/bench_limits.py [--runs N]``

For each variant, N jobs running ``true`` are started one after the other
through the engine (no network). Reported per start, p50 and p90 in ms:

* start: ``JobManager.start`` until it returns (the command has been exec'd:
  for a contained job, the spawn helper's error pipe reached EOF);
* cycle: start until the job has ended, its cgroup was read and removed
  and its record written (``wait``).

Variants: plain (today's direct spawn), a cgroup only (``--pids``), all four
limits, and each namespace. The numbers go into docs/isolation.md.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import trio

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.bench_engine import machine
from jobd.engine import EngineConfig, open_job_manager
from protocol import Limits

M = 1 << 20


def variants(device: str | None) -> list[tuple[str, Limits | None]]:
    io = ((device, 100 * M),) if device else ()
    return [
        ("plain (no limits)", None),
        ("cgroup only (--pids 64)", Limits(pids=64)),
        ("--memory --cpus --pids --io-read-bps", Limits(memory=256 * M, cpus=1.0, pids=64,
                                                        io_read_bps=io)),
        ("--isolate mount", Limits(isolate=("mount",))),
        ("--isolate net", Limits(isolate=("net",))),
        ("--isolate pid", Limits(isolate=("pid",))),
        ("all limits + --isolate pid,mount,net", Limits(memory=256 * M, cpus=1.0, pids=64,
                                                        isolate=("mount", "net", "pid"))),
    ]


def pct(values: list[float], q: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, int(q * len(values)))] * 1000


async def run(runs: int, device: str | None) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        async with open_job_manager(EngineConfig(state_dir=Path(tmp))) as manager:
            print(f"# {machine()}")
            print(f"# cgroups: {manager.cgroup_layout()}")
            print(f"# {runs} starts of `true` per variant; ms per start")
            print(f"{'variant':40} {'start p50':>9} {'p90':>6} {'cycle p50':>9} {'p90':>6}")
            for name, limits in variants(device):
                starts, cycles = [], []
                for _ in range(runs):
                    t0 = time.perf_counter()
                    status = await manager.start([b"true"], "bench", limits=limits)
                    t1 = time.perf_counter()
                    final = await manager.wait(status.id)
                    t2 = time.perf_counter()
                    assert final.describe() == "exited: 0", final.describe()
                    starts.append(t1 - t0)
                    cycles.append(t2 - t0)
                print(f"{name:40} {pct(starts, .5):9.1f} {pct(starts, .9):6.1f} "
                      f"{pct(cycles, .5):9.1f} {pct(cycles, .9):6.1f}")


def interpreter_alone(runs: int) -> None:
    """The floor of the helper's cost: the interpreter starting and exiting."""
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        subprocess.run([sys.executable, "-I", "-S", "-c", "pass"], check=True)
        times.append(time.perf_counter() - t0)
    print(f"{'(python -I -S -c pass, for reference)':40} {pct(times, .5):9.1f} "
          f"{pct(times, .9):6.1f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--runs", type=int, default=50)
    parser.add_argument("--device", default=None, help="block device for --io-read-bps")
    ns = parser.parse_args()
    if os.geteuid() != 0:
        sys.exit("bench_limits needs root (cgroups, namespaces)")
    trio.run(run, ns.runs, ns.device)
    interpreter_alone(ns.runs)


if __name__ == "__main__":
    main()
