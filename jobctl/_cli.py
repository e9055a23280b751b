"""The ``jobctl`` command line (SPEC §2, §9): the parser and the entry point.

Exit status: 0 success; 1 the server refused or the job is in the wrong
state; 2 usage or local configuration; 3 cannot connect, or refused at TLS
or identity level; ``run`` and ``wait`` exit with the job's own status, and
124 when ``wait --timeout`` expires. Every expected failure is one line on
stderr.

The parser. The subcommands are data: :data:`jobctl._commands.COMMANDS`, one
:class:`~jobctl._commands.Command` each (name, help, description, example,
options, action), so adding a subcommand is adding an entry. Global options
(``-c``, ``-a``, ``--json``, ...) are accepted before the subcommand and after
it: each subparser gets them too, with ``SUPPRESS`` defaults so that only
what is given there overrides the top level. ``start``/``run`` take their
options, then the command: the first word that is not an option starts it,
``--`` forces it, and an unknown option before it is a usage error (exit 2).
Abbreviated options are refused everywhere (``--mem`` is not ``--memory``).

Start-up time is part of the product (SPEC §6: ``jobctl start true`` at most
a quarter of ``ssh localhost true``). Only the subcommand being run gets its
full parser (the others are one-line stubs for ``--help``), and json, shlex
and the like are imported by the commands that use them; Trio never
(``python -X importtime -m jobctl``).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import re
import sys

from . import _core as core
from ._commands import COMMANDS, Command, seconds
from ._context import Context
from ._errors import ConfigError, JobctlError
from ._text import escape
from ._version import __version__

TYPE_CHECKING = False  # typing is not imported at run time (issue 26: start-up)
if TYPE_CHECKING:
    from typing import Any, NoReturn

EPILOG = """\
environment: JOBCTL_CERTIFICATE, JOBCTL_KEY, JOBCTL_CA, JOBCTL_ADDRESS,
JOBCTL_PORT, JOBCTL_SERVER_NAME, JOBCTL_SERVER, JOBCTL_IDENTITY, JOBCTL_CONFIG,
JOBCTL_DETACH_KEYS (run -t and attach; default ctrl-],d: Ctrl-] then d leaves the job
running); the certificate files default to certificate.pem, key.pem and ca.pem in
$XDG_CONFIG_HOME/jobctl/. -s NAME takes a server or a group, -i NAME an identity,
from $XDG_CONFIG_HOME/jobctl/config.toml (jobctl config migrate: from the older
format); with no CA at all, the server's certificate is pinned in known_servers there.
jobctl cert request --name NAME --role ROLE: your own key and certificate request.
exit status: 0 ok, 1 refused by the server or wrong job state, 2 usage,
3 cannot connect or refused at TLS or identity level; run and wait exit with
the job's own status (128+N for signal N), wait --timeout with 124.
Global options may also follow the subcommand (jobctl status 4 --json)."""

CERT_HELP = "make your own key and certificate request for the CA (cert request -h)"

#: Global options that take a value (to find the subcommand in argv before parsing):
#: a new global option with a value must be added here too.
_VALUE_OPTIONS = frozenset({"-c", "--certificate", "-k", "--key", "-C",
                            "--certificate-authority", "-a", "--address", "-p", "--port",
                            "--server-name", "-s", "--server", "-i", "--identity",
                            "--liveness-timeout"})


class _Formatter(argparse.RawDescriptionHelpFormatter):
    """Descriptions filled to the terminal's width; examples and the epilog as written.

    argparse builds a formatter for every option added (to check its
    metavar), and its default asks ``shutil`` for the terminal's width:
    importing shutil (with bz2 and lzma) costs each run of jobctl 2 ms. The
    same width, as shutil finds it, without it.
    """

    def __init__(self, prog: str, indent_increment: int = 2, max_help_position: int = 24,
                 width: int | None = None) -> None:
        if width is None:
            try:
                width = int(os.environ["COLUMNS"])
            except (KeyError, ValueError):
                try:
                    width = os.get_terminal_size(sys.__stdout__.fileno()  # type: ignore[union-attr]
                                                 ).columns
                except (AttributeError, ValueError, OSError):
                    width = 80
            if width <= 0:
                width = 80
            width -= 2  # as argparse does
        super().__init__(prog, indent_increment, max_help_position, width)

    def _fill_text(self, text: str, width: int, indent: str) -> str:
        if text.startswith("example:") or text is EPILOG:
            return super()._fill_text(text, width, indent)
        return argparse.HelpFormatter._fill_text(self, text, width, indent)


class _Parser(argparse.ArgumentParser):
    """argparse's parser, whose errors are usage errors (exit 2). A bad value
    (``--grace nan``, a job ID that is not one) is one line; a bad command line
    (a missing argument, an unknown option) also gets the usage."""

    _bad_value = False

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        # A word starting with "-" and a digit is a value, never an option:
        # `--older-than -5s` and `--memory -1` reach their option's check (and
        # its one-line message) rather than "expected one argument".
        self._negative_number_matcher = re.compile(r"^-\d")

    def _get_value(self, action: argparse.Action, arg_string: str) -> object:
        try:
            return super()._get_value(action, arg_string)
        except argparse.ArgumentError:
            self._bad_value = True
            raise

    def error(self, message: str) -> NoReturn:
        if not self._bad_value:
            self.print_usage(sys.stderr)
        self.exit(2, f"{self.prog}: error: {message}\n")


def _config_dir() -> str:
    # os.path, not pathlib: pathlib (with urllib.parse and ipaddress) would be
    # imported by every run for this one path (issue 26: start-up).
    base = os.environ.get("XDG_CONFIG_HOME") or os.path.join(os.path.expanduser("~"), ".config")
    return os.path.join(base, "jobctl")


def _default_file(env: str, name: str) -> str | None:
    if os.environ.get(env):
        return os.environ[env]
    candidate = os.path.join(_config_dir(), name)
    return candidate if os.path.exists(candidate) else None


def _port(text: str) -> int:
    try:
        value = int(text) if len(text) < 10 else -1
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a port: {text!r}") from None
    if not 0 < value < 65536:
        raise argparse.ArgumentTypeError(f"port out of range: {text}")
    return value


def add_global_options(parser: argparse.ArgumentParser, *, top: bool) -> None:
    """The common options (SPEC §2). At the top level with their defaults (from
    the environment); on a subcommand with none, so that only what is given
    there overrides the top level's value."""

    def default(value: object) -> object:
        return value if top else argparse.SUPPRESS

    group = parser.add_argument_group("global options") if not top else parser
    group.add_argument("-c", "--certificate", metavar="FILE", default=default(
        _default_file("JOBCTL_CERTIFICATE", "certificate.pem")), help="client certificate (PEM)")
    group.add_argument("-k", "--key", metavar="FILE",
                       default=default(_default_file("JOBCTL_KEY", "key.pem")),
                       help="client private key (PEM)")
    group.add_argument("-C", "--certificate-authority", dest="ca", metavar="FILE",
                       default=default(_default_file("JOBCTL_CA", "ca.pem")),
                       help="CA certificate the server's certificate must chain to")
    group.add_argument("-a", "--address", metavar="HOST",
                       default=default(os.environ.get("JOBCTL_ADDRESS") or core.DEFAULT_ADDRESS),
                       help="server address; may include the port: host:port, [::1]:8000 "
                            f"(default: {core.DEFAULT_ADDRESS})")
    group.add_argument("-p", "--port", type=_port, default=default(None),
                       help=f"server port (default: {core.DEFAULT_PORT})")
    group.add_argument("--server-name", metavar="NAME",
                       default=default(os.environ.get("JOBCTL_SERVER_NAME")),
                       help="name to verify in the server certificate (default: the address)")
    group.add_argument("--liveness-timeout", metavar="SECONDS",
                       type=seconds("--liveness-timeout", core.MAX_TIMEOUT),
                       default=default(os.environ.get("JOBCTL_LIVENESS_TIMEOUT")
                                       or f"{core.LIVENESS_TIMEOUT:g}"),
                       help="while a request is in progress, a server silent this long is "
                            "taken as gone (stopped, or its network path dead); 0: wait "
                            f"as long as TCP does (default: {core.LIVENESS_TIMEOUT:g}, "
                            "$JOBCTL_LIVENESS_TIMEOUT)")
    group.add_argument("--json", action="store_true", default=default(False),
                       help="print JSON instead of text (start, status, stop, list, delete, wait)")
    # -- issue 15: profiles, fan-out, trust on first use (_profiles, _fanout, _trust)
    group.add_argument("-s", "--server", metavar="NAME",
                       default=default(os.environ.get("JOBCTL_SERVER")),
                       help="a server or group from config.toml (default: $JOBCTL_SERVER); "
                            "a group runs the command on each of its servers")
    group.add_argument("--no-prefix", action="store_true", default=default(False),
                       help="with a group: do not prefix output lines with the server's name")
    group.add_argument("--trust-on-first-use", action="store_true", default=default(False),
                       help="without a CA: pin an unknown server's certificate without asking")
    # -- issue 23: identities apart from servers (_profiles)
    # After run, start and attach, -i is their --interactive: --identity there
    # (or -i before the command, as every global option may be given).
    short = [] if "-i" in parser._option_string_actions else ["-i"]
    group.add_argument(*short, "--identity", metavar="NAME",
                       default=default(os.environ.get("JOBCTL_IDENTITY")),
                       help="an identity (certificate and key) from config.toml instead of the "
                            "server's own (default: $JOBCTL_IDENTITY); -c/-k still win")


