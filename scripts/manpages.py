#!/usr/bin/env python3
"""Write the manual pages jobctl(1), jobctl-cert(1), jobd(8) and jobd-ca(8), generated
from the parsers.

    python scripts/manpages.py OUTDIR

The pages are made from the same argparse parsers that ``--help`` prints
(argparse-manpage), so they cannot drift from the code. The Nix package runs
this at build time and installs the pages (flake.nix); the wheel carries no
pages (pip has no place for them). SOURCE_DATE_EPOCH, when set, dates them.
"""

from __future__ import annotations

import sys
from pathlib import Path

from argparse_manpage.manpage import Manpage

from jobctl import __version__
from jobctl._cert import build_parser as jobctl_cert_parser
from jobctl._cli import build_parser as jobctl_parser
from jobd._ca import build_parser as jobd_ca_parser
from jobd._config import build_parser as jobd_parser

PAGES = (
    ("jobctl", jobctl_parser, 1, "control jobs on a jobd server", "User Commands"),
    ("jobctl-cert", jobctl_cert_parser, 1,
     "your own key and certificate request, and renewing them", "User Commands"),
    ("jobd", jobd_parser, 8, "a small, secure remote job runner (mutual TLS 1.3)",
     "System Administration"),
    ("jobd-ca", jobd_ca_parser, 8, "a certificate authority for jobd and jobctl",
     "System Administration"),
)


def render(name: str) -> tuple[str, str]:
    """(file name, roff text) of one page."""
    for page_name, build, section, summary, manual in PAGES:
        if page_name == name:
            page = Manpage(build())
            page.section = section
            page.description = summary
            page.manual = manual
            page.source = f"jobd {__version__}"
            return f"{name}.{section}", str(page)
    raise KeyError(name)


def main(argv: list[str]) -> int:
    if len(argv) != 1:
        print("usage: manpages.py OUTDIR", file=sys.stderr)
        return 2
    out = Path(argv[0])
    out.mkdir(parents=True, exist_ok=True)
    for name, *_ in PAGES:
        file_name, text = render(name)
        (out / file_name).write_text(text)
        print(out / file_name)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
