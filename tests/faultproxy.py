"""A fault-injecting TCP proxy for the network tests (issue 21 items 9 and 10).

``FaultProxy(target_port)`` listens on 127.0.0.1 (its own port) and forwards
every connection to the target, byte for byte, in one thread (a selector).
Between the bytes the test breaks things:

- :meth:`drop`: every open connection ends with a FIN on both sides;
- :meth:`reset`: every open connection ends with a RST on both sides;
- :meth:`stall`: bytes stop moving in both directions on the connections
  open now, the sockets stay open (a server that stopped, or a path where
  packets vanish: the client sees nothing at all); new connections work;
- :meth:`refuse`: new connections are closed at once (a restarting server);
  :meth:`accept` takes them again.
- :meth:`retarget`: forward new connections to another port.

Every call returns once the proxy's thread has done it. :meth:`close` ends
everything; use it as a context manager.
"""

from __future__ import annotations

import contextlib
import os
import queue
import selectors
import socket
import struct
import threading
from collections.abc import Callable
from typing import Any

_CHUNK = 65536


class FaultProxy:
    def __init__(self, target_port: int, target_host: str = "127.0.0.1") -> None:
        self.target = (target_host, target_port)
        self._listener = socket.create_server(("127.0.0.1", 0))
        self._listener.setblocking(False)
        self.port: int = self._listener.getsockname()[1]
        self._selector = selectors.DefaultSelector()
        self._wake_r, self._wake_w = os.pipe()
        os.set_blocking(self._wake_r, False)
        self._calls: queue.Queue[tuple[Callable[[], Any], threading.Event]] = queue.Queue()
        self._pairs: dict[socket.socket, socket.socket] = {}
        self._stalled: set[socket.socket] = set()
        self._refusing = False
        self._running = True
        #: Connections accepted so far (for tests that count reconnects).
        self.accepted = 0
        self._accepted_cond = threading.Condition()
        self._selector.register(self._listener, selectors.EVENT_READ, "accept")
        self._selector.register(self._wake_r, selectors.EVENT_READ, "wake")
        self._thread = threading.Thread(target=self._loop, daemon=True)
        self._thread.start()

    def __enter__(self) -> FaultProxy:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- controls (run in the proxy's thread) ----------------------------------------

    def _call(self, fn: Callable[[], Any]) -> None:
        done = threading.Event()
        self._calls.put((fn, done))
        os.write(self._wake_w, b"x")
        assert done.wait(30), "the proxy's thread did not answer"

    def drop(self) -> None:
        self._call(lambda: self._end_all(reset=False))

    def reset(self) -> None:
        self._call(lambda: self._end_all(reset=True))

    def stall(self) -> None:
        def do() -> None:
            for sock in self._pairs:
                if sock not in self._stalled:
                    self._stalled.add(sock)
                    self._selector.unregister(sock)
        self._call(do)

    def wait_accepted(self, count: int, timeout: float = 60.0) -> None:
        """Until ``count`` connections were accepted in all (a client reconnected)."""
        with self._accepted_cond:
            assert self._accepted_cond.wait_for(lambda: self.accepted >= count, timeout), \
                f"{self.accepted} connections accepted, not {count}"

    def refuse(self) -> None:
        self._call(lambda: setattr(self, "_refusing", True))

    def accept(self) -> None:
        self._call(lambda: setattr(self, "_refusing", False))

    def retarget(self, port: int) -> None:
        self._call(lambda: setattr(self, "target", (self.target[0], port)))

    def open_connections(self) -> int:
        count = [0]
        self._call(lambda: count.__setitem__(0, len(self._pairs) // 2))
        return count[0]

    def close(self) -> None:
        if not self._running:
            return

        def do() -> None:
            self._end_all(reset=False)
            self._running = False
        self._call(do)
        self._thread.join(30)
        self._selector.close()
        self._listener.close()
        os.close(self._wake_r)
        os.close(self._wake_w)

    # -- the loop ----------------------------------------------------------------------

    def _loop(self) -> None:
        while self._running:
            for key, _ in self._selector.select():
                if key.data == "wake":
                    with contextlib.suppress(BlockingIOError):
                        os.read(self._wake_r, 4096)
                    while True:
                        try:
                            fn, done = self._calls.get_nowait()
                        except queue.Empty:
                            break
                        fn()
                        done.set()
                elif key.data == "accept":
                    self._accept()
                else:
                    sock = key.fileobj
                    assert isinstance(sock, socket.socket)
                    if sock in self._pairs:
                        self._forward(sock)

    def _accept(self) -> None:
        try:
            client, _ = self._listener.accept()
        except BlockingIOError:
            return
        with self._accepted_cond:
            self.accepted += 1
            self._accepted_cond.notify_all()
        if self._refusing:
            client.close()
            return
        try:
            server = socket.create_connection(self.target, timeout=10)
        except OSError:
            _abort(client)
            return
        for sock in (client, server):
            sock.setblocking(False)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self._pairs[client] = server
        self._pairs[server] = client
        for sock in (client, server):
            self._selector.register(sock, selectors.EVENT_READ, "data")

    def _forward(self, sock: socket.socket) -> None:
        peer = self._pairs[sock]
        try:
            data = sock.recv(_CHUNK)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        if not data:
            self._end(sock, reset=False)
            return
        try:
            peer.setblocking(True)
            peer.settimeout(10)
            peer.sendall(data)
            peer.setblocking(False)
        except OSError:
            self._end(sock, reset=True)

    def _end(self, sock: socket.socket, *, reset: bool) -> None:
        peer = self._pairs.pop(sock)
        del self._pairs[peer]
        for s in (sock, peer):
            if s in self._stalled:
                self._stalled.discard(s)
            else:
                self._selector.unregister(s)
            if reset:
                _abort(s)
            else:
                s.close()

    def _end_all(self, *, reset: bool) -> None:
        while self._pairs:
            self._end(next(iter(self._pairs)), reset=reset)


def _abort(sock: socket.socket) -> None:
    """Close with a RST (SO_LINGER with a zero timeout)."""
    with contextlib.suppress(OSError):
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    sock.close()