def _selected(argv: list[str]) -> str | None:
    """The subcommand's name in ``argv``: the first word that is neither a global
    option nor its value."""
    i = 0
    while i < len(argv):
        word = argv[i]
        if word == "--":
            return argv[i + 1] if i + 1 < len(argv) else None
        if word.startswith("-") and word != "-":
            i += 2 if word in _VALUE_OPTIONS else 1
            continue
        return word
    return None


def build_parser(argv: list[str] | None = None) -> argparse.ArgumentParser:
    """The whole parser; with ``argv``, only the subcommand it names is built in
    full (the rest are stubs that only list themselves in ``--help``)."""
    only = _selected(argv) if argv is not None else None
    full = argv is None or only not in {c.name for c in COMMANDS}
    parser = _Parser(prog="jobctl", description="Control jobs on a jobd server.",
                     epilog=EPILOG, formatter_class=_Formatter, allow_abbrev=False)
    parser.add_argument("--version", action="version", version=f"jobctl {__version__}")
    add_global_options(parser, top=True)
    # prog given: else argparse builds a help formatter just to compute it, which
    # imports shutil (and bz2, lzma) on every run.
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND",
                                prog="jobctl", parser_class=_Parser)
    for command in COMMANDS:
        if full or command.name == only:
            _add_command(sub, command)
        else:
            sub.add_parser(command.name, help=command.help, add_help=False)
    # `jobctl cert` runs before this parser (its own, _cert); listed here, and in
    # full for the man page and the completion scripts.
    if full:
        from . import _cert

        _cert.configure(sub.add_parser("cert", help=CERT_HELP, description=_cert.DESCRIPTION,
                                       epilog=_cert.EPILOG, formatter_class=_Formatter))
    else:
        sub.add_parser("cert", add_help=False, help=CERT_HELP)
    return parser


