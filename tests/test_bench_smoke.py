"""bench/run.py --smoke: every benchmark part still runs (about 8 seconds).

No figure is checked (SPEC §6: performance is measured by benchmarks, never by
timed tests): only that the harness starts its contenders, measures each
figure, verifies the fan-out's bytes, and cleans up. Skipped where the
references (sshd, ssh, socat) are not installed or not usable (not root):
``bench/setup.sh`` installs them.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

from .conftest import PYTHON, ROOT

SSHD = Path("/usr/sbin/sshd")


@pytest.mark.skipif(not SSHD.exists() or not shutil.which("ssh") or not shutil.which("socat"),
                    reason="bench references missing: run bench/setup.sh")
@pytest.mark.skipif(os.geteuid() != 0, reason="the throwaway sshd runs as root")
def test_every_benchmark_runs() -> None:
    result = subprocess.run([PYTHON, str(ROOT / "bench" / "run.py"), "--smoke"],
                            capture_output=True, timeout=180, cwd=ROOT,
                            stdin=subprocess.DEVNULL)
    out = result.stdout.decode(errors="replace")
    assert result.returncode == 0, out[-3000:] + result.stderr.decode(errors="replace")[-3000:]
    for number in range(1, 9):
        assert f"\n| {number} | " in out, out[-3000:]
    assert "| identical |" in out
    assert "written to" not in out  # --smoke never writes bench/README.md


def test_the_history_benchmark_runs() -> None:
    """bench/bench_history.py on a tiny history: every measurement works."""
    result = subprocess.run([PYTHON, str(ROOT / "bench" / "bench_history.py"), "--jobs", "300",
                             "--running", "3", "--start-seconds", "0.2"],
                            capture_output=True, timeout=180, cwd=ROOT,
                            stdin=subprocess.DEVNULL)
    out = result.stdout.decode(errors="replace")
    assert result.returncode == 0, out[-3000:] + result.stderr.decode(errors="replace")[-3000:]
    assert "\n| 300 | " in out, out


def test_the_memory_benchmark_runs() -> None:
    """bench/bench_memory.py, each part tiny: attack, stalled streams, soak."""
    result = subprocess.run([PYTHON, str(ROOT / "bench" / "bench_memory.py"), "--rounds", "1",
                             "--attackers", "2", "--round-seconds", "0.5", "--stalled", "2",
                             "--soak-minutes", "0.05", "--settle", "0.2"],
                            capture_output=True, timeout=180, cwd=ROOT,
                            stdin=subprocess.DEVNULL)
    out = result.stdout.decode(errors="replace")
    assert result.returncode == 0, out[-3000:] + result.stderr.decode(errors="replace")[-3000:]
    assert "- round 1: " in out and "2 stalled streams" in out, out
    assert "soak 0.05 min" in out and " 0 errors" in out, out
