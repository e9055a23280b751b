"""What jobctl's commands run with: the :class:`Context` (the parsed options
and, on first use, a connection), and what several commands print with.

It sits below ``_commands`` (the table of subcommands), ``_follow`` (``run``,
``stream``, ``wait``) and ``_fanout`` (many servers), which all use it, so
that none of them imports another that comes back to it.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from typing import Any

import protocol as p

from . import _core as core
from ._blocking import BlockingClient, connect_blocking
from ._errors import ConnectionFailed

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
