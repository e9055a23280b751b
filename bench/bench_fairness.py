"""Does one user's output slow everyone's requests? (issue 22 item 11)

``.venv/bin/python bench/bench_fairness.py [--requests N] [--writers 8]``

A real jobd (dev PKI, loopback). olga (observe) sends ``status`` requests one
after the other over one library connection, N of them, and the latency of each
is measured on the client: first on an idle jobd, then while alice runs
``--writers`` jobs of ``cat /dev/zero`` (full speed, each until the per-job cap,
then drained and dropped), both in one run. Reported: p50, p99 and max in ms,
the writers' output rate, and where jobd put the jobs (the ``cgroups`` line).
The goal is a p99 of 5 ms or less with 8 writers.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _harness
from _harness import Jobd, Load, Pki, machine

import jobctl


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def latencies(client: jobctl.BlockingClient, job: int, count: int) -> list[float]:
    out = []
    for _ in range(count):
        t0 = time.perf_counter()
        client.status(job)
        out.append((time.perf_counter() - t0) * 1000)
    return out


def report(name: str, values: list[float]) -> None:
    print(f"  {name:34} p50 {pct(values, .5):7.2f}  p99 {pct(values, .99):7.2f}  "
          f"max {max(values):7.2f} ms  ({len(values)} requests)", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--requests", type=int, default=2000)
    parser.add_argument("--writers", type=int, default=8)
    parser.add_argument("--warmup", type=float, default=2.0,
                        help="seconds the writers run before measuring")
    parser.add_argument("--tree", type=Path, default=None, metavar="DIR",
                        help="measure the jobd in DIR (e.g. an older commit from git archive)")
    ns = parser.parse_args()
    if ns.tree is not None:
        _harness.CODE_TREE = ns.tree.resolve()
    info = machine()
    print(f"bench_fairness: {info['date']}, {info['nproc']} CPUs ({info['cpu']}), "
          f"{info['kernel']}, {info['python']}; code: {ns.tree or 'this tree'}")
    with tempfile.TemporaryDirectory(prefix="jobd-fairness-") as tmp:
        work = Path(tmp)
        pki = Pki(work / "pki")
        server = Jobd(work, pki)
        try:
            layout = server.log.wait_for(r"info cgroups (.*)").group(1)
            print(f"  jobd: {layout}")
            observer = jobctl.connect_blocking(
                "127.0.0.1", server.port, certificate=pki.path("olga.pem"),
                key=pki.path("olga.key"), ca=pki.path("ca.pem"))
            alice = server.connect()
            target = alice.start(["true"]).id
            alice.wait(target)
            latencies(observer, target, 200)  # warm
            load = Load()
            t0 = time.perf_counter()
            idle = latencies(observer, target, ns.requests)
            report("status, idle", idle)
            print(f"    (others' load meanwhile: {load.others() / (time.perf_counter() - t0):.1f} "
                  "CPUs)")
            writers = [alice.start(["cat", "/dev/zero"]).id for _ in range(ns.writers)]
            time.sleep(ns.warmup)
            before = sum(alice.status(w).output_bytes + alice.status(w).dropped_bytes
                         for w in writers)
            load = Load()
            t0 = time.perf_counter()
            busy = latencies(observer, target, ns.requests)
            elapsed = time.perf_counter() - t0
            others = load.others() / elapsed
            after = sum(alice.status(w).output_bytes + alice.status(w).dropped_bytes
                        for w in writers)
            report(f"status, {ns.writers} x cat /dev/zero", busy)
            print(f"    (others' load meanwhile, jobd and its jobs excluded: {others:.1f} CPUs)")
            print(f"  writers' output meanwhile: {(after - before) / elapsed / 2**20:,.0f} MiB/s "
                  f"in all", flush=True)
            for w in writers:
                alice.stop(w, grace=0)
            observer.close()
            alice.close()
            ok = pct(busy, .99) <= 5.0
            print(f"  goal p99 <= 5 ms with writers: {'met' if ok else 'NOT met'}")
        finally:
            server.stop()


if __name__ == "__main__":
    main()
