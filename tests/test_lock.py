"""The committed lock (requirements/lock.txt) against pyproject.toml's ranges, and
the lane script's reading of it (scripts/lane.py; docs/operations.md, "The lock
and the lanes")."""

from __future__ import annotations

import importlib.util
import re
import tomllib
from types import ModuleType

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

from .conftest import ROOT


def _lane() -> ModuleType:
    spec = importlib.util.spec_from_file_location("lane", ROOT / "scripts" / "lane.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _requirements() -> list[Requirement]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    names = list(project["dependencies"])
    for extra in project["optional-dependencies"].values():
        names.extend(extra)
    tools = (ROOT / "requirements" / "tools.in").read_text().splitlines()
    names.extend(line for line in tools if line.strip() and not line.startswith("#"))
    return [Requirement(r) for r in names]


def test_every_requirement_is_locked_inside_its_range() -> None:
    """A range changed in pyproject.toml without `make lock` fails here, not on a
    fresh machine's install."""
    pins = _lane().locked_versions()
    outside = []
    for req in _requirements():
        name = canonicalize_name(req.name)
        assert name in pins, f"{req.name} is not in requirements/lock.txt: run make lock"
        if not req.specifier.contains(Version(pins[name]), prereleases=True):
            outside.append(f"{req.name} {pins[name]} (wants {req.specifier})")
    assert outside == [], f"locked outside pyproject.toml's ranges: {outside}; run make lock"


def test_every_pin_has_hashes() -> None:
    """pip --require-hashes refuses a lock where one pin lacks them; say which."""
    text = (ROOT / "requirements" / "lock.txt").read_text()
    entries = re.split(r"\n(?=[A-Za-z0-9])", text.split("\n", 1)[1])
    pins = [e for e in entries if "==" in e.split("\n", 1)[0]]
    assert len(pins) >= 30
    for entry in pins:
        assert "--hash=sha256:" in entry, entry.split("\n", 1)[0]


def test_lane_reads_the_lock_like_pip() -> None:
    """Names are canonical (PEP 503) and markers are not part of the version."""
    pins = _lane().locked_versions()
    assert re.fullmatch(r"\d+(\.\d+)+", pins["cryptography"])
    assert "opentelemetry-api" in pins and "pytest-trio" in pins
    assert all(" " not in v and ";" not in v for v in pins.values())
