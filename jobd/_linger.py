"""Lingering close: a refusal reaches a client that wrote before it read.

Closing a TCP socket whose receive buffer still holds unread bytes makes Linux
send RST instead of FIN, and the peer's kernel may then throw away what we
sent last: the TLS alert (``unknown ca``, ``certificate required``) or the
error frame that says why the connection is refused. A client that sends its
hello at once, as protocol.md section 7 allows, has bytes in flight that jobd
never reads when it refuses; it saw ``Broken pipe`` or ``Connection reset``
instead of the reason.

So a connection that jobd ends with something to say closes the way web
servers do (Apache's and nginx's lingering close): jobd sends its last words,
shuts down its writing side (the peer reads them, then EOF), reads and
discards what the peer still sends until the peer closes, LINGER_TIMEOUT
passes or LINGER_BYTES were read, and only then closes the socket. An
ordinary end (the client closed first) does not linger: there is nothing
left to read.

:class:`LingeringStream` is the transport under the server's TLS stream; the
session sets :attr:`LingeringStream.linger` before it closes with a refusal.
"""

from __future__ import annotations

import contextlib

import trio

#: How long a refused connection waits for the peer to close after our last
#: words (Apache lingers 2 s): long enough for a client on the far side of a
#: slow link to read the reason, short enough that a peer that never closes
#: holds its slot briefly.
LINGER_TIMEOUT = 2.0
#: What a lingering close reads and discards at most: a peer that floods us is
#: closed at once after this (a reset is what it asked for).
LINGER_BYTES = 1 << 20
_READ = 64 * 1024
#: What the TLS stream above asks of the socket per read when it names no size
#: (trio's SSLStream never does): bulk input (256 KiB frames) arrives in few
#: reads, and the session decrypts every record a read brought at once
#: (jobd._session). A bound on what one connection holds undecrypted.
TRANSPORT_RECEIVE_SIZE = 256 * 1024


class LingeringStream(trio.abc.HalfCloseableStream):
    """A TCP stream whose :meth:`aclose` lingers when :attr:`linger` is set."""

    def __init__(self, tcp: trio.SocketStream) -> None:
        self.tcp = tcp
        self.socket = tcp.socket
        #: Seconds to linger at close; 0: close at once.
        self.linger = 0.0

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        await self.tcp.send_all(data)

    async def wait_send_all_might_not_block(self) -> None:
        await self.tcp.wait_send_all_might_not_block()

    async def send_eof(self) -> None:
        await self.tcp.send_eof()

    async def receive_some(self, max_bytes: int | None = None) -> bytes | bytearray:
        return await self.tcp.receive_some(max_bytes or TRANSPORT_RECEIVE_SIZE)

    async def aclose(self) -> None:
        try:
            if self.linger > 0:
                with trio.move_on_after(self.linger):
                    await linger(self.tcp)
        finally:
            await self.tcp.aclose()


async def linger(tcp: trio.SocketStream) -> None:
    """Shut down our writing side, then read and discard until the peer's EOF or
    LINGER_BYTES. The caller bounds the time, and closes the socket."""
    with contextlib.suppress(
            trio.BrokenResourceError, trio.ClosedResourceError, trio.BusyResourceError, OSError):
        await tcp.send_eof()
        left = LINGER_BYTES
        while left > 0:
            data = await tcp.receive_some(_READ)
            if not data:
                return
            left -= len(data)
