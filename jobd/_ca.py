"""``jobd ca`` and ``jobd cert``: a small certificate authority in the binary.

    jobd ca init DIR                        CA key, certificate, policy, empty CRL
    jobd ca sign CSR [--policy F]           a client certificate, if the policy allows
    jobd ca sign CSR --server --san NAME..  a server certificate
    jobd ca revoke SERIAL|CERT              mark revoked in the index, rewrite the CRL
    jobd ca crl                             rewrite the CRL (refresh its next update)
    jobd cert request --name NAME           a server's key and CSR

The X.509 work is in :mod:`jobd._pki` (``cryptography``, the ``jobd[ca]``
extra), imported only once one of these commands runs. Exit status: 0 done,
1 refused or failed (one line on stderr), 2 usage.
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import fnmatch
import os
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, NoReturn

if TYPE_CHECKING:
    from protocol import _pki

#: A client certificate's default lifetime: short, so that a lost laptop's
#: certificate dies by itself; renewing is one request and one sign.
CLIENT_DAYS = 30
#: A server certificate's default lifetime (servers are renewed by an operator).
SERVER_DAYS = 365
#: The CA's default lifetime: every certificate dies with it.
CA_DAYS = 3650
#: The longest leaf lifetime `sign` accepts (the CA/Browser Forum's old cap).
MAX_LEAF_DAYS = 825
#: How long a CRL stays valid. OpenSSL refuses every client when the CRL jobd
#: checks has expired, so `jobd ca crl` must run (cron, timer) well within this.
CRL_DAYS = 30
ROLES = ("observe", "control", "admin")
CA_HELP = "the CA directory (default: $JOBD_CA_DIR, else the current directory)"

POLICY_TEMPLATE = """\
# jobd CA policy: which clients may hold which roles.
#
# `jobd ca sign` signs a client's request only when a pattern below matches the
# request's CN (shell-style: * ? [abc]; quote patterns with special characters)
# and lists the role the request asks for in its OU. When several patterns
# match, the client may hold any role that one of them lists.
#
# Roles: observe (see every job), control (start jobs, manage its own),
#        admin (start jobs, manage every job).
#
# This policy allows nobody yet. Examples:
#   alice = ["control"]
#   "ci-*" = ["observe"]

