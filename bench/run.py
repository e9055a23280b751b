"""End-to-end benchmarks: jobd and jobctl against ssh and a raw TLS pipe (SPEC §6).

    .venv/bin/python bench/run.py            # the whole run (`make bench`, ~2.5 minutes)
    .venv/bin/python bench/run.py --quick    # smaller sizes and fewer rounds (~1 minute)
    .venv/bin/python bench/run.py --only 1 --only 3

Every run starts its own contenders on loopback (bench/_harness.py): a real
jobd with a dev PKI, a throwaway sshd, socat as a raw TLS 1.3 pipe. jobd and
jobctl are what users get: a wheel of the tree (the repository, or ``--tree
DIR``) installed into a venv of the run's own, for every figure (``--editable``:
the repository's editable install instead, or ``--tree`` on PYTHONPATH). Contenders
alternate (A B A B ...), the figures are medians. A whole run writes its table
into bench/README.md (between the "bench/run.py" markers); ``--quick`` runs
print only, unless ``--write``.

Figures (goal in parentheses):

1. ``jobctl stream`` of a job writing 1 GiB, live, vs ``ssh ... head -c 1G``
   (>= 1.0x ssh); output to /dev/null in both.
2. the same, replayed after the job ended (>= 1.0x ssh).
3. ``jobctl start true``, whole process, vs ``ssh ... true`` (<= 0.25x ssh).
4. status round trips per second over one connection vs a raw TLS echo.
5. 100 concurrent ``jobctl stream`` of one 64 MiB job: byte-identical
   (sha256), aggregate MB/s.
6. 1,000 running ``sleep 600`` jobs: jobd RSS per job (<= 20 KiB).
7. job starts per second over one library connection (>= 300/s).
8. jobd RSS while one client streams 10 GiB (growth < 20 MB).
"""

from __future__ import annotations

import argparse
import hashlib
import os
import re
import selectors
import shlex
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _harness as h

import protocol as p

MB = 1_000_000
MIB = 1 << 20
GIB = 1 << 30
README = h.ROOT / "bench" / "README.md"
BEGIN = "<!-- bench/run.py: begin (generated; edit bench/run.py instead) -->"
END = "<!-- bench/run.py: end -->"


@dataclass
class Sizes:
    rounds: int = 7
    stream: int = GIB
    start_rounds: int = 15
    rtt_seconds: float = 2.0
    fanout_clients: int = 100
    fanout_bytes: int = 64 * MIB
    idle_jobs: int = 1000
    starts: int = 1000
    big_stream: int = 10 * GIB


QUICK = Sizes(rounds=2, stream=256 * MIB, start_rounds=5, rtt_seconds=0.5,
              fanout_clients=20, fanout_bytes=16 * MIB, idle_jobs=200, starts=200,
              big_stream=GIB)
#: Only that every part works (tests/test_bench_smoke.py): the figures mean nothing.
SMOKE = Sizes(rounds=1, stream=4 * MIB, start_rounds=1, rtt_seconds=0.05,
              fanout_clients=3, fanout_bytes=MIB, idle_jobs=10, starts=10,
              big_stream=16 * MIB)


@dataclass
class Row:
    number: int
    figure: str
    jobd: str
    reference: str
    ratio: str
    goal: str
    met: str


@dataclass
class Goal:
    """A row of issue 26's table: a figure as a ratio to its reference, and its goal."""

    figure: str
    now: str
    goal: str
    met: bool


@dataclass
class Report:
    sizes: Sizes
    rows: list[Row] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    goals: list[Goal] = field(default_factory=list)

    def goal(self, figure: str, now: str, goal: str, met: bool) -> None:
        self.goals.append(Goal(figure, now, goal, met))

    def add(self, row: Row) -> None:
        self.rows.append(row)
        print(f"  -> {row.figure}: jobd {row.jobd} | reference {row.reference} | "
              f"{row.ratio} | goal {row.goal}: {row.met}", flush=True)

    def note(self, text: str) -> None:
        self.notes.append(text)
        print(f"  note: {text}", flush=True)


def say(text: str) -> None:
    print(f"\n== {text}", flush=True)


def rate(nbytes: int, seconds: float) -> float:
    return nbytes / seconds / MB


def fmt_size(n: int) -> str:
    return f"{n // GIB} GiB" if n % GIB == 0 else f"{n // MIB} MiB"


def yes(ok: bool) -> str:
    return "yes" if ok else "**no**"


# -- 1, 2: one stream, live and replayed ----------------------------------------------