def _add_command(sub: argparse._SubParsersAction[_Parser], command: Command) -> None:
    sp = sub.add_parser(command.name, help=command.help, description=command.description,
                        epilog="example:\n" + "\n".join(f"  {line}" for line in command.example),
                        formatter_class=_Formatter, allow_abbrev=False)
    command.configure(sp)
    add_global_options(sp, top=False)
    sp.set_defaults(action=command, subparser=sp)


# -- the entry point -----------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    """The command line. With ``argv`` (tests, embedding) it returns the exit
    status; without, it is the program itself and ends the process (:func:`_exit`).
    """
    status = _main(argv)
    if argv is None:
        _exit(status)
    return status


def _exit(status: int) -> NoReturn:
    """End the process now, skipping the interpreter's teardown.

    Freeing every module and object at exit costs about 10 ms, a sixth of
    `jobctl start true` (SPEC §6). jobctl needs none of it: it registers no
    atexit handlers, its socket is closed, and its only buffered files are
    stdout and stderr, flushed here.
    """
    for stream in (sys.stdout, sys.stderr):
        # OSError: the reader went away (a closed pipe): nothing more to say.
        with contextlib.suppress(OSError, ValueError):
            stream.flush()
    os._exit(status)


def split_address(address: str, port: int | None) -> tuple[str, int]:
    """``-a`` and ``-p`` as (host, port): ``-a`` may carry the port
    (``host:8000``, ``[::1]:8000``); a bare IPv6 literal (``::1``) may not.
    ``-p`` (or JOBCTL_PORT) wins over nothing, and must agree with ``-a``'s."""
    host, in_address = address, None
    if address.startswith("["):
        inner, bracket, rest = address[1:].partition("]")
        if not bracket or (rest and not rest.startswith(":")):
            raise ConfigError(f"-a/--address: not an address: {address!r} "
                              "(examples: ::1, [::1]:8000, localhost:8000)")
        host = inner
        if rest:
            in_address = _port_or_error(rest[1:])
    elif address.count(":") == 1:
        host, _, text = address.partition(":")
        in_address = _port_or_error(text)
    if not host:
        raise ConfigError(f"-a/--address: no host in {address!r}")
    if port is not None and in_address is not None and port != in_address:
        raise ConfigError(f"-a/--address says port {in_address}, -p/--port says {port}")
    if port is None:
        env = os.environ.get("JOBCTL_PORT")
        port = in_address or (_port_or_error(env, "JOBCTL_PORT") if env else core.DEFAULT_PORT)
    return host, port


