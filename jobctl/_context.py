"""What jobctl's commands run with: the :class:`Context` (the parsed options
and, on first use, a connection), and what several commands print with.

It sits below ``_commands`` (the table of subcommands), ``_follow`` (``run``,
``stream``, ``wait``) and ``_fanout`` (many servers), which all use it, so
that none of them imports another that comes back to it.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable, Sequence

import protocol as p

from . import _core as core
from . import _text as text
from ._blocking import BlockingClient, connect_blocking
from ._errors import ConfigError, ConnectionFailed

TYPE_CHECKING = False  # typing is not imported at run time (issue 26: start-up)
if TYPE_CHECKING:
    from typing import Any

#: What ``list --state`` accepts: each name and the states it stands for.
STATES = {"running": {p.JobState.RUNNING},
          "ended": set(p.JobState) - {p.JobState.RUNNING},
          **{s.value: {s} for s in p.JobState}}


class Context:
    """What a command runs with: the parsed options and, on first use, a client."""

    def __init__(self, ns: argparse.Namespace, *,
                 parser: Callable[[], argparse.ArgumentParser] | None = None) -> None:
        self.ns = ns
        #: Builds the whole parser (``completion`` generates its scripts from it).
        self.parser = parser
        self.address: str = core.DEFAULT_ADDRESS
        self.port: int = core.DEFAULT_PORT
        self._client: BlockingClient | None = None

    @property
    def client(self) -> BlockingClient:
        if self._client is None:
            self._client = self.connect()
        return self._client

    def connect(self) -> BlockingClient:
        """A new connection (``run`` stops its job on a second one)."""
        ns = self.ns
        if not ns.ca:  # issue 15: no CA at all: trust on first use (_trust)
            client = connect_pinned(ns, self.address, self.port)
        else:
            client = connect_blocking(self.address, self.port, certificate=ns.certificate,
                                      key=ns.key, ca=ns.ca, server_name=ns.server_name,
                                      liveness_timeout=ns.liveness_timeout)
        if self._client is None:  # issue 15: accepted, but not for long? (once a run)
            from ._expiry import warn_if_expiring

            warn_if_expiring(ns.certificate)
        return client

    def close(self) -> None:
        if self._client is not None:
            self._client.close()


def print_json(obj: Any) -> None:
    import json

    print(json.dumps(obj, sort_keys=True))


def connect_pinned(ns: Any, address: str | None = None, port: int | None = None
                   ) -> BlockingClient:
    """The command line's connection without a CA: pin check, and on a terminal
    the question for an unknown server (then a fresh connection: the first one
    may have timed out on the server while the user read the fingerprint).
    ``address`` and ``port`` default to the options'."""
    from ._trust import Pinning, UnknownServer, ask, interactive

    host = address if address is not None else ns.address
    number = port if port is not None else int(ns.port)

    def attempt(accept_new: bool) -> BlockingClient:
        pin = Pinning(host, number, accept_new=accept_new)
        return connect_blocking(host, number, certificate=ns.certificate,
                                key=ns.key, server_name=ns.server_name, pin=pin,
                                liveness_timeout=getattr(ns, "liveness_timeout", None))

    try:
        return attempt(ns.trust_on_first_use)
    except UnknownServer as exc:
        if not interactive():
            raise
        if not ask(exc):
            raise ConnectionFailed(f"server {exc.pinning.key} not trusted: nothing was sent "
                                   "to it") from None
    return attempt(False)


class BadValue(ConfigError):
    """An option's value that is wrong as a whole (``argument --X: PROBLEM``)."""


def labels_of(ns: argparse.Namespace) -> tuple[tuple[str, str], ...]:
    """The ``--label`` options as labels (too many, or a key twice: BadValue)."""
    try:
        return p.check_labels("--label", tuple(ns.label or ()))
    except p.FieldError as exc:
        raise BadValue(f"argument --label: {str(exc).removeprefix('--label: ')}") from None


def list_filters(ns: argparse.Namespace, now: float) -> dict[str, Any]:
    """``list``'s filters as keyword arguments of ``client.list`` (the server
    filters them, protocol 1.1; see :func:`filter_jobs` for older servers)."""
    states: set[p.JobState] = set().union(*(STATES[name] for name in ns.state or ()))
    return {"owner": ns.owner, "states": sorted(states, key=lambda s: s.value),
            "since": None if ns.since is None else now - ns.since,
            "labels": labels_of(ns)}


def filter_jobs(jobs: list[p.JobStatus], filters: dict[str, Any]) -> list[p.JobStatus]:
    """:func:`list_filters` applied here: for a server before protocol 1.1."""
    states, owner, since = set(filters["states"]), filters["owner"], filters["since"]
    assert not filters["labels"]  # needs a server of protocol 1.2: it filters
    return [s for s in jobs if (not states or s.state in states)
            and (owner is None or s.owner == owner)
            and (since is None or s.created >= since)]


def list_columns(ns: argparse.Namespace, jobs: Sequence[p.JobStatus]) -> tuple[str, ...]:
    """``list``'s columns: ``-q`` the ID alone, ``--format`` those named; by
    default, labels last only when a job listed has some (the six columns of
    before stay as they were)."""
    if ns.quiet:
        return ("id",)
    if ns.format:
        return tuple(ns.format)
    if any(s.labels for s in jobs):
        return text.DEFAULT_COLUMNS
    return tuple(c for c in text.DEFAULT_COLUMNS if c != "labels")
