"""Interactive jobs (issue 24): stdin throughput and keystroke round trip, jobd
against ssh, side by side in one run.

    .venv/bin/python bench/bench_interactive.py           # the figures, into bench/README.md
    .venv/bin/python bench/bench_interactive.py --quick   # smaller, print only

1. stdin: ``head -c N /dev/zero | jobctl run -i sh -c 'cat > /dev/null'`` vs
   ``... | ssh -c aes128-gcm@openssh.com 127.0.0.1 'cat > /dev/null'``: whole
   commands, wall time, MB/s (goal: jobd >= 1.0x ssh).
2. keystroke round trip: ``jobctl run -t cat`` vs ``ssh -tt 127.0.0.1 cat``, each on
   a terminal of its own (pexpect); one byte typed, the time until the remote
   terminal's echo of it is back on ours; median of many (goal: no slower).

The contenders alternate (A B A B ...) and the figures are medians
(bench/_harness.py starts jobd and a throwaway sshd on loopback).
"""

from __future__ import annotations

import argparse
import os
import re
import shlex
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _harness as h

MB = 1_000_000
MIB = 1 << 20
README = h.ROOT / "bench" / "README.md"
BEGIN = "<!-- bench/bench_interactive.py: begin (generated) -->"
END = "<!-- bench/bench_interactive.py: end -->"


def stdin_throughput(jobd: h.Jobd, sshd: h.Sshd, size: int, rounds: int) -> dict[str, float]:
    feed = f"head -c {size} /dev/zero | "
    sink = "cat > /dev/null"
    commands = {
        "jobd": feed + shlex.join(jobd.cli("run", "-i", "sh", "-c", sink)),
        "ssh": feed + shlex.join(sshd.command(sink)),
    }
    times = h.alternate({name: (lambda c=cmd: h.run_timed(["sh", "-c", c], env=jobd.env))
                         for name, cmd in commands.items()}, rounds)
    return {name: size / statistics.median(t) / MB for name, t in times.items()}


def keystroke(argv: list[str], env: dict[str, str], count: int) -> float:
    """Median seconds from typing a byte to seeing its echo, on a terminal of our own."""
    import pexpect

    child = pexpect.spawn(argv[0], argv[1:], env=env, timeout=30, dimensions=(24, 80))
    child.delaybeforesend = None  # pexpect sleeps 50 ms before each send by default
    try:
        child.send(b"ready\r")
        child.expect(b"ready\r\nready\r\n")  # the remote terminal's echo, then cat's copy
        samples = []
        for i in range(count):
            key = b"abcdefghijklmnopqrstuvwxyz"[i % 26:i % 26 + 1]
            t0 = time.perf_counter()
            child.send(key)
            child.expect_exact(key)
            samples.append(time.perf_counter() - t0)
        child.sendcontrol("c")
        child.expect(pexpect.EOF)
        return statistics.median(samples)
    finally:
        child.close(force=True)


def keystrokes(jobd: h.Jobd, sshd: h.Sshd, count: int, rounds: int) -> dict[str, float]:
    env = {**jobd.env, "TERM": "xterm"}
    contenders = {
        "jobd": lambda: keystroke(jobd.cli("run", "-t", "cat"), env, count),
        "ssh": lambda: keystroke(_ssh_tt(sshd), env, count),
    }
    times = h.alternate(contenders, rounds)
    return {name: statistics.median(t) for name, t in times.items()}


def _ssh_tt(sshd: h.Sshd) -> list[str]:
    argv = sshd.command("cat")
    return [argv[0], "-tt", *argv[1:]]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="smaller sizes, print only")
    parser.add_argument("--write", action="store_true", help="write README.md even with --quick")
    ns = parser.parse_args()
    size, rounds, count = (256 * MIB, 2, 50) if ns.quick else (1 << 30, 5, 200)
    h.ensure_tools()
    with tempfile.TemporaryDirectory(prefix="jobd-bench-") as tmp:
        work = Path(tmp)
        pki = h.Pki(work / "pki")
        jobd = h.Jobd(work, pki)
        sshd = h.Sshd(work)
        try:
            load = h.Load()
            began = time.perf_counter()
            rates = stdin_throughput(jobd, sshd, size, rounds)
            rtt = keystrokes(jobd, sshd, count, rounds)
            others = load.others() / ((time.perf_counter() - began) * (os.cpu_count() or 1))
        finally:
            jobd.stop()
            sshd.stop()
    m = h.machine()
    lines = [
        f"Measured {m['date']} on {m['nproc']} x {m['cpu']}, {m['kernel']}, {m['python']}, "
        f"{m['openssl']}, {m['ssh']}; medians of {rounds} alternating rounds; CPU used by "
        f"other processes meanwhile: {others:.0%} of the machine.",
        "",
        "| figure | jobd | ssh | jobd / ssh | goal |",
        "| --- | --- | --- | --- | --- |",
        f"| stdin throughput, {size // MIB} MiB into `cat > /dev/null` (MB/s) | "
        f"{rates['jobd']:.0f} | {rates['ssh']:.0f} | {rates['jobd'] / rates['ssh']:.2f}x | "
        ">= 1.0x |",
        f"| keystroke round trip through `cat` on a pty (ms, median of {count}) | "
        f"{rtt['jobd'] * 1e3:.2f} | {rtt['ssh'] * 1e3:.2f} | "
        f"{rtt['jobd'] / rtt['ssh']:.2f}x | <= 1.0x |",
    ]
    table = "\n".join(lines)
    print(table)
    if not ns.quick or ns.write:
        text = README.read_text()
        block = f"{BEGIN}\n{table}\n{END}"
        if BEGIN in text:
            text = re.sub(re.escape(BEGIN) + ".*?" + re.escape(END), lambda _: block, text,
                          flags=re.S)
        else:
            text += f"\n## Interactive jobs (issue 24)\n\n{block}\n"
        README.write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
