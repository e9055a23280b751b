"""jobctl's subcommands: one :class:`Command` each, in :data:`COMMANDS`.

A command is its name, its one-line help, a description and an example for
its ``-h`` (and the man page), a function that adds its options to its
parser, and a function that runs it with a :class:`Context` (which connects
on first use). Adding a subcommand is adding an entry to :data:`COMMANDS`.
What prints output for people lives in ``_text``; what follows output
(``run``, ``stream``, ``wait``) in ``_follow``.
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from collections.abc import Callable

import protocol as p

from . import _core as core
from . import _text as text
from ._context import STATES as _STATES
from ._context import (
    BadValue,
    Context,
    filter_jobs,
    labels_of,
    list_columns,
    list_filters,
    print_json,
)
from ._errors import ConfigError

TYPE_CHECKING = False  # typing is not imported at run time (issue 26: start-up)
if TYPE_CHECKING:
    from typing import Any

#: The longest ``stop --grace`` the CLI accepts: a day between signals is
#: already more than any program needs to shut down; beyond it is a typo.
MAX_GRACE = 86400.0


class Command:
    """One subcommand (a plain class, not a dataclass: every run of jobctl
    defines it, and a dataclass costs half a millisecond to make)."""

    def __init__(self, name: str, help: str, description: str, example: tuple[str, ...],
                 configure: Callable[[argparse.ArgumentParser], None],
                 run: Callable[[argparse.Namespace, Context], int],
                 validate: Callable[[argparse.Namespace], None] | None = None, *,
                 needs_server: bool = True) -> None:
        self.name = name
        self.help = help
        self.description = description
        self.example = example
        self.configure = configure
        self.run = run
        #: Checks that need the whole namespace; a ConfigError is a usage error.
        self.validate = validate
        self.needs_server = needs_server

    def check(self, ns: argparse.Namespace, parser: argparse.ArgumentParser) -> None:
        """The checks argparse cannot make; a failure is a usage error (exit 2),
        a bad value (:class:`BadValue`) one line as argparse's own."""
        if self.validate is not None:
            try:
                self.validate(ns)
            except BadValue as exc:
                parser._bad_value = True  # type: ignore[attr-defined]
                parser.error(str(exc))
            except ConfigError as exc:
                parser.error(str(exc))


# -- argument types ------------------------------------------------------------------


def job_id(value: str) -> int:
    """A job ID: a non-negative integer the protocol allows (at most MAX_JOB_ID)."""
    if not value.isdecimal() or len(value) > 20 or int(value) > p.MAX_JOB_ID:
        raise argparse.ArgumentTypeError(f"not a job ID: {value!r}")
    return int(value)


def seconds(what: str, maximum: float) -> Callable[[str], float]:
    def parse(value: str) -> float:
        try:
            number = float(value)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not a number of seconds: {value!r}") from None
        if math.isnan(number):
            raise argparse.ArgumentTypeError(f"not a number of seconds: {value!r}")
        if number < 0:
            raise argparse.ArgumentTypeError(f"must be 0 or more seconds: {value!r}")
        if number > maximum:  # inf included
            raise argparse.ArgumentTypeError(f"must be at most {maximum:g} seconds: "
                                             f"{value!r}")
        return number
    return parse


def since(value: str) -> float:
    """A duration: ``90``, ``90s``, ``10m``, ``2h``, ``1h30m``, ``3d``; in seconds."""
    if value.startswith("-"):
        raise argparse.ArgumentTypeError(f"must not be negative: {value!r}")
    try:
        return p.parse_duration(value)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


#: The smallest ``--memory`` taken: below it no program starts, and a number
#: without its unit (``--memory 1``, meant as 1G) would be taken as bytes and
#: the job OOM-killed at once.
MIN_MEMORY = 1 << 20


def _limit(field: str, value: Any, text: str) -> None:
    """Check one limit by the protocol's own rules (``Limits`` and the start
    request's bounds, as jobd applies them): a bad value is this option's error,
    in the one style of bad values (``argument --X: PROBLEM: 'VALUE'``)."""
    try:
        p.Start(argv=(b"x",), limits=p.Limits(**{field: value}))  # its bounds, as jobd's
    except p.FieldError as exc:
        problem = str(exc)
        for prefix in (f"{field} ", f"{field}: "):
            problem = problem.removeprefix(prefix)
        raise argparse.ArgumentTypeError(f"{problem}: {text!r}") from None


