"""The ``jobctl`` command line (SPEC §2).

Exit status: 0 success; 1 the server refused or the job is in the wrong
state; 2 usage or local configuration; 3 cannot connect, or refused at TLS
or identity level. Every expected failure is one line on stderr.

Start-up time is part of the product (SPEC §6: `jobctl start true` at most a
quarter of `ssh localhost true`), so this module imports only what every
command needs; json, shlex and jobd's size parser are imported by the
commands that use them, and Trio never (``python -X importtime -m jobctl``).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, NoReturn

import protocol as p

from . import __version__
from . import _core as core
from ._blocking import BlockingClient, connect_blocking
from ._errors import ConfigError, JobctlError

START_HELP = """\
start options (before the command; the command begins at the first word that
is not one of them, `--` forces it):
  --memory SIZE            memory limit (e.g. 256M)
  --cpus N                 CPU limit in cores (e.g. 0.5)
  --pids N                 maximum number of processes
  --io-read-bps DEV=RATE   read limit on a block device (e.g. /dev/sda=10M), repeatable
  --io-write-bps DEV=RATE  write limit on a block device, repeatable
  --isolate LIST           namespaces: any of pid,mount,net

environment: JOBCTL_CERTIFICATE, JOBCTL_KEY, JOBCTL_CA, JOBCTL_ADDRESS,
JOBCTL_PORT, JOBCTL_SERVER_NAME; the certificate files default to
certificate.pem, key.pem and ca.pem in $XDG_CONFIG_HOME/jobctl/.
exit status: 0 ok, 1 refused by the server or wrong job state, 2 usage,
3 cannot connect or refused at TLS or identity level."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        self.print_usage(sys.stderr)
        self.exit(2, f"{self.prog}: error: {message}\n")


def _config_dir() -> Path:
    base = os.environ.get("XDG_CONFIG_HOME") or str(Path.home() / ".config")
    return Path(base) / "jobctl"


def _default_file(env: str, name: str) -> str | None:
    if os.environ.get(env):
        return os.environ[env]
    candidate = _config_dir() / name
    return str(candidate) if candidate.exists() else None


def _job_id(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a job ID: {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"not a job ID: {text!r}")
    return value


def _port(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a port: {text!r}") from None
    if not 0 < value < 65536:
        raise argparse.ArgumentTypeError(f"port out of range: {text}")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="jobctl", description="Control jobs on a jobd server.",
                     epilog=START_HELP, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action="version", version=f"jobctl {__version__}")
    parser.add_argument("-c", "--certificate", default=_default_file(
        "JOBCTL_CERTIFICATE", "certificate.pem"), help="client certificate (PEM)")
    parser.add_argument("-k", "--key", default=_default_file("JOBCTL_KEY", "key.pem"),
                        help="client private key (PEM)")
    parser.add_argument("-C", "--certificate-authority", dest="ca",
                        default=_default_file("JOBCTL_CA", "ca.pem"),
                        help="CA certificate the server's certificate must chain to")
    parser.add_argument("-a", "--address",
                        default=os.environ.get("JOBCTL_ADDRESS") or core.DEFAULT_ADDRESS,
                        help="server address (default: %(default)s)")
    parser.add_argument("-p", "--port", type=_port,
                        default=os.environ.get("JOBCTL_PORT") or core.DEFAULT_PORT,
                        help="server port (default: %(default)s)")
    parser.add_argument("--server-name", default=os.environ.get("JOBCTL_SERVER_NAME"),
                        help="name to verify in the server certificate (default: the address)")
    parser.add_argument("--json", action="store_true",
                        help="print one JSON object (start, status, stop, list, delete, prune)")
    # prog given: else argparse builds a help formatter just to compute it, which
    # imports shutil (and bz2, lzma) on every run.
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND", prog="jobctl",
                                parser_class=_Parser)
    start = sub.add_parser("start", help="start CMD [ARG...]; prints the job ID",
                           add_help=False, prefix_chars="\0")
    start.add_argument("words", nargs=argparse.REMAINDER)
    for name, text in (("status", "print the job's status"),
                       ("stream", "write the job's output from its first byte, following it"),
                       ("output", "write the job's output so far"),
                       ("delete", "remove a finished job's record and output")):
        sp = sub.add_parser(name, help=text)
        sp.add_argument("id", type=_job_id)
    stop = sub.add_parser("stop", help="stop a job: SIGINT, SIGTERM, SIGKILL to its group")
    stop.add_argument("--grace", type=float, default=None, metavar="SECONDS",
                      help="wait between signals (default: the server's; 0: SIGKILL at once)")
    stop.add_argument("id", type=_job_id)
    _add_list_filters(sub.add_parser("list", help="list the jobs you may see"))
    _add_prune(sub)
    return parser


