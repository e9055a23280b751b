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
    IDLE     --start|stop|status|list|delete (client)-------> RESULT
    IDLE     --stream|output (client)-----------------------> STREAM
    RESULT   --the request's one result, or error (server)--> IDLE
    STREAM   --out (server)---------------------------------> STREAM
    STREAM   --end|error (server)---------------------------> IDLE
    HELLO, WELCOME, IDLE --error (server)-------------------> DONE
    IDLE, RESULT, STREAM --tick (server)--------------------> the same state

Which result answers which request is the second table, ``RESULT_FOR``. An
``error`` outside a request is the server refusing the connection (bad
certificate, unsupported version, too busy) or ending an idle one (shutting
down): after it, in ``DONE``, neither side sends anything more and the server
closes. Who may send a message is fixed by its type (``SENDER``), whatever
the state.

Each state says whose turn it is: the client's in HELLO and IDLE, the
server's in WELCOME, RESULT and STREAM, nobody's in DONE. The connection
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
    DONE = "done"  # the server refused or ended the connection with an error
    CLOSED = "closed"  # the peer closed the connection at a frame boundary
    ERROR = "error"  # a protocol error happened; the connection is unusable


S = ConnectionState

#: Who sends each message type.
SENDER: dict[str, Role] = {
    **{cls.TYPE: Role.CLIENT for cls in CLIENT_MESSAGES},
    **{cls.TYPE: Role.SERVER for cls in SERVER_MESSAGES},
}

#: Whose turn it is in each conversation state (None: nobody's).
TURN: dict[ConnectionState, Role | None] = {
    S.HELLO: Role.CLIENT,
    S.WELCOME: Role.SERVER,
    S.IDLE: Role.CLIENT,
    S.RESULT: Role.SERVER,
    S.STREAM: Role.SERVER,
    S.DONE: None,
}

#: The one result type that answers each one-shot request type.
RESULT_FOR: dict[str, str] = {
    "start": "started",
    "stop": "stopped",
    "status": "status_result",
    "list": "jobs",
    "delete": "deleted",
    "prune": "pruned",
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
    (S.STREAM, "end"): S.IDLE,
    (S.STREAM, "error"): S.IDLE,
    # Liveness (asked for in the hello): a tick changes nothing. IDLE too, so that
    # a tick racing the end of a response is never an error.
    **{(state, "tick"): state for state in (S.IDLE, S.RESULT, S.STREAM)},
}


class IllegalMove(Exception):
    """A message that may not be sent by this role in this state."""


class Conversation:
    """The state both sides share, and the request in progress.

    ``next_state()`` checks a move without making it; ``commit()`` makes it,
    so that a send that fails (e.g. a frame too large) changes nothing.
    """

    __slots__ = ("request", "state")

    def __init__(self) -> None:
        self.state = S.HELLO
        #: The type of the request in progress (RESULT and STREAM), else None.
        self.request: str | None = None

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
        if new is None:
            raise IllegalMove(self._explain(sender, kind))
        if (state is S.RESULT and kind not in ("error", "tick")
                and RESULT_FOR[self.request or ""] != kind):
            raise IllegalMove(
                f"{kind!r} does not answer {self.request!r} "
                f"(expected {RESULT_FOR[self.request or '']!r} or 'error')"
            )
        return new

    def commit(self, kind: str, new: ConnectionState) -> None:
        if new is S.RESULT or new is S.STREAM:
            if self.state is S.IDLE:
                self.request = kind
        else:
            self.request = None
        self.state = new

    def _explain(self, sender: Role, kind: str) -> str:
        state = self.state
        where = f"in state {state.name}"
        if self.request is not None:
            where += f" (answering {self.request!r})"
        if TURN.get(state) is not sender:
            if sender is Role.CLIENT and state in (S.RESULT, S.STREAM):
                return "request while another is in progress"
            whose = TURN.get(state)
            turn = f"it is the {whose.value}'s turn" if whose else "the connection is done"
            return f"unexpected {kind!r} from the {sender.value} {where}: {turn}"
        return f"unexpected {kind!r} from the {sender.value} {where}"


__all__ = [
    "RESULT_FOR",
    "SENDER",
    "TRANSITIONS",
    "TURN",
    "ConnectionState",
    "Conversation",
    "IllegalMove",
    "Role",
]