def bench_stream(report: Report, jobd: h.Jobd, sshd: h.Sshd, work: Path, pki: h.Pki) -> None:
    size = report.sizes.stream
    say(f"1, 2: stream {fmt_size(size)}, live and replayed, vs ssh and raw TLS "
        f"({report.sizes.rounds} rounds)")
    tls = h.TlsPipe(work, pki, f"head -c {size} /dev/zero")
    client = jobd.connect()
    ended: list[int] = []
    # CPU seconds of each run: server side (with the job it ran) plus client.
    cpu: dict[str, list[float]] = {"jobd live": [], "jobd replay": []}
    clients: dict[str, list[float]] = {"jobd live": [], "jobd replay": [], "ssh": [], "raw TLS": []}

    def timed_jobd(name: str, run: Callable[[], float]) -> float:
        server, child = h.cpu_tree_seconds(jobd.pid), _children_cpu()
        elapsed = run()
        clients[name].append(_children_cpu() - child)
        cpu[name].append(h.cpu_tree_seconds(jobd.pid) - server + clients[name][-1])
        return elapsed

    def live() -> float:
        t0 = time.perf_counter()
        status = client.start(["head", "-c", str(size), "/dev/zero"])
        h.run_timed(jobd.cli("stream", str(status.id)), env=jobd.env)
        elapsed = time.perf_counter() - t0
        final = client.status(status.id)
        if final.output_bytes != size or final.dropped_bytes or final.describe() != "exited: 0":
            raise RuntimeError(f"job {status.id}: {final.describe()}, "
                               f"{final.output_bytes} bytes kept, {final.dropped_bytes} dropped")
        ended.append(status.id)
        return elapsed

    def replay() -> float:
        job = ended[-1]
        elapsed = h.run_timed(jobd.cli("stream", str(job)), env=jobd.env)
        client.delete(job)
        return elapsed

    def reference(name: str, argv: list[str]) -> float:
        child = _children_cpu()
        elapsed = h.run_timed(argv)
        clients[name].append(_children_cpu() - child)
        return elapsed

    ssh_cmd = sshd.command("head", "-c", str(size), "/dev/zero")
    servers = {"ssh": sshd.proc.pid, "raw TLS": tls.proc.pid}
    before = {name: h.cpu_tree_seconds(pid) for name, pid in servers.items()}
    results = h.alternate({
        "jobd live": lambda: timed_jobd("jobd live", live),
        "ssh": lambda: reference("ssh", ssh_cmd),
        "raw TLS": lambda: reference("raw TLS", tls.client()),
        "jobd replay": lambda: timed_jobd("jobd replay", replay),
    }, report.sizes.rounds)
    time.sleep(0.5)  # sshd and socat reap their last session
    rounds = report.sizes.rounds
    for name, pid in servers.items():
        per_round = (h.cpu_tree_seconds(pid) - before[name]) / rounds
        cpu[name] = [per_round + c for c in clients[name]]
    tls.stop()
    client.close()
    rates = {name: rate(size, h.median(times)) for name, times in results.items()}
    for name, times in results.items():
        print(f"  {name}: " + ", ".join(f"{rate(size, t):.0f}" for t in times) + " MB/s")
    ssh_rate, tls_rate = rates["ssh"], rates["raw TLS"]
    for number, name in ((1, "jobd live"), (2, "jobd replay")):
        ratio = rates[name] / ssh_rate
        what = "live" if number == 1 else "replayed after the job ended"
        low, high = (rate(size, t) for t in (max(results[name]), min(results[name])))
        report.add(Row(number, f"`jobctl stream` of {fmt_size(size)}, {what} (MB/s)",
                       f"{rates[name]:.0f} ({low:.0f} to {high:.0f})",
                       f"ssh {ssh_rate:.0f}; raw TLS {tls_rate:.0f}",
                       f"{ratio:.2f}x ssh; {rates[name] / tls_rate:.2f}x TLS", ">= 1.0x ssh",
                       yes(ratio >= 1.0)))
    live_ssh, live_tls = rates["jobd live"] / ssh_rate, rates["jobd live"] / tls_rate
    report.goal(f"stream {fmt_size(size)}, jobctl / ssh (median of {rounds} rounds); "
                "/ socat TLS 1.3, 256 KiB buffers",
                f"{live_ssh:.2f} ({rates['jobd live']:.0f} vs {ssh_rate:.0f} MB/s); "
                f"{live_tls:.2f} ({tls_rate:.0f} MB/s)", ">= 1.1; >= 1.0",
                live_ssh >= 1.1 and live_tls >= 1.0)
    gib = size / GIB
    per_gib = {name: h.median(values) / gib for name, values in cpu.items()}
    client_gib = {name: h.median(values) / gib for name, values in clients.items()}
    print("  CPU s/GiB, all processes (client): " + ", ".join(
        f"{name} {per_gib[name]:.2f} ({client_gib[name]:.2f})" for name in per_gib))
    report.note("figures 1, 2: CPU seconds per GiB, every process of the transfer (server, "
                "the `head` it runs, client; in brackets the client alone), a measure that "
                "other load disturbs less than the rate: " + ", ".join(
                    f"{name} {per_gib[name]:.2f} ({client_gib[name]:.2f})"
                    for name in ("jobd live", "jobd replay", "ssh", "raw TLS")) + ".")