def _size(value: str) -> int:
    """A size (``256M``)."""
    if value.startswith("-"):
        raise argparse.ArgumentTypeError(f"must be positive: {value!r}")
    try:
        return p.parse_size(value)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _memory(value: str) -> int:
    size = _size(value)
    _limit("memory", size, value)
    if size < MIN_MEMORY:
        digits = "".join(c for c in value if c.isdigit()).lstrip("0") or "1"
        unit = "G" if value.strip().isdecimal() and int(digits) <= 64 else "M"
        raise argparse.ArgumentTypeError(
            f"must be at least 1M: {value!r} is {size} byte{'s' * (size != 1)} "
            f"(did you mean {digits}{unit}?)")
    return size


def _rate(field: str) -> Callable[[str], tuple[str, int]]:
    def parse(value: str) -> tuple[str, int]:
        device, sep, rate = value.partition("=")
        if not sep or not device:
            raise argparse.ArgumentTypeError(f"expected DEVICE=RATE: {value!r}")
        pair = device, _size(rate)
        _limit(field, (pair,), value)
        return pair
    return parse


def _cpus(value: str) -> float:
    try:
        number = float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {value!r}") from None
    _limit("cpus", number, value)
    return number


def _pids(value: str) -> int:
    if not value.isdecimal() or len(value) > 30:
        raise argparse.ArgumentTypeError(f"not a whole number: {value!r}")
    _limit("pids", int(value), value)
    return int(value)


def _isolate(value: str) -> tuple[str, ...]:
    kinds = [k for k in value.split(",") if k]
    for kind in kinds:
        if kind not in p.ISOLATION_KINDS:
            raise argparse.ArgumentTypeError(
                f"unknown namespace {kind!r} (choose from {', '.join(sorted(p.ISOLATION_KINDS))})")
    return tuple(dict.fromkeys(kinds))


def _label(value: str) -> tuple[str, str]:
    """``KEY=VALUE``, within the protocol's label bounds."""
    key, sep, val = value.partition("=")
    if not sep:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE: {value!r}")
    try:
        p.check_label(key, val)
    except p.FieldError as exc:
        raise argparse.ArgumentTypeError(f"{exc}: {value!r}") from None
    return key, val


def _columns(value: str) -> tuple[str, ...]:
    columns = tuple(c.strip() for c in value.split(","))
    for column in columns:
        if column not in text.COLUMNS:
            raise argparse.ArgumentTypeError(
                f"unknown column {column!r} (columns: {', '.join(text.COLUMNS)}): {value!r}")
    return columns


def _env(value: str) -> tuple[str, str]:
    name, sep, val = value.partition("=")
    if not sep or not name:
        raise argparse.ArgumentTypeError(f"expected NAME=VALUE: {value!r}")
    return name, val


#: The most lines ``--tail`` keeps: more than any log has (memory holds them).
MAX_TAIL = 10**9


def _count(value: str) -> int:
    if not value.isdecimal():
        raise argparse.ArgumentTypeError(f"not a number of lines: {value!r}")
    if len(value) > 10 or int(value) > MAX_TAIL:
        raise argparse.ArgumentTypeError(f"must be at most {MAX_TAIL} lines: {value!r}")
    return int(value)


# -- start and run -------------------------------------------------------------------


def _input_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("-i", "--interactive", action="store_true",
                        help="keep the job's stdin open for input (run: ours goes to it; "
                        "start: jobctl attach sends it)")
    parser.add_argument("-t", "--tty", action="store_true",
                        help="run the job on a pseudo-terminal of our terminal's size and "
                        "$TERM (implies -i)")


def _detach_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--detach-keys", metavar="KEYS", default=None,
                        help="the keys that detach, leaving the job running (default: "
                        "$JOBCTL_DETACH_KEYS, else ctrl-],d; empty: none)")


