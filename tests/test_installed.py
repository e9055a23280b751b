"""The package as installed: every module imports, the commands report their version.

In CI's run against the built wheel (``.ci/test-installed``), these also check
that the modules come from site-packages, never from the source tree.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import pkgutil
import subprocess
import sysconfig
from pathlib import Path

import pytest

import jobctl
import jobd
import protocol

from .conftest import INSTALLED, JOBCTL, JOBD, ROOT, RUN_CWD

PACKAGES = [jobd, jobctl, protocol]


def _modules() -> list[str]:
    names: list[str] = []
    for package in PACKAGES:
        names.append(package.__name__)
        names.extend(info.name for info in pkgutil.walk_packages(
            package.__path__, prefix=package.__name__ + "."))
    return names


def test_every_module_imports() -> None:
    names = _modules()
    # The subpackages a hand-written package list once left out of the wheel.
    assert {"jobd.engine", "jobd.engine._manager", "jobctl._cli", "protocol._frames"} <= set(names)
    purelib = Path(sysconfig.get_paths()["purelib"]).resolve()
    for name in names:
        module = importlib.import_module(name)
        assert module.__file__ is not None
        where = Path(module.__file__).resolve()
        if INSTALLED:
            assert where.is_relative_to(purelib), f"{name} imported from {where}"
            assert not where.is_relative_to(ROOT), f"{name} imported from the source tree"


@pytest.mark.parametrize("package", PACKAGES, ids=lambda m: m.__name__)
def test_typed_marker_is_shipped(package: object) -> None:
    assert (Path(package.__file__).parent / "py.typed").is_file()  # type: ignore[attr-defined]


@pytest.mark.parametrize(("command", "name"), [(JOBD, "jobd"), (JOBCTL, "jobctl")])
def test_version(command: list[str], name: str) -> None:
    result = subprocess.run([*command, "--version"], capture_output=True, timeout=60,
                            cwd=RUN_CWD, stdin=subprocess.DEVNULL)
    assert result.returncode == 0, result.stderr
    assert result.stdout.decode().strip() == f"{name} {jobd.__version__}"
    assert jobctl.__version__ == jobd.__version__ == importlib.metadata.version("jobd")