[clients]
"""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        self.print_usage(sys.stderr)
        self.exit(2, f"{self.prog}: error: {message}\n")


class Refused(Exception):
    """A request the CA will not sign, or an operation it cannot do."""


def _days(limit: int) -> Callable[[str], int]:
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not a number of days: {text!r}") from None
        if not 1 <= value <= limit:
            raise argparse.ArgumentTypeError(f"must be 1 to {limit} days: {text}")
        return value
    return parse


def _ca_dir_default() -> Path:
    return Path(os.environ.get("JOBD_CA_DIR") or ".")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="jobd ca", description="A certificate authority for jobd and jobctl.",
                     epilog="A server makes its key and request with `jobd cert request`, a "
                     "client with `jobctl cert request`. docs/security.md walks through it.")
    sub = parser.add_subparsers(dest="action", required=True, metavar="ACTION",
                                parser_class=_Parser)
    init = sub.add_parser("init", help="make a CA: ca.key, ca.pem, policy.toml, crl.pem")
    init.add_argument("dir", type=Path, metavar="DIR")
    init.add_argument("--name", default="jobd CA", help="the CA's CN (default: %(default)s)")
    init.add_argument("--days", type=_days(36500), default=CA_DAYS,
                      help="CA lifetime (default: %(default)s)")
    init.add_argument("--force", action="store_true",
                      help="replace an existing CA (everything it issued stops working)")

    sign = sub.add_parser("sign", help="sign a client request the policy allows, or a "
                          "server request (--server)")
    sign.add_argument("csr", type=Path, metavar="CSR", help="the request (PEM or DER)")
    sign.add_argument("--ca", type=Path, default=None, metavar="DIR", help=CA_HELP)
    sign.add_argument("--policy", type=Path, default=None, metavar="FILE",
                      help="client policy (default: DIR/policy.toml)")
    sign.add_argument("--days", type=_days(MAX_LEAF_DAYS), default=None,
                      help=f"lifetime (default: {CLIENT_DAYS} for clients, "
                      f"{SERVER_DAYS} for servers)")
    sign.add_argument("--out", type=Path, default=None, metavar="CERT",
                      help="where to write the certificate (default: next to the CSR, .pem)")
    sign.add_argument("--server", action="store_true",
                      help="a server certificate (serverAuth); needs --san")
    sign.add_argument("--san", action="extend", nargs="+", default=[], metavar="NAME",
                      help="DNS name or IP address clients connect to (with --server)")

    revoke = sub.add_parser("revoke", help="revoke a certificate and rewrite the CRL")
    revoke.add_argument("what", metavar="SERIAL|CERT",
                        help="hexadecimal serial (as `sign` printed it) or certificate file")
    revoke.add_argument("--ca", type=Path, default=None, metavar="DIR", help=CA_HELP)
    revoke.add_argument("--crl-days", type=_days(3650), default=CRL_DAYS,
                        help="CRL validity (default: %(default)s)")

    crl = sub.add_parser("crl", help="rewrite DIR/crl.pem from the index")
    crl.add_argument("--ca", type=Path, default=None, metavar="DIR", help=CA_HELP)
    crl.add_argument("--days", type=_days(3650), default=CRL_DAYS,
                     help="CRL validity (default: %(default)s)")
    return parser


def build_cert_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="jobd cert", description="Keys and requests for a jobd server.")
    sub = parser.add_subparsers(dest="action", required=True, metavar="ACTION",
                                parser_class=_Parser)
    req = sub.add_parser("request", help="write NAME.key (0600) and NAME.csr for a server")
    req.add_argument("--name", default="server", help="the server's CN (default: %(default)s)")
    req.add_argument("--out", type=Path, default=Path("."), metavar="DIR",
                     help="directory (default: the current one)")
    return parser


def main(argv: list[str]) -> int:
    """``jobd ca ...`` (argv[0] == "ca") or ``jobd cert ...``."""
    which, rest = argv[0], argv[1:]
    ns = (build_parser() if which == "ca" else build_cert_parser()).parse_args(rest)
    try:
        from protocol import _pki
    except ImportError:
        print(f"jobd {which}: needs the cryptography library: pip install 'jobd[ca]'",
              file=sys.stderr)
        return 1
    try:
        if which == "cert":
            key, csr = _pki.write_request(ns.out, ns.name, None)
            print(f"wrote {key} (private, 0600) and {csr}; have it signed with "
                  f"`jobd ca sign {csr} --server --san NAME...`")
            return 0
        return _run(ns)
    except (_pki.PkiError, Refused) as exc:
        print(f"jobd {which} {ns.action}: {exc}", file=sys.stderr)
        return 1
    except OSError as exc:
        where = f" {exc.filename}" if exc.filename else ""
        print(f"jobd {which} {ns.action}: {exc.strerror or exc}{where}", file=sys.stderr)
        return 1


@contextlib.contextmanager
def _locked(directory: Path) -> Iterator[None]:
    """One sign or revoke at a time per CA: the index is read, changed and rewritten."""
    fd = os.open(directory / ".lock", os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def _run(ns: argparse.Namespace) -> int:
    from protocol import _pki

    if ns.action == "init":
        return _init(ns)
    ca_dir = ns.ca if ns.ca is not None else _ca_dir_default()
    if not (ca_dir / "ca.key").exists():
        raise Refused(f"no CA in {ca_dir} (make one with `jobd ca init DIR`, "
                      "or pass --ca DIR)")
    with _locked(ca_dir):
        ca = _pki.CA.load(ca_dir)
        if ns.action == "sign":
            return _sign(ns, ca)
        if ns.action == "revoke":
            entry = ca.revoke(_serial(ns.what))
            path, count = ca.write_crl(ns.crl_days)
            print(f"revoked {entry['serial']} ({entry['subject']}); {path} now lists "
                  f"{count}; send jobd SIGHUP to apply it")
            return 0
        path, count = ca.write_crl(ns.days)
        print(f"wrote {path}: {count} revoked, valid for {ns.days} days; "
              "send jobd SIGHUP to apply it")
        return 0


def _init(ns: argparse.Namespace) -> int:
    from protocol import _pki

    directory: Path = ns.dir
    exists = (directory / "ca.key").exists() or (directory / "ca.pem").exists()
    if exists and not ns.force:
        raise Refused(f"{directory} already holds a CA; --force replaces it "
                      "(and every certificate it issued stops working)")
    directory.mkdir(parents=True, exist_ok=True, mode=0o700)
    with _locked(directory):
        ca = _pki.init_ca(directory, name=ns.name, days=ns.days)
        policy = directory / "policy.toml"
        if ns.force or not policy.exists():
            _pki.write_public(policy, POLICY_TEMPLATE.encode())
        ca.save_index([])
        ca.write_crl(CRL_DAYS)
    print(f"made CA {ns.name!r} in {directory}: ca.pem (give it to servers and clients), "
          f"ca.key (keep it secret), policy.toml (who may hold which role), crl.pem; "
          f"valid until {ca.cert.not_valid_after_utc:%Y-%m-%d}")
    return 0


def load_policy(path: Path) -> dict[str, tuple[str, ...]]:
    """``[clients]``: pattern -> roles. Every mistake is an error naming the file."""
    import tomllib

    try:
        with open(path, "rb") as f:
            data = tomllib.load(f)
    except FileNotFoundError:
        raise Refused(f"no policy file {path}") from None
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise Refused(f"cannot read policy {path}: {exc}") from None
    unknown = set(data) - {"clients"}
    if unknown:
        raise Refused(f"policy {path}: unknown table or key {sorted(unknown)[0]!r} "
                      "(only [clients])")
    clients = data.get("clients", {})
    if not isinstance(clients, dict):
        raise Refused(f"policy {path}: clients must be a table")
    policy: dict[str, tuple[str, ...]] = {}
    for pattern, roles in clients.items():
        if not isinstance(roles, list) or not all(isinstance(r, str) for r in roles):
            raise Refused(f"policy {path}: {pattern!r} must be a list of roles")
        for role in roles:
            if role not in ROLES:
                raise Refused(f"policy {path}: {pattern!r}: unknown role {role!r} "
                              f"(roles: {', '.join(ROLES)})")
        policy[pattern] = tuple(roles)
    return policy


def allowed_roles(policy: dict[str, tuple[str, ...]], name: str) -> set[str]:
    """Every role that a pattern matching ``name`` lists (case-sensitive, like CNs)."""
    return {role for pattern, roles in policy.items()
            if fnmatch.fnmatchcase(name, pattern) for role in roles}


def _sign(ns: argparse.Namespace, ca: _pki.CA) -> int:
    from cryptography.x509.oid import NameOID

    from protocol import _pki

    csr = _pki.load_csr(ns.csr)
    name = _pki.single(csr.subject, NameOID.COMMON_NAME, "CN")
    if ns.server:
        if not ns.san:
            raise Refused("a server certificate needs --san NAME... (the DNS names and "
                          "addresses clients connect to)")
        days = ns.days or SERVER_DAYS
    else:
        if ns.san:
            raise Refused("--san is for server certificates (--server)")
        if not csr.subject.get_attributes_for_oid(NameOID.ORGANIZATIONAL_UNIT_NAME):
            # `jobd cert request` makes server requests: no role, and no --server here.
            raise Refused("the request has no OU (role): a client's request names its role "
                          "(jobctl cert request --role ROLE); for a server's, sign with "
                          "--server --san NAME...")
        role = _pki.single(csr.subject, NameOID.ORGANIZATIONAL_UNIT_NAME, "OU (role)")
        if role not in ROLES:
            raise Refused(f"refused: {name!r} asks for role {role!r}, which does not exist "
                          f"(roles: {', '.join(ROLES)})")
        policy_path = ns.policy if ns.policy is not None else ca.dir / "policy.toml"
        allowed = allowed_roles(load_policy(policy_path), name)
        if not allowed:
            raise Refused(f"refused: policy {policy_path} allows no client named {name!r}")
        if role not in allowed:
            raise Refused(f"refused: policy {policy_path} lets {name!r} hold "
                          f"{', '.join(sorted(allowed))}, not {role}")
        days = ns.days or CLIENT_DAYS
    cert = ca.issue(csr, days=days, server=ns.server, sans=ns.san)
    out: Path = ns.out if ns.out is not None else ns.csr.with_suffix(".pem")
    _pki.write_public(out, _pki.cert_pem(cert))
    kind = "server" if ns.server else "client"
    print(f"signed {kind} certificate {cert.subject.rfc4514_string()} serial "
          f"{cert.serial_number:x}, valid until {cert.not_valid_after_utc:%Y-%m-%d %H:%M} UTC: "
          f"{out}\n  SHA-256 fingerprint {_pki.fingerprint(cert)}")
    return 0


def _serial(text: str) -> int:
    """A hexadecimal serial (colons allowed, as openssl prints them) or a certificate file."""
    from protocol import _pki

    if Path(text).is_file():
        return _pki.load_cert(Path(text)).serial_number
    try:
        return int(text.replace(":", ""), 16)
    except ValueError:
        raise Refused(f"{text!r} is neither a certificate file nor a hexadecimal serial") \
            from None