def _start_options(parser: argparse.ArgumentParser) -> None:
    _input_options(parser)
    parser.add_argument("--memory", type=_memory, metavar="SIZE",
                        help="memory limit (e.g. 256M; at least 1M)")
    parser.add_argument("--cpus", type=_cpus, metavar="N", help="CPU limit in cores (e.g. 0.5)")
    parser.add_argument("--pids", type=_pids, metavar="N", help="maximum number of processes")
    parser.add_argument("--io-read-bps", type=_rate("io_read_bps"), action="append", default=[],
                        metavar="DEV=RATE",
                        help="read limit on a block device (e.g. /dev/sda=10M), repeatable")
    parser.add_argument("--io-write-bps", type=_rate("io_write_bps"), action="append", default=[],
                        metavar="DEV=RATE", help="write limit on a block device, repeatable")
    parser.add_argument("--isolate", type=_isolate, default=(), metavar="LIST",
                        help="namespaces to isolate the job in: any of pid,mount,net")
    parser.add_argument("--cwd", metavar="DIR",
                        help="the job's working directory (default: the server's)")
    parser.add_argument("--env", type=_env, action="append", default=[], metavar="NAME=VALUE",
                        help="set a variable in the job's environment, repeatable")
    parser.add_argument("--clear-env", action="store_true",
                        help="start from an empty environment (only the --env variables)")
    parser.add_argument("--label", type=_label, action="append", default=[],
                        metavar="KEY=VALUE",
                        help=f"a label on the job, shown by status -v and list, filtered on "
                        f"by list --label; repeatable, at most {p.MAX_LABELS} (protocol 1.2)")
    parser.add_argument("words", nargs=argparse.REMAINDER, metavar="CMD [ARG...]",
                        help="the command and its arguments, passed verbatim")


def _validate_start(ns: argparse.Namespace) -> None:
    words = list(ns.words)
    if words and words[0] == "--":
        words = words[1:]
    if not words:
        raise ConfigError("missing command")
    ns.words = words
    start_args(ns)  # what the options say together (e.g. too many devices)


def start_args(ns: argparse.Namespace) -> dict[str, Any]:
    """The keyword arguments of ``client.start`` that ``start``/``run``'s options say."""
    try:
        limits = p.Limits(memory=ns.memory, cpus=ns.cpus, pids=ns.pids,
                          io_read_bps=tuple(ns.io_read_bps),
                          io_write_bps=tuple(ns.io_write_bps), isolate=tuple(ns.isolate))
        p.Start(argv=(b"x",), limits=limits)  # the request's bounds (device counts)
    except p.FieldError as exc:  # e.g. more devices than the protocol takes
        option = next((o for f, o in (("io_read_bps", "--io-read-bps"),
                                      ("io_write_bps", "--io-write-bps"))
                       if str(exc).startswith(f)), "--isolate")
        raise BadValue(f"argument {option}: {exc}") from None
    env: dict[str, str] | None = None
    if ns.clear_env or ns.env:
        # --env adds to (overrides in) the server's environment for jobs, never
        # this shell's; with --clear-env, the --env variables are all there is.
        env = dict(ns.env)
    tty = None
    if getattr(ns, "tty", False):
        from ._interactive import local_terminal

        tty = local_terminal()
    return {"cwd": ns.cwd, "env": env, "env_merge": bool(ns.env) and not ns.clear_env,
            "limits": None if limits.is_empty() else limits, "labels": labels_of(ns),
            "stdin": bool(getattr(ns, "interactive", False)) or tty is not None, "tty": tty}


def cmd_start(ns: argparse.Namespace, ctx: Context) -> int:
    status = ctx.client.start(ns.words, **start_args(ns))
    if ns.json:
        print_json(status.to_json())
    else:
        print(status.id, flush=True)
    if status.state is p.JobState.ERROR:
        print(text.describe(status), file=sys.stderr)
        return 1
    return 0


def cmd_run(ns: argparse.Namespace, ctx: Context) -> int:
    from ._follow import run

    return run(ns, ctx, start_args(ns))