def _children_cpu() -> float:
    usage = os.times()
    return usage.children_user + usage.children_system


# -- 3: start latency -----------------------------------------------------------------


def bench_start(report: Report, jobd: h.Jobd, sshd: h.Sshd) -> None:
    rounds = report.sizes.start_rounds
    say(f"3: `jobctl start true` vs `ssh ... true` ({rounds} rounds)")
    python = [h.python(), "-c", "pass"]
    results = h.alternate({
        "jobctl start true": lambda: h.run_timed(jobd.cli("start", "true"), env=jobd.env),
        "ssh true": lambda: h.run_timed(sshd.command("true")),
        "python -c pass": lambda: h.run_timed(python, env=jobd.env),
    }, rounds)
    ms = {name: h.median(times) * 1000 for name, times in results.items()}
    for name, value in ms.items():
        print(f"  {name}: {value:.1f} ms")
    ratio = ms["jobctl start true"] / ms["ssh true"]
    report.add(Row(3, "`jobctl start true`, whole process (ms)", f"{ms['jobctl start true']:.0f}",
                   f"ssh {ms['ssh true']:.0f}; `python -c pass` {ms['python -c pass']:.0f}",
                   f"{ratio:.2f}x ssh", "<= 0.15x ssh", yes(ratio <= 0.15)))
    report.goal("`jobctl start true` / `ssh localhost true`",
                f"{ratio:.2f} ({ms['jobctl start true']:.0f} vs {ms['ssh true']:.0f} ms)",
                "<= 0.15", ratio <= 0.15)
    top = import_times(jobd.cli("start", "true"), jobd.env, max(3, rounds // 3))
    print("  -X importtime, best of runs (ms, cumulative / self):")
    for name, cumulative, own in top:
        print(f"    {cumulative:6.1f} {own:6.1f}  {name}")
    report.note("figure 3: `python -X importtime` of `jobctl start true`, the largest entries "
                "(ms, cumulative; best of runs): " + ", ".join(
                    f"`{name}` {cumulative:.1f}" for name, cumulative, _ in top) + ".")


def import_times(argv: list[str], env: dict[str, str], runs: int,
                 count: int = 12) -> list[tuple[str, float, float]]:
    """The ``count`` largest entries of ``python -X importtime`` for a command:
    (module, cumulative ms, self ms), each the smallest over ``runs`` runs."""
    best: dict[str, tuple[float, float]] = {}
    for _ in range(runs):
        proc = subprocess.run(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                              stderr=subprocess.PIPE, env={**env, "PYTHONPROFILEIMPORTTIME": "1"})
        for m in re.finditer(rb"^import time:\s+(\d+) \|\s+(\d+) \| *(\S+)$", proc.stderr,
                             re.M):
            name = m.group(3).decode()
            own, cumulative = int(m.group(1)) / 1000, int(m.group(2)) / 1000
            old = best.get(name, (cumulative, own))
            best[name] = (min(old[0], cumulative), min(old[1], own))
    ranked = sorted(best.items(), key=lambda item: -item[1][0])[:count]
    return [(name, cumulative, own) for name, (cumulative, own) in ranked]


# -- 4: round trips -------------------------------------------------------------------


def bench_round_trips(report: Report, jobd: h.Jobd, work: Path, pki: h.Pki) -> None:
    seconds = report.sizes.rtt_seconds
    say(f"4: status round trips over one connection vs raw TLS echo ({seconds:g} s each)")
    client = jobd.connect()
    job = client.start(["true"]).id
    request = len(p.encode_frame(p.GetStatus(job)))
    answer = len(p.encode_frame(p.StatusResult(client.status(job))))
    echo = h.TlsPipe(work, pki, None)

    def blocking() -> float:
        return _per_second(lambda: client.status(job), seconds)

    def raw() -> float:
        import socket

        ctx = echo.context()
        with socket.create_connection(("127.0.0.1", echo.port)) as raw_sock, \
                ctx.wrap_socket(raw_sock, server_hostname="127.0.0.1") as sock:
            frame = b"x" * answer

            def once() -> None:
                sock.sendall(frame)
                got = 0
                while got < answer:
                    got += len(sock.recv(65536))

            return _per_second(once, seconds)

    def asynchronous() -> float:
        return _async_per_second(jobd, "status", job, seconds)

    results = h.alternate({"blocking": blocking, "async": asynchronous, "raw TLS echo": raw}, 3)
    client.close()
    echo.stop()
    med = {name: h.median(v) for name, v in results.items()}
    for name, value in med.items():
        print(f"  {name}: {value:.0f}/s")
    report.add(Row(4, f"status round trips per second, one connection (frames {request} B "
                      f"and {answer} B)",
                   f"{med['blocking']:.0f} blocking; {med['async']:.0f} async",
                   f"raw TLS echo of {answer} B: {med['raw TLS echo']:.0f}",
                   f"{med['blocking'] / med['raw TLS echo']:.2f}x TLS", "(none)", "-"))


def _per_second(call: Callable[[], object], seconds: float) -> float:
    for _ in range(20):
        call()  # warm up
    n = 0
    t0 = time.perf_counter()
    deadline = t0 + seconds
    while True:
        for _ in range(50):
            call()
        n += 50
        now = time.perf_counter()
        if now >= deadline:
            return n / (now - t0)


def _async_per_second(jobd: h.Jobd, what: str, job: int, seconds: float,
                      connections: int = 1) -> float:
    """Requests per second with the Trio client over ``connections`` connections at
    once, each one request after another (in a child process: importing trio here
    would not change jobd, but keeps this process lean)."""
    code = f"""
import time, trio, jobctl
async def main():
    done, ready, go, t0 = 0, 0, trio.Event(), 0.0
    all_ready = trio.Event()
    async def one():
        nonlocal done, ready
        async with jobctl.connect("127.0.0.1", {jobd.port}, **{jobd.connect_args()!r}) as c:
            async def call():
                if {what!r} == "status":
                    await c.status({job})
                else:
                    await c.start(["true"])
            for _ in range(20):
                await call()
            ready += 1
            if ready == {connections}:
                all_ready.set()
            await go.wait()
            while time.perf_counter() < t0 + {seconds}:
                for _ in range(10):
                    await call()
                done += 10
    async with trio.open_nursery() as nursery:
        for _ in range({connections}):
            nursery.start_soon(one)
        await all_ready.wait()
        t0 = time.perf_counter()
        go.set()
    print(done / (time.perf_counter() - t0))
trio.run(main)
"""
    out = subprocess.run([h.python(), "-P", "-c", code], capture_output=True, text=True,
                         cwd=h.ROOT, check=True, env=jobd.env)
    return float(out.stdout.strip())


# -- 5: fan-out -----------------------------------------------------------------------


def bench_fanout(report: Report, jobd: h.Jobd, work: Path, sshd: h.Sshd | None) -> None:
    clients, size = report.sizes.fanout_clients, report.sizes.fanout_bytes
    say(f"5: {clients} concurrent `jobctl stream` of one {fmt_size(size)} job"
        + (f", vs {clients} concurrent `ssh ... cat` of a {fmt_size(size)} file" if sshd else ""))
    go = work / f"go-{time.monotonic_ns()}"
    script = ('echo ready; while [ ! -e "$1" ]; do sleep 0.01; done; '
              f'exec head -c {size} /dev/urandom')
    lib = jobd.connect()
    job = lib.start(["sh", "-c", script, "sh", str(go)]).id
    procs = [subprocess.Popen(jobd.cli("stream", str(job)), stdin=subprocess.DEVNULL,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=jobd.env)
             for _ in range(clients)]
    t_start = time.perf_counter()
    hashes, counts, t0, t_end = _collect(procs, go)
    reference = hashlib.sha256()
    for event in lib.output(job):
        if isinstance(event, p.OutputChunk):
            reference.update(event.data)
    digests = set(hashes)
    expected = len(b"ready\n") + size
    identical = digests == {reference.hexdigest()} and set(counts) == {expected}
    lib.delete(job)
    lib.close()
    total = clients * size
    aggregate = rate(total, t_end - t0)
    print(f"  {clients} clients connected in {t0 - t_start:.2f} s; {total / MB:.0f} MB in "
          f"{t_end - t0:.2f} s; identical: {identical}")
    ssh_text, ratio_text = "", ""
    if sshd is not None:
        data = work / "fanout.bin"
        with open(data, "wb") as f:
            f.write(os.urandom(size))
        ssh_go = work / f"go-{time.monotonic_ns()}"
        remote = (f"echo ready; while [ ! -e {ssh_go} ]; do sleep 0.01; done; "
                  f"exec cat {data}")
        procs = [subprocess.Popen(sshd.command("sh", "-c", shlex.quote(remote)),
                                  stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                  stderr=subprocess.PIPE) for _ in range(clients)]
        _, ssh_counts, s0, s_end = _collect(procs, ssh_go)
        data.unlink()
        if set(ssh_counts) != {expected}:
            raise RuntimeError(f"fan-out over ssh: sizes {set(ssh_counts)}")
        ssh_rate = rate(total, s_end - s0)
        ratio = aggregate / ssh_rate
        print(f"  ssh: {total / MB:.0f} MB in {s_end - s0:.2f} s")
        ssh_text, ratio_text = f"{clients} x `ssh ... cat`: {ssh_rate:.0f}", f"{ratio:.2f}x ssh"
        report.goal(f"{clients} streams x {fmt_size(size)}, aggregate jobctl / "
                    f"{clients} x ssh cat", f"{ratio:.2f} ({aggregate:.0f} vs {ssh_rate:.0f} MB/s)",
                    ">= 2.0", ratio >= 2.0)
    report.add(Row(5, f"{clients} concurrent `jobctl stream` of one live {fmt_size(size)} job: "
                      "aggregate MB/s", f"{aggregate:.0f}",
                   ssh_text, ratio_text, "every byte, identical (sha256)",
                   "identical" if identical else "**DIFFERENT**"))
    report.note(f"figure 5: timed from the moment all {clients} clients were following the "
                "job (each had its first line) until the last one ended; this process hashes "
                "every client's output (sha256) on the same 2 cores. The ssh reference: "
                f"{clients} `ssh 127.0.0.1 sh -c 'echo ready; ...; cat FILE'` of a "
                f"{fmt_size(size)} file in the page cache, timed the same way (hashed too).")
    if not identical:
        raise RuntimeError(f"fan-out: outputs differ: {digests}, sizes {set(counts)}")


def _collect(procs: list[subprocess.Popen[bytes]],
             go: Path) -> tuple[list[str], list[int], float, float]:
    """Read every process's stdout to its end; once each has sent something
    (its ``ready`` line), touch ``go``. The sha256 and size of each output, the
    time ``go`` was touched, and the time the last output ended."""
    sel = selectors.DefaultSelector()
    hashes = {}
    counts = {}
    for proc in procs:
        assert proc.stdout is not None
        fd = proc.stdout.fileno()
        os.set_blocking(fd, False)
        sel.register(fd, selectors.EVENT_READ)
        hashes[fd] = hashlib.sha256()
        counts[fd] = 0
    ready = 0
    t0 = 0.0
    open_fds = len(procs)
    while open_fds:
        for key, _ in sel.select():
            fd = int(key.fd)
            data = os.read(fd, 1 << 20)
            if not data:
                sel.unregister(fd)
                open_fds -= 1
                continue
            if counts[fd] == 0:
                ready += 1
                if ready == len(procs):
                    t0 = time.perf_counter()
                    go.touch()  # every client is connected and following: release the job
            counts[fd] += len(data)
            hashes[fd].update(data)
    t_end = time.perf_counter()
    sel.close()
    for proc in procs:
        proc.wait()
        assert proc.stderr is not None and proc.stdout is not None
        error = proc.stderr.read()
        proc.stderr.close()
        proc.stdout.close()
        if proc.returncode != 0:
            raise RuntimeError(f"{proc.args[0]} exited {proc.returncode}: "
                               f"{error.decode(errors='replace')}")
    return ([hx.hexdigest() for hx in hashes.values()], list(counts.values()), t0, t_end)


# -- 6: idle jobs ---------------------------------------------------------------------


def bench_idle(report: Report, work: Path, pki: h.Pki) -> None:
    n = report.sizes.idle_jobs
    say(f"6: RSS of jobd with {n} running `sleep 600` jobs")
    jobd = h.Jobd(work, pki, "--max-jobs-per-user", "0")  # 1,000 jobs of one user
    try:
        client = jobd.connect()
        for _ in range(20):  # warm up: code paths, thread cache, allocator pools
            job = client.start(["sleep", "600"]).id
            client.stop(job, grace=0)
            client.delete(job)
        time.sleep(0.5)
        before = jobd.rss_kib()
        jobs = [client.start(["sleep", "600"]).id for _ in range(n)]
        time.sleep(1.0)
        after = jobd.rss_kib()
        running = sum(1 for s in client.list() if s.running)
        t0 = time.perf_counter()
        for job in jobs:
            client.stop(job, grace=0)
        stop_time = time.perf_counter() - t0
        stopped = jobd.rss_kib()
        client.close()
    finally:
        jobd.stop()
    per_job = (after - before) / n
    print(f"  RSS {before} KiB with 0 jobs, {after} KiB with {running} running, "
          f"{stopped} KiB after stopping them ({stop_time:.1f} s)")
    report.add(Row(6, f"jobd RSS per running job, {n} `sleep 600` jobs (KiB)",
                   f"{per_job:.1f}", f"RSS {before / 1024:.1f} MiB with 0 jobs, "
                   f"{after / 1024:.1f} MiB with {n}", "", "<= 16 KiB", yes(per_job <= 16)))
    report.goal(f"RSS per running job ({n} `sleep`)", f"{per_job:.1f} KiB", "<= 16 KiB",
                per_job <= 16)


# -- 7: starts per second -------------------------------------------------------------


def bench_starts(report: Report, work: Path, pki: h.Pki) -> None:
    n = report.sizes.starts
    say(f"7: durable job starts per second ({n} starts of `true`), one library connection "
        f"and {CONNECTIONS} at once, vs `Popen(['true']).wait()` here")
    jobd = h.Jobd(work, pki)
    try:
        seconds = max(0.2, n / 500)
        results = h.alternate({
            "blocking": lambda: _blocking_starts_per_second(jobd, n),
            "async": lambda: _async_per_second(jobd, "start", 0, seconds),
            f"{CONNECTIONS} connections": lambda: _async_per_second(
                jobd, "start", 0, seconds, connections=CONNECTIONS),
            "Popen": lambda: _popen_per_second(seconds),
        }, 3)
    finally:
        jobd.stop()
    med = {name: h.median(v) for name, v in results.items()}
    many, popen = med[f"{CONNECTIONS} connections"], med["Popen"]
    print("  " + ", ".join(f"{name} {value:.0f}/s" for name, value in med.items()))
    one = med["blocking"] / popen
    report.add(Row(7, "durable job starts per second, one library connection; "
                      f"{CONNECTIONS} connections at once (async)",
                   f"{med['blocking']:.0f} blocking; {med['async']:.0f} async; "
                   f"{many:.0f} over {CONNECTIONS}",
                   f"`Popen(['true']).wait()` {popen:.0f}/s",
                   f"{one:.2f}x; {many / popen:.2f}x Popen", ">= 0.3x; >= 0.8x Popen",
                   yes(one >= 0.3 and many / popen >= 0.8)))
    report.goal("durable starts/s, one library connection, / local `Popen(['true']).wait()` rate",
                f"{one:.2f} ({med['blocking']:.0f} vs {popen:.0f}/s)", ">= 0.3", one >= 0.3)
    report.goal(f"the same over {CONNECTIONS} connections at once",
                f"{many / popen:.2f} ({many:.0f}/s)", ">= 0.8", many / popen >= 0.8)


#: Figure 7's concurrent connections.
CONNECTIONS = 8


def _blocking_starts_per_second(jobd: h.Jobd, n: int) -> float:
    """Starts of ``true`` per second, one after another over one blocking library
    connection (in a child process, with the jobctl under test: :func:`h.python`)."""
    code = f"""
import time, jobctl
with jobctl.connect_blocking("127.0.0.1", {jobd.port}, **{jobd.connect_args()!r}) as c:
    for _ in range(20):
        c.start(["true"])
    t0 = time.perf_counter()
    for _ in range({n}):
        c.start(["true"])
    print({n} / (time.perf_counter() - t0))
"""
    out = subprocess.run([h.python(), "-P", "-c", code], capture_output=True, text=True,
                         cwd=h.ROOT, check=True, env=jobd.env)
    return float(out.stdout.strip())


def _popen_per_second(seconds: float) -> float:
    """What this machine spends on a process: ``Popen(['true']).wait()`` in a loop."""
    n = 0
    t0 = time.perf_counter()
    while (now := time.perf_counter()) < t0 + seconds or n < 20:
        subprocess.Popen(["true"]).wait()
        n += 1
    return n / (now - t0)


# -- 8: memory while streaming a lot --------------------------------------------------


def bench_big_stream(report: Report, work: Path, pki: h.Pki) -> None:
    size = report.sizes.big_stream
    say(f"8: jobd RSS while one client streams {fmt_size(size)}")
    jobd = h.Jobd(work, pki, "--output-cap", str(size + GIB))
    try:
        client = jobd.connect()
        before = jobd.rss_kib()
        t0 = time.perf_counter()
        job = client.start(["head", "-c", str(size), "/dev/zero"]).id
        with h.sampler(jobd.pid) as samples:
            h.run_timed(jobd.cli("stream", str(job)), env=jobd.env)
        elapsed = time.perf_counter() - t0
        final = client.status(job)
        client.delete(job)
        client.close()
    finally:
        jobd.stop()
    if final.output_bytes != size:
        raise RuntimeError(f"big stream: {final.output_bytes} of {size} bytes kept")
    peak = max(samples)
    growth = (peak - before) / 1024
    print(f"  RSS {before} KiB before, peak {peak} KiB, last {samples[-1]} KiB "
          f"({len(samples)} samples); {rate(size, elapsed):.0f} MB/s")
    limit = h.dirty_limit()
    if size > limit:
        report.note(f"figure 8: {fmt_size(size)} is more than the kernel lets stay dirty in the "
                    f"page cache (about {limit / GIB:.1f} GiB here), so the log is written back "
                    "to disk during the stream and the job is drained at the disk's pace: "
                    "hence a lower rate than figure 1's.")
    report.add(Row(8, f"jobd RSS growth while one client streams {fmt_size(size)} (MB)",
                   f"{growth * 1.048576:.1f}",
                   f"RSS {before / 1024:.1f} MiB before, peak {peak / 1024:.1f} MiB; "
                   f"{rate(size, elapsed):.0f} MB/s", "", "< 20 MB", yes(growth * 1.048576 < 20)))


# -- the report -----------------------------------------------------------------------


def measure(report: Report, figures: str, bench: Callable[..., None], *args: object) -> None:
    """Run one benchmark once the machine is quiet; note what others used meanwhile."""
    h.wait_until_quiet()
    load = h.Load()
    t0 = time.perf_counter()
    bench(*args)
    others = load.others() / (time.perf_counter() - t0)
    print(f"  (others used {others:.2f} CPUs meanwhile)", flush=True)
    if others >= 0.1:
        report.note(f"figure {figures}: other processes used {others:.2f} of the "
                    f"{os.cpu_count()} CPUs meanwhile (kernel writeback included).")



def table(report: Report, info: dict[str, str], quick: bool, seconds: float) -> str:
    s = report.sizes
    lines = [
        BEGIN,
        "",
        f"Date: {info['date']}. Machine: nproc {info['nproc']}, {info['cpu']}, "
        f"{info['kernel']}, {info['python']}, {info['openssl']}; references "
        f"{info['ssh']} (`-c aes128-gcm@openssh.com`) and {info['socat']}."
        + (" jobd and jobctl: a wheel of the tree installed into a venv of the run's "
           "own (not editable), for every figure." if "install" in info else
           " jobd and jobctl: the editable install (`--editable`).")
        + (" **Quick run** (`--quick`): smaller sizes." if quick else ""),
        f"Medians of {s.rounds} alternating rounds for figures 1 and 2 (their range "
        f"in parentheses), {s.start_rounds} for figure 3, 3 for figure 4; the whole run took "
        f"{seconds:.0f} s; load average {info['load']} at its end.",
        "",
        "| # | figure | jobd | reference | ratio | goal | met |",
        "| ---: | --- | ---: | --- | --- | --- | --- |",
    ]
    for r in sorted(report.rows, key=lambda r: r.number):
        lines.append(f"| {r.number} | {r.figure} | {r.jobd} | {r.reference} | {r.ratio} | "
                     f"{r.goal} | {r.met} |")
    if report.notes:
        lines.append("")
        lines.extend(f"- {n}" for n in report.notes)
    if report.goals:
        lines += ["", "Issue 26's figures, each a ratio to its reference measured in the same "
                  "run:", "", "| figure | now | goal | met |", "| --- | --- | --- | --- |"]
        lines += [f"| {g.figure} | {g.now} | {g.goal} | {yes(g.met)} |" for g in report.goals]
    lines += ["", END]
    return "\n".join(lines)


def write_readme(text: str) -> None:
    old = README.read_text()
    if BEGIN in old and END in old:
        pattern = re.compile(re.escape(BEGIN) + r".*?" + re.escape(END), re.S)
        new = pattern.sub(lambda _: text, old, count=1)
    else:
        new = old.rstrip("\n") + "\n\n## End to end: jobd against ssh and raw TLS\n\n" + text
    README.write_text(new if new.endswith("\n") else new + "\n")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="smaller sizes, fewer rounds")
    parser.add_argument("--smoke", action="store_true",
                        help="tiny sizes, no waiting for a quiet machine: checks that every "
                        "part works (figures meaningless; never writes the README)")
    parser.add_argument("--only", type=int, action="append", choices=range(1, 9),
                        metavar="N", help="run only figure N (repeatable; 2 runs with 1)")
    parser.add_argument("--rounds", type=int, help="rounds for figures 1 and 2")
    parser.add_argument("--write", action="store_true",
                        help="write the table into bench/README.md even for --quick/--only")
    parser.add_argument("--no-write", action="store_true", help="never touch bench/README.md")
    parser.add_argument("--patience", type=float, metavar="SECONDS",
                        help="wait at most this long for a quiet machine before each figure "
                        f"(default {h.QUIET_PATIENCE:g}; 0: never wait)")
    parser.add_argument("--editable", action="store_true",
                        help="run the editable install (or --tree on PYTHONPATH), not a wheel "
                        "installed into a venv of the run's own (never writes the README)")
    parser.add_argument("--tree", type=Path, metavar="DIR",
                        help="run jobd and jobctl from this copy of the code (e.g. "
                        "`git archive HEAD | tar -x -C DIR`) instead of the repository's")
    ns = parser.parse_args(argv)
    if ns.tree:
        h.CODE_TREE = ns.tree.resolve()
        ns.no_write = True
    sizes = SMOKE if ns.smoke else QUICK if ns.quick else Sizes()
    if ns.smoke or ns.editable:
        ns.no_write = True
        h.QUIET_PATIENCE = 0.0
    if ns.rounds:
        sizes.rounds = ns.rounds
    if ns.patience is not None:
        h.QUIET_PATIENCE = ns.patience
    only = set(ns.only or range(1, 9))
    if 2 in only:
        only.add(1)
    h.ensure_tools()
    info = h.machine()
    print("machine: " + "; ".join(f"{k} {v}" for k, v in info.items()), flush=True)
    report = Report(sizes)
    t_start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="jobd-bench-") as tmp:
        work = Path(tmp)
        if not ns.editable:
            tree = h.CODE_TREE or h.ROOT
            h.INSTALLED = h.install(tree, work / "install")
            info["install"] = f"a wheel of {tree} installed into a venv (not editable)"
            print(f"jobd and jobctl: {info['install']}", flush=True)
        pki = h.Pki(work / "pki")
        # The fan-out runs 100 jobctl of one identity, all connecting at once from one
        # address: above the default shares (64 connections per identity, 32
        # handshakes per address), which guard a shared server, not a benchmark.
        jobd = h.Jobd(work, pki, "--output-cap", str(sizes.stream + GIB),
                      "--max-connections-per-identity", "1000",
                      "--max-handshakes-per-source", "1000")
        sshd = h.Sshd(work) if only & {1, 3, 5} else None
        try:
            if 1 in only:
                assert sshd is not None
                measure(report, "1, 2", bench_stream, report, jobd, sshd, work, pki)
            if 3 in only:
                assert sshd is not None
                measure(report, "3", bench_start, report, jobd, sshd)
            if 4 in only:
                measure(report, "4", bench_round_trips, report, jobd, work, pki)
            if 5 in only:
                measure(report, "5", bench_fanout, report, jobd, work, sshd)
        finally:
            jobd.stop()
            if sshd is not None:
                sshd.stop()
        if 6 in only:
            measure(report, "6", bench_idle, report, work, pki)
        if 7 in only:
            measure(report, "7", bench_starts, report, work, pki)
        if 8 in only:
            measure(report, "8", bench_big_stream, report, work, pki)
    seconds = time.perf_counter() - t_start
    info["load"] = " / ".join(f"{x:.1f}" for x in os.getloadavg()) + " (1, 5, 15 min)"
    text = table(report, info, ns.quick or ns.smoke, seconds)
    print("\n" + text)
    print(f"\nwhole run: {seconds:.0f} s")
    full = not (ns.quick or ns.smoke) and ns.only is None
    if not ns.no_write and (full or ns.write):
        write_readme(text)
        print(f"written to {README.relative_to(h.ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
