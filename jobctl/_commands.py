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
from typing import Any

import protocol as p

from . import _core as core
from . import _text as text
from ._context import STATES as _STATES
from ._context import Context, print_json
from ._errors import ConfigError

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
        """The checks argparse cannot make; a failure is a usage error (exit 2)."""
        if self.validate is not None:
            try:
                self.validate(ns)
            except ConfigError as exc:
                parser.error(str(exc))


# -- argument types ------------------------------------------------------------------


def job_id(value: str) -> int:
    """A job ID: a non-negative integer that fits the wire (uint64)."""
    if not value.isdecimal() or len(value) > 20 or int(value) >= 1 << 64:
        raise argparse.ArgumentTypeError(f"not a job ID: {value!r}")
    return int(value)


def seconds(what: str, maximum: float) -> Callable[[str], float]:
    def parse(value: str) -> float:
        try:
            number = float(value)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not a number of seconds: {value!r}") from None
        if not math.isfinite(number) or number < 0:
            raise argparse.ArgumentTypeError(f"must be 0 or more seconds: {value!r}")
        if number > maximum:
            raise argparse.ArgumentTypeError(f"must be at most {maximum:g} seconds: "
                                             f"{value!r}")
        return number
    return parse


def since(value: str) -> float:
    """A duration: ``90``, ``90s``, ``10m``, ``2h``, ``1h30m``, ``3d``; in seconds."""
    try:
        return p.parse_duration(value)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _size(value: str) -> int:
    """A size (``256M``); its range is the protocol's to check (``Limits``, ``Start``)."""
    try:
        return p.parse_size(value)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _rate(value: str) -> tuple[str, int]:
    device, sep, rate = value.partition("=")
    if not sep or not device:
        raise argparse.ArgumentTypeError(f"expected DEVICE=RATE, got {value!r}")
    return device, _size(rate)


def _cpus(value: str) -> float:
    """A number; its range (finite, above 0, a cap) is the protocol's to check."""
    try:
        return float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {value!r}") from None


def _pids(value: str) -> int:
    if not value.isdecimal() or len(value) > 30:
        raise argparse.ArgumentTypeError(f"not a whole number: {value!r}")
    return int(value)


def _isolate(value: str) -> tuple[str, ...]:
    kinds = [k for k in value.split(",") if k]
    for kind in kinds:
        if kind not in p.ISOLATION_KINDS:
            raise argparse.ArgumentTypeError(
                f"unknown namespace {kind!r} (choose from {', '.join(sorted(p.ISOLATION_KINDS))})")
    return tuple(dict.fromkeys(kinds))


def _env(value: str) -> tuple[str, str]:
    name, sep, val = value.partition("=")
    if not sep or not name:
        raise argparse.ArgumentTypeError(f"expected NAME=VALUE, got {value!r}")
    return name, val


def _count(value: str) -> int:
    if not value.isdecimal() or len(value) > 12:
        raise argparse.ArgumentTypeError(f"not a number of lines: {value!r}")
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
    parser.add_argument("--memory", type=_size, metavar="SIZE", help="memory limit (e.g. 256M)")
    parser.add_argument("--cpus", type=_cpus, metavar="N", help="CPU limit in cores (e.g. 0.5)")
    parser.add_argument("--pids", type=_pids, metavar="N", help="maximum number of processes")
    parser.add_argument("--io-read-bps", type=_rate, action="append", default=[],
                        metavar="DEV=RATE",
                        help="read limit on a block device (e.g. /dev/sda=10M), repeatable")
    parser.add_argument("--io-write-bps", type=_rate, action="append", default=[],
                        metavar="DEV=RATE", help="write limit on a block device, repeatable")
    parser.add_argument("--isolate", type=_isolate, default=(), metavar="LIST",
                        help="namespaces to isolate the job in: any of pid,mount,net")
    parser.add_argument("--cwd", metavar="DIR",
                        help="the job's working directory (default: the server's)")
    parser.add_argument("--env", type=_env, action="append", default=[], metavar="NAME=VALUE",
                        help="set a variable in the job's environment, repeatable")
    parser.add_argument("--clear-env", action="store_true",
                        help="start from an empty environment (only the --env variables)")
    parser.add_argument("words", nargs=argparse.REMAINDER, metavar="CMD [ARG...]",
                        help="the command and its arguments, passed verbatim")


def _validate_start(ns: argparse.Namespace) -> None:
    words = list(ns.words)
    if words and words[0] == "--":
        words = words[1:]
    if not words:
        raise ConfigError("missing command")
    ns.words = words