def _run_options(parser: argparse.ArgumentParser) -> None:
    group = parser.add_mutually_exclusive_group()
    group.add_argument("--stop-on-interrupt", dest="on_interrupt", action="store_const",
                       const="stop", help="Ctrl-C stops the job (and waits for its end)")
    group.add_argument("--detach-on-interrupt", dest="on_interrupt", action="store_const",
                       const="detach", help="Ctrl-C leaves the job running and prints its ID")
    parser.add_argument("--timestamps", action="store_true",
                        help="prefix each line with the time jobd read it")
    _detach_option(parser)
    _reconnect_option(parser)
    _start_options(parser)


# -- status, stop, delete, list ------------------------------------------------------


def cmd_status(ns: argparse.Namespace, ctx: Context) -> int:
    status = ctx.client.status(ns.id)
    if ns.json:
        print_json(status.to_json())
    elif ns.long:
        print("\n".join(text.status_long(status, time.time())))
    else:
        print(text.describe(status))
    return 0


def cmd_stop(ns: argparse.Namespace, ctx: Context) -> int:
    progress = None
    if sys.stderr.isatty():
        grace = "the server's grace period" if ns.grace is None else f"{ns.grace:g} s"

        def progress() -> None:
            print(f"jobctl: stopping job {ns.id}: SIGINT sent; SIGTERM then SIGKILL follow, "
                  f"{grace} apart, while it runs…", file=sys.stderr, flush=True)

    status = ctx.client.stop(ns.id, ns.grace, progress=progress)
    print_json(status.to_json()) if ns.json else print("process stopped")
    return 0


def cmd_delete(ns: argparse.Namespace, ctx: Context) -> int:
    ctx.client.delete(ns.id)
    if ns.json:
        print_json({"deleted": ns.id})
    return 0




def cmd_list(ns: argparse.Namespace, ctx: Context) -> int:
    now = time.time()
    client = ctx.client
    filters = list_filters(ns, now)
    if client.welcome.minor >= core.LIST_FILTERS_MINOR or filters["labels"]:
        jobs = client.list(**filters)  # the server filters, from its indexes
    else:  # an older server: every page, filtered here
        jobs = filter_jobs(client.list(), filters)
    if ns.json:
        print_json({"jobs": [s.to_json() for s in jobs]})
        return 0
    columns = list_columns(ns, jobs)
    rows = [text.list_row(s, now, columns) for s in jobs]
    header = [text.COLUMNS[c][0] for c in columns]
    lines = text.table(rows, header=header if sys.stdout.isatty() and not ns.quiet else None)
    if lines:
        print("\n".join(lines))
    return 0


def _list_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--state", choices=sorted(_STATES), action="append",
                        help="only jobs in this state (ended: any but running); "
                        "repeat for any of several")
    parser.add_argument("--owner", metavar="NAME", help="only jobs this identity started")
    parser.add_argument("--since", type=since, metavar="DURATION",
                        help="only jobs created within DURATION (90s, 10m, 2h, 3d)")
    parser.add_argument("--label", type=_label, action="append", default=[],
                        metavar="KEY=VALUE",
                        help="only jobs with this label (the server filters; protocol 1.2); "
                        "repeat for jobs with all of them")
    shown = parser.add_mutually_exclusive_group()
    shown.add_argument("-q", "--quiet", action="store_true",
                       help="only the job IDs, one per line (for scripts)")
    shown.add_argument("--format", type=_columns, metavar="COLUMNS",
                       help=f"the columns to show, comma-separated, of: {', '.join(text.COLUMNS)} "
                       f"(default: {','.join(text.DEFAULT_COLUMNS)})")


# -- output --------------------------------------------------------------------------


def cmd_stream(ns: argparse.Namespace, ctx: Context) -> int:
    from ._follow import stream

    return stream(ns, ctx, follow=ns.command == "stream" and not ns.no_follow)


def cmd_wait(ns: argparse.Namespace, ctx: Context) -> int:
    from ._follow import wait

    return wait(ns, ctx)