# -- list filters and prune (admin): self-contained, so that they merge with CLI
# rewrites ----------------------------------------------------------------------


def _add_list_filters(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--owner", help="only this owner's jobs")
    parser.add_argument("--state", action="append", choices=[s.value for s in p.JobState],
                        help="only jobs in this state (repeatable)")
    parser.add_argument("--since", type=_duration, metavar="DURATION",
                        help="only jobs started in the last DURATION (e.g. 1h, 2d)")


def _list_filters(ns: argparse.Namespace) -> dict[str, Any]:
    """The filters given (none: a plain list, which any server version answers)."""
    out: dict[str, Any] = {}
    if ns.owner is not None:
        out["owner"] = ns.owner
    if ns.state:
        out["states"] = [p.JobState(s) for s in ns.state]
    if ns.since is not None:
        out["since"] = time.time() - ns.since
    return out



def _add_prune(sub: Any) -> None:
    prune = sub.add_parser("prune", help="remove finished jobs older than a duration "
                           "(admin)")
    prune.add_argument("--older-than", required=True, type=_duration, metavar="DURATION",
                       help="ended more than this long ago (e.g. 30d, 12h, 90m, 3600)")


def _duration(text: str) -> float:
    from jobd._config import parse_duration

    try:
        return parse_duration(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _run_prune(ns: argparse.Namespace, client: BlockingClient) -> int:
    removed = client.prune(ns.older_than)
    if ns.json:
        _print_json({"removed": removed})
    else:
        print(f"removed {removed} finished jobs")
    return 0


# -- start options -----------------------------------------------------------


def _rate(option: str, text: str) -> tuple[str, int]:
    device, sep, rate = text.partition("=")
    if not sep or not device:
        raise ConfigError(f"{option}: expected DEVICE=RATE, got {text!r}")
    return device, _size(option, rate)


def _size(option: str, text: str) -> int:
    from jobd._config import parse_size

    try:
        value = parse_size(text)
    except ValueError as exc:
        raise ConfigError(f"{option}: {exc}") from None
    if value <= 0:
        raise ConfigError(f"{option}: must be positive")
    return value


def _number(option: str, text: str, kind: Callable[[str], Any]) -> Any:
    try:
        value = kind(text)
    except ValueError:
        raise ConfigError(f"{option}: not a number: {text!r}") from None
    if value <= 0:
        raise ConfigError(f"{option}: must be positive")
    return value


_START_OPTIONS = ("--memory", "--cpus", "--pids", "--io-read-bps", "--io-write-bps", "--isolate")


def parse_start(words: list[str]) -> tuple[list[str], p.Limits | None]:
    """Split ``start``'s words into limits and the command (SPEC §8)."""
    limits: dict[str, Any] = {"io_read_bps": [], "io_write_bps": [], "isolate": []}
    i = 0
    while i < len(words):
        word = words[i]
        if word == "--":
            i += 1
            break
        name, eq, inline = word.partition("=")
        if name not in _START_OPTIONS:
            break
        if eq:
            value = inline
            i += 1
        else:
            if i + 1 >= len(words):
                raise ConfigError(f"{name} needs a value")
            value = words[i + 1]
            i += 2
        if name == "--memory":
            limits["memory"] = _size(name, value)
        elif name == "--cpus":
            limits["cpus"] = _number(name, value, float)
        elif name == "--pids":
            limits["pids"] = _number(name, value, int)
        elif name in ("--io-read-bps", "--io-write-bps"):
            limits[name[2:].replace("-", "_")].append(_rate(name, value))
        else:
            for kind in filter(None, value.split(",")):
                if kind not in p.ISOLATION_KINDS:
                    raise ConfigError(f"--isolate: unknown namespace {kind!r} "
                                      f"(choose from {', '.join(sorted(p.ISOLATION_KINDS))})")
                if kind not in limits["isolate"]:
                    limits["isolate"].append(kind)
    command = words[i:]
    for key in ("io_read_bps", "io_write_bps", "isolate"):
        limits[key] = tuple(limits[key])
    try:
        result = p.Limits(**limits)
    except p.FieldError as exc:  # e.g. --cpus inf
        raise ConfigError(f"start: {exc}") from None
    return command, None if result.is_empty() else result


# -- commands ----------------------------------------------------------------


def _print_json(obj: Any) -> None:
    import json

    print(json.dumps(obj, sort_keys=True))


def _command_line(status: p.JobStatus) -> str:
    import shlex

    return shlex.join(os.fsdecode(a) for a in status.argv)


def _write_all(fd: int, data: bytes | memoryview) -> None:
    view = memoryview(data)
    while view:
        written = os.write(fd, view)
        view = view[written:]


def _write_output(events: Iterator[p.OutputChunk | p.End]) -> int:
    end: p.End | None = None
    for event in events:
        if isinstance(event, p.OutputChunk):
            _write_all(event.fd, event.data)
        else:
            end = event
    if end is not None and end.status.dropped_bytes:
        print(f"jobctl: output truncated: {end.status.dropped_bytes} bytes dropped by the server",
              file=sys.stderr)
    return 0


def run_command(ns: argparse.Namespace, client: BlockingClient,
                command: list[str] | None, limits: p.Limits | None) -> int:
    if ns.command == "start":
        assert command is not None
        try:
            status = client.start(command, limits=limits)
        except p.FieldError as exc:  # refused before sending: too long, too many devices...
            raise ConfigError(f"start: {exc}") from None
        if ns.json:
            _print_json(status.to_json())
        else:
            print(status.id, flush=True)
        if status.state is p.JobState.ERROR:
            print(status.describe(), file=sys.stderr)
            return 1
        return 0
    if ns.command == "status":
        status = client.status(ns.id)
        _print_json(status.to_json()) if ns.json else print(status.describe())
        return 0
    if ns.command == "stop":
        status = client.stop(ns.id, ns.grace)
        _print_json(status.to_json()) if ns.json else print("process stopped")
        return 0
    if ns.command == "list":
        jobs = client.list(**_list_filters(ns))
        if ns.json:
            _print_json({"jobs": [s.to_json() for s in jobs]})
        else:
            for s in jobs:
                print(f"{s.id}\t{s.owner}\t{s.describe()}\t{_command_line(s)}")
        return 0
    if ns.command == "delete":
        client.delete(ns.id)
        if ns.json:
            _print_json({"deleted": ns.id})
        return 0
    if ns.command == "stream":
        return _write_output(client.stream(ns.id))
    if ns.command == "output":
        return _write_output(client.output(ns.id))
    if ns.command == "prune":
        return _run_prune(ns, client)
    raise AssertionError(ns.command)


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


def _main(argv: list[str] | None) -> int:
    parser = build_parser()
    ns = parser.parse_args(argv)
    try:
        command, limits = None, None
        if ns.command == "start":
            command, limits = parse_start(ns.words)
            if not command:
                parser.error("start: missing command")
        for option, flag in (("certificate", "-c/--certificate"), ("key", "-k/--key"),
                             ("ca", "-C/--certificate-authority")):
            if not getattr(ns, option):
                raise ConfigError(f"no {option.replace('ca', 'CA certificate')}: use {flag}, "
                                  f"JOBCTL_{option.upper()} or {_config_dir()}/")
        with connect_blocking(ns.address, int(ns.port), certificate=ns.certificate,
                              key=ns.key, ca=ns.ca, server_name=ns.server_name) as client:
            return run_command(ns, client, command, limits)
    except JobctlError as exc:
        print(exc, file=sys.stderr)
        return exc.exit_status
    except BrokenPipeError:
        # Our own stdout went away (`jobctl stream 4 | head -1`): stop quietly.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 0
    except KeyboardInterrupt:
        return 130
