"""The manual pages jobctl(1) and jobd(8), generated from the parsers
(scripts/manpages.py, which the Nix package runs at build time)."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

from .conftest import PYTHON, ROOT, RUN_CWD


def test_manpages_generated_from_the_parsers(tmp_path: Path) -> None:
    result = subprocess.run([PYTHON, str(ROOT / "scripts" / "manpages.py"), str(tmp_path)],
                            capture_output=True, timeout=60, cwd=RUN_CWD)
    assert result.returncode == 0, result.stderr
    jobctl = (tmp_path / "jobctl.1").read_text()
    jobd = (tmp_path / "jobd.8").read_text()
    assert jobctl.startswith('.TH JOBCTL "1"')
    assert jobd.startswith('.TH JOBD "8"')
    for word in ("jobctl run", "jobctl wait", "jobctl stream", "jobctl list",
                 "stop\\-on\\-interrupt", "timestamps", "clear\\-env", "JOBCTL_CA",
                 "jobctl cert request", "\\-\\-role", "jobctl rerun", "jobctl config",
                 "\\-\\-label", "\\-\\-identity", "\\-\\-format", "\\-\\-since",
                 "\\-\\-stderr"):
        assert word in jobctl, word
    for word in ("state\\-dir", "certificate\\-authority"):
        assert word in jobd, word
    if shutil.which("groff"):
        for page in ("jobctl.1", "jobd.8"):
            check = subprocess.run(["groff", "-man", "-Tutf8", "-ww", "-z", str(tmp_path / page)],
                                   capture_output=True, timeout=60)
            assert check.returncode == 0 and not check.stderr, (page, check.stderr)