def cmd_completion(ns: argparse.Namespace, ctx: Context) -> int:
    from ._completion import script, server_names

    if ns.server_names or ns.identity_names:
        names = server_names(identities=ns.identity_names)
        if names:
            print("\n".join(names))
        return 0
    assert ctx.parser is not None, "the command line gives the completion its parser"
    sys.stdout.write(script(ns.shell, ctx.parser()))
    return 0


def _validate_completion(ns: argparse.Namespace) -> None:
    if (ns.shell is None) == (not ns.server_names and not ns.identity_names) or \
            (ns.server_names and ns.identity_names):
        raise ConfigError("give a shell (bash, zsh, fish), --server-names or --identity-names")


def _id(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("id", type=job_id, metavar="ID", help="the job's ID")


def point_in_time(value: str) -> float:
    """``--since``: a duration ago (``10m``, ``2h``, ``1h30m``) or a time in RFC 3339
    (``2026-12-07T18:00:00Z``, ``2026-12-07T19:00:00+01:00``; without an offset, local
    time); as a Unix time."""
    import datetime

    if value[:1].isdigit() and not any(c in value for c in "-:T"):
        return time.time() - since(value)
    try:
        when = datetime.datetime.fromisoformat(value)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"not a duration or an RFC 3339 time: {value!r} (examples: 10m, 2h, "
            "2026-12-07T18:00:00Z)") from None
    return when.timestamp()


def _reconnect_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--reconnect-timeout", type=seconds("--reconnect-timeout",
                                                            core.MAX_TIMEOUT),
                        metavar="SECONDS", default=core.RECONNECT_TIMEOUT,
                        help="when the connection breaks, reconnect with backoff and resume "
                        "where it broke, for up to SECONDS without the server (default: "
                        f"{core.RECONNECT_TIMEOUT:g}; 0: do not reconnect)")


def _stream_options(parser: argparse.ArgumentParser, *, follow: bool) -> None:
    if follow:
        parser.add_argument("--no-follow", action="store_true",
                            help="only the output that exists now (as `output`)")
        _reconnect_option(parser)
    else:
        parser.set_defaults(no_follow=True)
    parser.add_argument("--tail", type=_count, metavar="N",
                        help="only the last N lines of what exists now" +
                        (", then follow" if follow else ""))
    parser.add_argument("--timestamps", action="store_true",
                        help="prefix each line with the time jobd read it (UTC)")
    parser.add_argument("--since", type=point_in_time, metavar="TIME",
                        help="only output jobd read at or after TIME: a duration ago (10m, "
                        "2h) or an RFC 3339 time (2026-12-07T18:00:00Z); protocol 1.1")
    which = parser.add_mutually_exclusive_group()
    which.add_argument("--stdout", dest="only_fd", action="store_const", const=1,
                       help="only the job's stdout")
    which.add_argument("--stderr", dest="only_fd", action="store_const", const=2,
                       help="only the job's stderr")
    parser.add_argument("--asciicast", action="store_true",
                        help="write asciicast v2 (asciinema's format), with the times jobd "
                        "read each piece of output, and the terminal's resizes")
    _id(parser)


def _attach_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--read-only", action="store_true",
                        help="only watch: send no input (observe certificates always do)")
    parser.add_argument("--all", action="store_true",
                        help="replay the whole output first, not only the recent part")
    _detach_option(parser)
    _id(parser)


def cmd_attach(ns: argparse.Namespace, ctx: Context) -> int:
    from ._follow import attach

    return attach(ns, ctx)


def _stop_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--grace", type=seconds("--grace", MAX_GRACE), metavar="SECONDS",
                        help="wait between signals (default: the server's; 0: SIGKILL at once)")
    _id(parser)


def _status_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("-v", "--long", "--verbose", action="store_true",
                        help="every field of the status, one per line")
    _id(parser)


def _wait_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--timeout", type=seconds("--timeout", core.MAX_TIMEOUT),
                        metavar="SECONDS", help="give up after SECONDS (exit status 124)")
    _reconnect_option(parser)
    parser.add_argument("ids", type=job_id, nargs="+", metavar="ID", help="the jobs' IDs")


def _prune_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--older-than", required=True, type=since, metavar="DURATION",
                        help="ended more than this long ago (30d, 12h, 90m, 1h30m, 3600)")


