"""``jobctl cert request``: a client makes its own key and certificate request.

    jobctl cert request --name alice --role control [--out DIR]

writes ``DIR/alice.key`` (ECDSA P-256, 0600) and ``DIR/alice.csr`` (CN=alice,
OU=control) for the CA's ``jobd ca sign``. The key never leaves the machine.
Needs the ``cryptography`` library (``jobd[ca]``), imported only here.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import NoReturn

ROLES = ("observe", "control", "admin")


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        self.print_usage(sys.stderr)
        self.exit(2, f"{self.prog}: error: {message}\n")


def config_dir() -> Path:
    base = os.environ.get("XDG_CONFIG_HOME") or str(Path.home() / ".config")
    return Path(base) / "jobctl"


DESCRIPTION = ("Your own key and certificate request: the key stays on this machine, "
               "the request goes to the CA (jobd ca sign).")
EPILOG = "example:\n  jobctl cert request --name alice --role control"


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="jobctl cert", description=DESCRIPTION, epilog=EPILOG,
                     formatter_class=argparse.RawDescriptionHelpFormatter)
    configure(parser)
    return parser


def configure(parser: argparse.ArgumentParser) -> None:
    """``cert``'s actions on ``parser`` (its own, or jobctl's for the man page)."""
    sub = parser.add_subparsers(dest="action", required=True, metavar="ACTION",
                                parser_class=_Parser)
    req = sub.add_parser("request", help="write NAME.key (0600) and NAME.csr (CN=NAME, OU=ROLE)")
    req.add_argument("--name", required=True, help="your name: the certificate's CN")
    req.add_argument("--role", required=True, choices=ROLES,
                     help="the role you ask the CA for (the certificate's OU)")
    req.add_argument("--out", type=Path, default=None, metavar="DIR",
                     help="directory (default: $XDG_CONFIG_HOME/jobctl, ~/.config/jobctl)")


def main(argv: list[str]) -> int:
    ns = build_parser().parse_args(argv)
    try:
        from protocol import _pki
    except ImportError:
        print("jobctl cert: needs the cryptography library: pip install 'jobd[ca]'",
              file=sys.stderr)
        return 1
    out = ns.out if ns.out is not None else config_dir()
    try:
        key, csr = _pki.write_request(out, ns.name, ns.role)
    except _pki.PkiError as exc:
        print(f"jobctl cert request: {exc}", file=sys.stderr)
        return 1
    except OSError as exc:
        print(f"jobctl cert request: {exc.strerror or exc} {exc.filename or ''}".rstrip(),
              file=sys.stderr)
        return 1
    print(f"wrote {key} (private: it stays here) and {csr}.\n"
          f"Send {csr.name} to your CA; they run `jobd ca sign {csr.name}` and send back "
          f"{ns.name}.pem: put it next to the key and use -c {key.with_suffix('.pem')} "
          f"-k {key}.")
    return 0
