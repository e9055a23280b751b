#!/usr/bin/env python3
"""Run the suite at one end of pyproject.toml's ranges: ``newest`` or ``lowest``.

    python scripts/lane.py newest|lowest [pytest arguments...]

The locked suite (``make test``) tests what requirements/lock.txt pins. The
ranges users get are wider, so two lanes test their ends, each in a fresh venv
(``.venv-newest``, ``.venv-lowest``) installed by uv (from the lock's .venv):

- newest: the newest releases the ranges allow today (``--resolution highest``,
  index metadata refreshed). When the suite fails there, the lane names the
  release that broke it: it puts each package that differs from the lock back to
  the locked version, one at a time, and re-runs the failed tests; the package
  whose locked version passes is named.
- lowest: the lowest versions the ranges declare for our direct dependencies
  (``--resolution lowest-direct``). A failure there means a lower bound is too
  low: raise it in pyproject.toml.

Exit status: pytest's. docs/operations.md, "The lock and the lanes".
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
LOCK = ROOT / "requirements" / "lock.txt"
UV = ROOT / ".venv" / "bin" / "uv"
EXTRAS = ".[ca,otel,test]"
# At most this many suspects are tried one by one after a newest-lane failure.
MAX_SUSPECTS = 12

RESOLUTION = {"newest": ["--resolution", "highest", "--refresh"],
              "lowest": ["--resolution", "lowest-direct"]}


def say(text: str) -> None:
    print(f"lane: {text}", flush=True)


def canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def locked_versions() -> dict[str, str]:
    pins: dict[str, str] = {}
    for line in LOCK.read_text().splitlines():
        m = re.match(r"^([A-Za-z0-9][A-Za-z0-9_.-]*)==([^ ;\\]+)", line)
        if m:
            pins[canonical(m.group(1))] = m.group(2)
    return pins


def installed_versions(python: Path) -> dict[str, str]:
    out = subprocess.run([str(UV), "pip", "freeze", "--python", str(python)],
                         check=True, capture_output=True, text=True).stdout
    versions: dict[str, str] = {}
    for line in out.splitlines():
        if "==" in line:
            name, _, version = line.partition("==")
            versions[canonical(name)] = version.strip()
    return versions


def uv_install(python: Path, *args: str) -> None:
    subprocess.run([str(UV), "pip", "install", "--quiet", "--python", str(python), *args],
                   check=True, cwd=ROOT)


def pytest(python: Path, venv: Path, args: list[str]) -> int:
    cmd = [str(python), "-m", "pytest", "-q", "-o", f"cache_dir={venv / 'pytest-cache'}", *args]
    return subprocess.run(cmd, cwd=ROOT).returncode


def name_the_breaker(python: Path, venv: Path, differ: dict[str, tuple[str, str]]) -> None:
    """Put each differing package back to its locked version in turn and re-run
    the failed tests: the first whose locked version passes broke the lane."""
    suspects = sorted(differ)[:MAX_SUSPECTS]
    for name in suspects:
        newest, locked = differ[name]
        say(f"trying {name} {locked} (locked) instead of {newest}")
        try:
            uv_install(python, "--no-deps", f"{name}=={locked}")
        except subprocess.CalledProcessError:
            say(f"could not install {name} {locked}; next")
            continue
        passed = pytest(python, venv, ["--lf", "-x"]) == 0
        uv_install(python, "--no-deps", f"{name}=={newest}")
        if passed:
            say(f"BROKEN BY {name} {newest}: the failed tests pass with the locked {locked}")
            return
    say("no single package named: the failed tests fail with each suspect at its locked "
        "version too (a combination, or our own change)")


def main() -> int:
    if len(sys.argv) < 2 or sys.argv[1] not in RESOLUTION:
        print("usage: lane.py newest|lowest [pytest arguments...]", file=sys.stderr)
        return 2
    lane, args = sys.argv[1], sys.argv[2:]
    if not UV.exists():
        print(f"lane: {UV} is missing: make .venv/.installed first", file=sys.stderr)
        return 2
    venv = ROOT / f".venv-{lane}"
    shutil.rmtree(venv, ignore_errors=True)
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    python = venv / "bin" / "python"
    say(f"installing {EXTRAS} at the {lane} end of the ranges into {venv.name}")
    # No pip constraints or lock: the ranges alone decide.
    env_note = {k: v for k, v in os.environ.items() if k.startswith("UV_")}
    if env_note:
        say(f"uv settings from the environment: {sorted(env_note)}")
    uv_install(python, *RESOLUTION[lane], "-e", EXTRAS)
    versions = installed_versions(python)
    locked = locked_versions()
    differ = {name: (version, locked[name]) for name, version in versions.items()
              if name in locked and locked[name] != version}
    if differ:
        say("differs from the lock: " + ", ".join(
            f"{n} {v} (lock {lv})" for n, (v, lv) in sorted(differ.items())))
    else:
        say("every installed version equals the lock's")
    status = pytest(python, venv, args)
    if status != 0 and lane == "newest" and differ:
        name_the_breaker(python, venv, differ)
    elif status != 0 and lane == "lowest":
        say("a lower bound in pyproject.toml is too low: raise it to a version the code "
            "works with (installed: " + ", ".join(
                f"{n} {v}" for n, (v, _) in sorted(differ.items())) + ")")
    return status


if __name__ == "__main__":
    sys.exit(main())