def start_args(ns: argparse.Namespace) -> dict[str, Any]:
    """The keyword arguments of ``client.start`` that ``start``/``run``'s options say."""
    try:
        limits = p.Limits(memory=ns.memory, cpus=ns.cpus, pids=ns.pids,
                          io_read_bps=tuple(ns.io_read_bps),
                          io_write_bps=tuple(ns.io_write_bps), isolate=tuple(ns.isolate))
    except p.FieldError as exc:  # e.g. more devices than the protocol takes
        raise ConfigError(f"{ns.command}: {exc}") from None
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
            "limits": None if limits.is_empty() else limits,
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
    states: set[p.JobState] = set().union(*(_STATES[name] for name in ns.state or ()))
    if client.welcome.minor >= core.LIST_FILTERS_MINOR:
        # The server filters, from its indexes (protocol 1.1).
        jobs = client.list(owner=ns.owner, states=sorted(states, key=lambda s: s.value),
                           since=None if ns.since is None else now - ns.since)
    else:  # an older server: every page, filtered here
        jobs = client.list()
        if states:
            jobs = [s for s in jobs if s.state in states]
        if ns.owner is not None:
            jobs = [s for s in jobs if s.owner == ns.owner]
        if ns.since is not None:
            jobs = [s for s in jobs if s.created >= now - ns.since]
    if ns.json:
        print_json({"jobs": [s.to_json() for s in jobs]})
        return 0
    rows = [(str(s.id), text.escape(s.owner), text.describe(s), text.clock(s.created),
             text.run_time(s, now), text.quote_argv(s.argv)) for s in jobs]
    header = ("ID", "OWNER", "STATUS", "CREATED", "DURATION", "COMMAND")
    lines = text.table(rows, header=header if sys.stdout.isatty() else None)
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


# -- output --------------------------------------------------------------------------


def cmd_stream(ns: argparse.Namespace, ctx: Context) -> int:
    from ._follow import stream

    return stream(ns, ctx, follow=ns.command == "stream" and not ns.no_follow)


def cmd_wait(ns: argparse.Namespace, ctx: Context) -> int:
    from ._follow import wait

    return wait(ns, ctx)


def cmd_completion(ns: argparse.Namespace, ctx: Context) -> int:
    from ._completion import script

    assert ctx.parser is not None, "the command line gives the completion its parser"
    sys.stdout.write(script(ns.shell, ctx.parser()))
    return 0


def _id(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("id", type=job_id, metavar="ID", help="the job's ID")


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
    parser.add_argument("--asciicast", action="store_true",
                        help="write asciicast v2 (asciinema's format), with the times jobd "
                        "read each piece of output")
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
    parser.add_argument("-v", "--long", action="store_true",
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


def cmd_prune(ns: argparse.Namespace, ctx: Context) -> int:
    removed = ctx.client.prune(ns.older_than)
    if ns.json:
        print_json({"removed": removed})
    else:
        print(f"removed {removed} finished jobs")
    return 0


def _completion_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("shell", choices=("bash", "zsh", "fish"), help="the shell")


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
             "tar c dir | jobctl run -i tar x -C /dst", "jobctl run -t bash"),
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
             "jobctl stream --asciicast 4 > session.cast"),
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
            "One line per job: ID, owner, status, created, duration, command; with a "
            "header on a terminal, tab-separated otherwise. Control characters in "
            "owners and commands are escaped; --json gives the exact values.",
            ("jobctl list --state running", "jobctl list --owner alice --since 2h"),
            _list_options, cmd_list),
    Command("delete", "remove a finished job's record and output",
            "Remove an ended job's record and its output. A running job must be stopped "
            "first.",
            ("jobctl delete 4",), _id, cmd_delete),
    Command("prune", "remove finished jobs older than a duration (admin)",
            "Remove every finished job that ended more than DURATION ago, with its "
            "output, and print how many went. Admin certificates only; jobd's "
            "--retain, --retain-count and --max-log-space do the same continuously.",
            ("jobctl prune --older-than 30d",), _prune_options, cmd_prune),
    Command("completion", "print a shell completion script (bash, zsh, fish)",
            "Print the completion script for SHELL; job IDs complete from `jobctl list`.",
            ("source <(jobctl completion bash)",
             "jobctl completion fish > ~/.config/fish/completions/jobctl.fish"),
            _completion_options, cmd_completion, needs_server=False),
]