def _port_or_error(text: str, what: str = "-a/--address") -> int:
    try:
        return _port(text)
    except argparse.ArgumentTypeError as exc:
        raise ConfigError(f"{what}: {exc}") from None


def _check_files(ns: argparse.Namespace) -> None:
    for option, what, flag, env in (
            ("certificate", "certificate", "-c/--certificate", "JOBCTL_CERTIFICATE"),
            ("key", "key", "-k/--key", "JOBCTL_KEY"),
            ("ca", "CA certificate", "-C/--certificate-authority", "JOBCTL_CA")):
        path = getattr(ns, option)
        if not path and option == "ca":
            continue  # issue 15: no CA at all: trust on first use (_trust)
        if not path:
            raise ConfigError(f"no {what}: use {flag}, {env} or {_config_dir()}/")
        if os.path.isdir(path):
            raise ConfigError(f"{flag}: {path} is a directory, not a {what} file")


def _unknown(parser: argparse.ArgumentParser, extras: list[str]) -> NoReturn:
    """Unknown words: the usage of the subcommand they were given to, and a close
    option (``--tial``: did you mean ``--tail``?)."""
    import difflib

    known = [o for action in parser._actions for o in action.option_strings]
    hints = []
    for word in extras:
        if word.startswith("-"):
            close = difflib.get_close_matches(word.partition("=")[0], known, n=1, cutoff=0.6)
            if close:
                hints.append(f"{word}: did you mean {close[0]}?")
    parser.error(f"unrecognized arguments: {' '.join(extras)}"
                 + (f" ({'; '.join(hints)})" if hints else ""))


def _main(argv: list[str] | None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if args and args[0] == "cert":  # issue 15: its own parser (and cryptography)
        from ._cert import main as cert_main

        return cert_main(args[1:])
    if not args:  # issue 23: no command at all is a question, not a mistake
        build_parser([]).print_help()
        return 0
    parser = build_parser(args)
    ns, extras = parser.parse_known_args(args)
    if extras:  # the subcommand's usage, and what was probably meant
        _unknown(getattr(ns, "subparser", parser), extras)
    command: Command = ns.action
    try:
        command.check(ns, ns.subparser)
        if command.needs_server and (ns.server or ns.identity):  # a profile, or a group
            from ._profiles import select

            targets = select(ns, parser)
            if targets is not None:
                from ._commands import start_args
                from ._fanout import run_cli

                start = start_args(ns) if ns.command in ("start", "run") else {}
                return run_cli(ns, targets, getattr(ns, "words", None), start, group=True)
        ctx = Context(ns, parser=build_parser)
        if command.needs_server:
            _check_files(ns)
            ctx.address, ctx.port = split_address(ns.address, ns.port)
        try:
            return command.run(ns, ctx)
        finally:
            ctx.close()
    except JobctlError as exc:
        lines = str(exc).splitlines() if exc.multiline else [str(exc)]
        print("\n".join(escape(line) for line in lines), file=sys.stderr)
        return exc.exit_status
    except BrokenPipeError:
        # Our own stdout went away (`jobctl stream 4 | head -1`): stop quietly.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 0
    except KeyboardInterrupt:
        return 130


__all__ = ["add_global_options", "build_parser", "main", "split_address"]