def cmd_rerun(ns: argparse.Namespace, ctx: Context) -> int:
    status = ctx.client.rerun(ns.id)
    if ns.json:
        print_json(status.to_json())
    else:
        print(status.id, flush=True)
    if status.state is p.JobState.ERROR:
        print(text.describe(status), file=sys.stderr)
        return 1
    return 0


def cmd_prune(ns: argparse.Namespace, ctx: Context) -> int:
    removed = ctx.client.prune(ns.older_than)
    if ns.json:
        print_json({"removed": removed})
    else:
        print(f"removed {removed} finished jobs")
    return 0


def _config_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("what", metavar="ACTION", choices=("migrate",),
                        help="migrate: rewrite config.toml with identities apart from servers")
    parser.add_argument("--write", action="store_true",
                        help="replace the file (the old one stays as config.toml.bak) "
                        "instead of printing the new one")


def cmd_config(ns: argparse.Namespace, ctx: Context) -> int:
    from ._profiles import config_path, migrate

    sys.stdout.write(migrate(config_path(), write=ns.write))
    return 0


def _completion_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("shell", nargs="?", choices=("bash", "zsh", "fish"), help="the shell")
    parser.add_argument("--server-names", action="store_true",
                        help="print the server and group names of config.toml instead "
                        "(what the scripts complete -s with)")
    parser.add_argument("--identity-names", action="store_true",
                        help="print the identity names of config.toml instead (for -i)")


