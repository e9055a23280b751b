"""The conversation's state machine, as data.

Theory of operation
-------------------

A jobd connection is a strict conversation: the client speaks, the server
answers, one request at a time. So, unlike HTTP/1.1 in h11, one state
describes both sides at once, and both connection objects (client and server)
run the same machine over the same sequence of messages: the client moves it
with what it sends and receives, the server likewise, and at any frame
boundary they agree.

    HELLO    --hello (client)-------------------------------> WELCOME
    WELCOME  --welcome (server)-----------------------------> IDLE
    IDLE     --start|stop|status|list|delete|prune|rerun (c.)-> RESULT
    IDLE     --stream|output (client)-----------------------> STREAM
    RESULT   --the request's one result, or error (server)--> IDLE
    STREAM   --out (server)---------------------------------> STREAM
    STREAM   --end|error (server)---------------------------> IDLE
    IDLE     --attach (client)------------------------------> ATTACH
    ATTACH   --out (server)---------------------------------> ATTACH
    ATTACH   --input|eof|resize|detach (client)-------------> ATTACH
    ATTACH   --end|error (server)---------------------------> IDLE (lingering)
    IDLE     --input|eof|resize|detach (client), lingering--> IDLE (discarded)
    HELLO, WELCOME, IDLE --error (server)-------------------> DONE
    IDLE, RESULT, STREAM, ATTACH --tick (server)------------> the same state

Which result answers which request is the second table, ``RESULT_FOR``. An
``error`` outside a request is the server refusing the connection (bad
certificate, unsupported version, too busy) or ending an idle one (shutting
down): after it, in ``DONE``, neither side sends anything more and the server
closes. Who may send a message is fixed by its type (``SENDER``), whatever
the state.

Each state says whose turn it is: the client's in HELLO and IDLE, the
server's in WELCOME, RESULT and STREAM, both sides' in ATTACH (minor 2: the
server sends output while the client sends input), nobody's in DONE.

An attach ends when the server sends ``end`` or ``error``; input frames the
client sent before it saw that end are still on their way. So after an attach
the conversation *lingers*: until the client's next request, the server
accepts (and its caller discards) ``input``, ``eof``, ``resize`` and
``detach``. They can only come before the next request, since the client
sends that only after it has read the end. The connection
objects use this: a server that receives bytes while it is its own turn knows
at once that the client broke the one-request-at-a-time rule, without waiting
for a whole frame.

Two more states belong to a connection rather than to the conversation:
``CLOSED`` once the peer closed its side at a frame boundary (we may still
send, e.g. finish a response nobody will read: the peer's EOF ends what we
receive, not what we send) and ``ERROR`` after a protocol error (every call
fails from then on).

An illegal move raises :class:`IllegalMove` naming the message, the role and
the state; the connection turns it into a LocalProtocolError (our send) or a
RemoteProtocolError (their frame).
"""

from __future__ import annotations

import enum

from ._messages import CLIENT_MESSAGES, SERVER_MESSAGES


class Role(enum.Enum):
    CLIENT = "client"
    SERVER = "server"


class ConnectionState(enum.Enum):
    """Where a connection is (``conn.state``)."""

    HELLO = "hello"  # the client has not sent its hello yet
    WELCOME = "welcome"  # hello sent: the server owes a welcome or a refusal
    IDLE = "idle"  # welcomed, no request in progress: the client may send one
    RESULT = "result"  # a one-shot request is in progress: the server owes its result
    STREAM = "stream"  # a stream/output request is in progress: chunks, then end
    ATTACH = "attach"  # an attach is in progress: chunks and input both ways, then end
    DONE = "done"  # the server refused or ended the connection with an error
    CLOSED = "closed"  # the peer closed the connection at a frame boundary
    ERROR = "error"  # a protocol error happened; the connection is unusable


S = ConnectionState

#: Who sends each message type.
SENDER: dict[str, Role] = {
    **{cls.TYPE: Role.CLIENT for cls in CLIENT_MESSAGES},
    **{cls.TYPE: Role.SERVER for cls in SERVER_MESSAGES},
}

_C = frozenset({Role.CLIENT})
_SV = frozenset({Role.SERVER})
#: Who may send in each conversation state (empty: nobody).
TURN: dict[ConnectionState, frozenset[Role]] = {
    S.HELLO: _C,
    S.WELCOME: _SV,
    S.IDLE: _C,
    S.RESULT: _SV,
    S.STREAM: _SV,
    S.ATTACH: _C | _SV,
    S.DONE: frozenset(),
}

#: What a client sends while an attach runs (and what may linger after it).
ATTACH_INPUT = frozenset({"input", "eof", "resize", "detach"})

#: The one result type that answers each one-shot request type.
RESULT_FOR: dict[str, str] = {
    "start": "started",
    "stop": "stopped",
    "status": "status_result",
    "list": "jobs",
    "delete": "deleted",
    "prune": "pruned",
    "rerun": "started",  # minor 2
}

