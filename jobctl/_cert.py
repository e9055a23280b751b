"""``jobctl cert``: a client makes its own key and certificate request, and renews.

    jobctl cert request --name alice --role control [--out DIR]
    jobctl cert renew CERT [--key KEY] [--reuse-key]
    jobctl cert install SIGNED CERT [--key KEY]

``request`` writes ``DIR/alice.key`` (ECDSA P-256, 0600) and ``DIR/alice.csr``
(CN=alice, OU=control) for the CA's ``jobd ca sign``. The key never leaves the
machine. ``renew`` writes a request with CERT's subject and a new key beside the
old one (``alice.new.key``; or signed by the old key with ``--reuse-key``), so
the old pair keeps working meanwhile; ``install`` puts the signed certificate
(and the new key) in place and keeps the old ones as ``alice.old.*``.
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
    renew = sub.add_parser(
        "renew", help="a request to renew CERT (same CN and role): NAME.csr, with a new "
        "key NAME.new.key beside the old one")
    renew.add_argument("certificate", type=Path, metavar="CERT",
                       help="the certificate to renew (e.g. ~/.config/jobctl/alice.pem)")
    renew.add_argument("--key", type=Path, default=None, metavar="KEY",
                       help="its key (default: CERT with .key)")
    renew.add_argument("--reuse-key", action="store_true",
                       help="sign the request with the old key instead of making a new one")
    inst = sub.add_parser("install", help="put a renewed certificate (and its new key) in "
                          "place of CERT; the old ones are kept as NAME.old.*")
    inst.add_argument("signed", type=Path, metavar="SIGNED",
                      help="the certificate the CA signed from the renewal's request")
    inst.add_argument("certificate", type=Path, metavar="CERT",
                      help="the certificate it replaces")
    inst.add_argument("--key", type=Path, default=None, metavar="KEY",
                      help="CERT's key (default: CERT with .key)")


def main(argv: list[str]) -> int:
    ns = build_parser().parse_args(argv)
    try:
        from protocol import _pki
    except ImportError:
        print("jobctl cert: needs the cryptography library: pip install 'jobd[ca]'",
              file=sys.stderr)
        return 1
    try:
        if ns.action == "renew":
            return _renew(ns)
        if ns.action == "install":
            key_path = ns.key if ns.key is not None else ns.certificate.with_suffix(".key")
            print(_pki.install(ns.signed, ns.certificate, key_path))
            return 0
        out = ns.out if ns.out is not None else config_dir()
        key, csr = _pki.write_request(out, ns.name, ns.role)
    except _pki.PkiError as exc:
        print(f"jobctl cert {ns.action}: {_pki.show(str(exc))}", file=sys.stderr)
        return 1
    except OSError as exc:
        print(f"jobctl cert {ns.action}: {exc.strerror or exc} {exc.filename or ''}".rstrip(),
              file=sys.stderr)
        return 1
    print(f"wrote {key} (private: it stays here) and {csr}.\n"
          f"Send {csr.name} to your CA; they run `jobd ca sign {csr.name}` and send back "
          f"{ns.name}.pem: put it next to the key and use -c {key.with_suffix('.pem')} "
          f"-k {key}.")
    return 0


def _renew(ns: argparse.Namespace) -> int:
    from protocol import _pki

    key_path = ns.key if ns.key is not None else ns.certificate.with_suffix(".key")
    new_key, csr, subject = _pki.write_renewal(ns.certificate, key_path,
                                               reuse_key=ns.reuse_key)
    made = (f"wrote {new_key} (the new key, private: it stays here) and {csr}"
            if new_key is not None else f"wrote {csr} (signed by {key_path}, kept)")
    print(f"{made} for {_pki.show(subject)}.\n"
          f"Send {csr.name} to your CA; {ns.certificate} keeps working meanwhile. When "
          f"the signed certificate comes back, run "
          f"`jobctl cert install SIGNED {ns.certificate}` to put it in place.")
    return 0