COMMANDS: list[Command] = [
    Command("run", "start a command and follow its output; exit with its status",
            "Start CMD as a job, write its stdout and stderr from the first byte as it "
            "runs, and exit with the job's own status: its exit code, 128+N if signal N "
            "ended it, 1 if it never ran. Ctrl-C asks whether to stop the job (on a "
            "terminal); elsewhere it detaches and prints the job ID, unless "
            "--stop-on-interrupt or --detach-on-interrupt says otherwise. With -i, stdin "
            "goes to the job (exact bytes; EOF closes the job's stdin). With -t the job "
            "runs on a pseudo-terminal: your terminal goes raw, every key (Ctrl-C too) goes "
            "to the job, window size changes follow, and the detach keys (Ctrl-] then d) "
            "leave it running. Options come before the command; the command begins at the "
            "first word that is not one of them (`--` forces it).",
            ("jobctl run --memory 1G make -j4", "jobctl run --stop-on-interrupt -- ./long-task",
             "tar c dir | jobctl run -i tar x -C /dst", "jobctl run -t bash",
             "jobctl run --label build=nightly make test"),
            _run_options, cmd_run, _validate_start),
    Command("attach", "attach to a running job: its output, and your keys as its input",
            "Show the job's recent output (--all: all of it), then follow it live. If the "
            "job was started with -i or -t and your certificate may type into it (its "
            "owner, or admin), what you type goes to the job: on a terminal job your "
            "terminal goes raw, so Ctrl-C reaches the job. Several people may attach at "
            "once; observe certificates and --read-only only watch. The detach keys "
            "(Ctrl-] then d by default) leave the job running. Exits with the job's "
            "status when it ends.",
            ("jobctl attach 4", "jobctl attach --read-only --all 4"),
            _attach_options, cmd_attach),
    Command("start", "start CMD [ARG...] in the background; prints the job ID",
            "Start CMD as a job and print its ID. With -i its stdin stays open and with "
            "-t it runs on a pseudo-terminal: jobctl attach ID types into it. Options "
            "come before the command; the command begins at the first word that is not "
            "one of them (`--` forces it), and everything after it is passed verbatim.",
            ("jobctl start --cpus 0.5 --env LANG=C.UTF-8 ./backup.sh --full",
             "jobctl start -- ls -la"),
            _start_options, cmd_start, _validate_start),
    Command("wait", "wait until jobs end; exit with the first one's status",
            "Block until every job named has ended, print each one's status line (in the "
            "order given), and exit with the first job's status as run does. With "
            "--timeout, give up after that many seconds with exit status 124.",
            ("jobctl wait 4 5 && echo both done", "jobctl wait --timeout 60 4"),
            _wait_options, cmd_wait),
    Command("status", "print a job's status",
            "Print the job's status: running, exited: N, stopped, killed: SIGNAME or "
            "error: MESSAGE. With -v, every field of it.",
            ("jobctl status 4", "jobctl status -v 4"), _status_options, cmd_status),
    Command("stream", "write a job's output from its first byte, following it",
            "Write the job's stdout to stdout and its stderr to stderr, byte for byte, "
            "from its first byte, following live output until the job ends. A terminal "
            "job's output is what its terminal showed; --asciicast writes it as an "
            "asciinema recording, timed as jobd read it.",
            ("jobctl stream 4", "jobctl stream --tail 20 --timestamps 4",
             "jobctl stream --asciicast 4 > session.cast",
             "jobctl stream --stderr --since 10m 4"),
            lambda sp: _stream_options(sp, follow=True), cmd_stream),
    Command("output", "write a job's output so far",
            "Write the job's output that exists now, without following it.",
            ("jobctl output 4 > build.log", "jobctl output --tail 5 4"),
            lambda sp: _stream_options(sp, follow=False), cmd_stream),
    Command("stop", "stop a job: SIGINT, SIGTERM, SIGKILL to its group",
            "Stop the job: SIGINT, then SIGTERM, then SIGKILL to its whole process group, "
            "--grace seconds apart; prints `process stopped` once every process is gone.",
            ("jobctl stop 4", "jobctl stop --grace 0 4"), _stop_options, cmd_stop),
    Command("list", "list the jobs you may see",
            "One line per job: ID, owner, status, created, duration, command, and labels "
            "when a job has some (or the columns --format names; -q: the IDs alone); with a "
            "header on a terminal, tab-separated otherwise. Control characters in "
            "owners and commands are escaped; --json gives the exact values.",
            ("jobctl list --state running", "jobctl list --owner alice --since 2h",
             "jobctl list -q --label env=prod", "jobctl list --format id,status,labels"),
            _list_options, cmd_list),
    Command("rerun", "start a job again, as a new job; prints its ID",
            "Start a new job with the same command, working directory, environment (as "
            "its start gave it), requested limits and labels as job ID, and print the new "
            "job's ID. Your own jobs; an admin's any. The job may be running or ended. "
            "Needs a server of protocol 1.2.",
            ("jobctl rerun 4", "jobctl wait $(jobctl rerun 4)"), _id, cmd_rerun),
    Command("delete", "remove a finished job's record and output",
            "Remove an ended job's record and its output. A running job must be stopped "
            "first.",
            ("jobctl delete 4",), _id, cmd_delete),
    Command("prune", "remove finished jobs older than a duration (admin)",
            "Remove every finished job that ended more than DURATION ago, with its "
            "output, and print how many went. Admin certificates only; jobd's "
            "--retain, --retain-count and --max-log-space do the same continuously.",
            ("jobctl prune --older-than 30d",), _prune_options, cmd_prune),
    Command("config", "migrate config.toml to identities apart from servers",
            "Rewrite config.toml (JOBCTL_CONFIG, or $XDG_CONFIG_HOME/jobctl/config.toml) "
            "from the format where each server carries its certificate and key: each "
            "distinct certificate and key becomes an [identities.NAME] table, servers name "
            "theirs, and profiles of one server under several identities become one server "
            "and `like` entries, so that `-s all` asks each server once. Prints the new "
            "file; --write replaces it (keeping config.toml.bak).",
            ("jobctl config migrate", "jobctl config migrate --write"),
            _config_options, cmd_config, needs_server=False),
    Command("completion", "print a shell completion script (bash, zsh, fish)",
            "Print the completion script for SHELL. Job IDs complete from `jobctl list` "
            "on the server (or group) the command line names, in numeric order; -s "
            "completes the servers and groups of config.toml.",
            ("source <(jobctl completion bash)",
             "jobctl completion fish > ~/.config/fish/completions/jobctl.fish"),
            _completion_options, cmd_completion, _validate_completion, needs_server=False),
]