#: (state, message type) -> next state. Anything not here is illegal.
TRANSITIONS: dict[tuple[ConnectionState, str], ConnectionState] = {
    (S.HELLO, "hello"): S.WELCOME,
    (S.HELLO, "error"): S.DONE,  # refused before the hello was read
    (S.WELCOME, "welcome"): S.IDLE,
    (S.WELCOME, "error"): S.DONE,  # refused: identity, version, busy
    **{(S.IDLE, request): S.RESULT for request in RESULT_FOR},
    (S.IDLE, "stream"): S.STREAM,
    (S.IDLE, "output"): S.STREAM,
    (S.IDLE, "error"): S.DONE,  # the server ends an idle connection and says why
    **{(S.RESULT, result): S.IDLE for result in RESULT_FOR.values()},
    (S.RESULT, "error"): S.IDLE,
    (S.STREAM, "out"): S.STREAM,
    (S.STREAM, "resized"): S.STREAM,  # minor 2: only when the request asked for it
    (S.STREAM, "end"): S.IDLE,
    (S.STREAM, "error"): S.IDLE,
    (S.IDLE, "attach"): S.ATTACH,
    (S.ATTACH, "out"): S.ATTACH,
    **{(S.ATTACH, kind): S.ATTACH for kind in ATTACH_INPUT},
    (S.ATTACH, "end"): S.IDLE,
    (S.ATTACH, "error"): S.IDLE,
    # Only while lingering after an attach (see next_state).
    **{(S.IDLE, kind): S.IDLE for kind in ATTACH_INPUT},
    # Liveness (asked for in the hello): a tick changes nothing. IDLE too, so that
    # a tick racing the end of a response is never an error.
    **{(state, "tick"): state for state in (S.IDLE, S.RESULT, S.STREAM, S.ATTACH)},
}


class IllegalMove(Exception):
    """A message that may not be sent by this role in this state."""


class Conversation:
    """The state both sides share, and the request in progress.

    ``next_state()`` checks a move without making it; ``commit()`` makes it,
    so that a send that fails (e.g. a frame too large) changes nothing.
    """

    __slots__ = ("lingering", "request", "state")

    def __init__(self) -> None:
        self.state = S.HELLO
        #: The type of the request in progress (RESULT, STREAM, ATTACH), else None.
        self.request: str | None = None
        #: An attach ended and no request followed yet: its late input is allowed.
        self.lingering = False

    def next_state(self, sender: Role, kind: str) -> ConnectionState:
        state = self.state
        if state is S.HELLO and sender is Role.CLIENT and kind != "hello":
            raise IllegalMove("expected hello")
        owner = SENDER.get(kind)
        if owner is not sender:
            raise IllegalMove(
                f"a {sender.value} cannot send {kind!r}: it is a {owner.value} message"
                if owner is not None else f"unknown message type {kind!r}"
            )
        new = TRANSITIONS.get((state, kind))
        if new is None or (state is S.IDLE and kind in ATTACH_INPUT and not self.lingering):
            raise IllegalMove(self._explain(sender, kind))
        if (state is S.RESULT and kind not in ("error", "tick")
                and RESULT_FOR[self.request or ""] != kind):
            raise IllegalMove(
                f"{kind!r} does not answer {self.request!r} "
                f"(expected {RESULT_FOR[self.request or '']!r} or 'error')"
            )
        return new

    def commit(self, kind: str, new: ConnectionState) -> None:
        if new is S.RESULT or new is S.STREAM or new is S.ATTACH:
            if self.state is S.IDLE:
                self.request = kind
                self.lingering = False
        elif kind not in ATTACH_INPUT and kind != "tick":  # a tick changes nothing
            self.lingering = self.state is S.ATTACH
            self.request = None
        self.state = new

    def _explain(self, sender: Role, kind: str) -> str:
        state = self.state
        where = f"in state {state.name}"
        if self.request is not None:
            where += f" (answering {self.request!r})"
        if sender not in TURN.get(state, frozenset()):
            if sender is Role.CLIENT and state in (S.RESULT, S.STREAM):
                return "request while another is in progress"
            whose = TURN.get(state, frozenset())
            turn = (f"it is the {next(iter(whose)).value}'s turn" if whose
                    else "the connection is done")
            return f"unexpected {kind!r} from the {sender.value} {where}: {turn}"
        if kind in ATTACH_INPUT:
            return f"{kind!r} outside an attach"
        if state is S.ATTACH and sender is Role.CLIENT:
            return "request while another is in progress"
        return f"unexpected {kind!r} from the {sender.value} {where}"


__all__ = [
    "ATTACH_INPUT",
    "RESULT_FOR",
    "SENDER",
    "TRANSITIONS",
    "TURN",
    "ConnectionState",
    "Conversation",
    "IllegalMove",
    "Role",
]
