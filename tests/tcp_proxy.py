"""A TCP proxy a test can cut: what an outage of PostgreSQL or Redis looks like from the gateway.

Connections are refused and open ones dropped while it is cut; while it is stalled they stay open but nothing
passes, which is a server that stops answering (hung, or behind a network that drops packets) rather than one
that refuses. The shared services themselves are never stopped.
"""

from __future__ import annotations

import contextlib
import socket
import threading
from collections.abc import Iterator
from urllib.parse import urlsplit

from tests.servers import free_port


class TcpProxy:
    """Forwards a loopback port to PostgreSQL until `cut()`; `restore()` reopens it."""

    def __init__(self, target: tuple[str, int]) -> None:
        self.target = target
        self.port = free_port()
        self._sockets: list[socket.socket] = []
        self._listener: socket.socket | None = None
        # Guards the cut against a connection being accepted at that very moment: it must not survive.
        self._lock = threading.Lock()
        self._open = False
        self._flowing = threading.Event()  # what the client sends
        self._flowing.set()
        self._replying = threading.Event()  # what the target answers
        self._replying.set()

    @property
    def is_open(self) -> bool:
        """Whether it accepts connections (restored, not cut since)."""
        return self._open

    def restore(self) -> None:
        listener = socket.create_server(("127.0.0.1", self.port))
        with self._lock:
            self._listener = listener
            self._open = True
        threading.Thread(target=self._accept, args=(listener,), daemon=True).start()

    def cut(self) -> None:
        self.resume()  # pipe threads blocked in a stall wake up and find their sockets closed
        with self._lock:
            self._open = False
            assert self._listener is not None
            doomed = [self._listener, *self._sockets]
            self._sockets.clear()
        for sock in doomed:
            # shutdown() wakes the pipe threads blocked in recv(); close() alone would not.
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
            sock.close()

    def stall(self, *, replies_only: bool = False) -> None:
        """Hold what passes (or only the target's answers: it still gets and answers every request)."""
        if not replies_only:
            self._flowing.clear()
        self._replying.clear()

    def resume(self) -> None:
        self._flowing.set()
        self._replying.set()

    def _accept(self, listener: socket.socket) -> None:
        while True:
            try:
                client, _ = listener.accept()
            except OSError:
                return
            upstream = socket.create_connection(self.target)
            with self._lock:
                if not self._open:
                    client.close()
                    upstream.close()
                    return
                self._sockets += [client, upstream]
            for source, sink, gate in ((client, upstream, self._flowing), (upstream, client, self._replying)):
                threading.Thread(target=self._pipe, args=(source, sink, gate), daemon=True).start()

    def _pipe(self, source: socket.socket, sink: socket.socket, gate: threading.Event) -> None:
        try:
            while data := source.recv(65536):
                gate.wait()
                sink.sendall(data)
        except OSError:
            pass
        finally:
            for sock in (source, sink):
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)


@contextlib.contextmanager
def proxy_to(url: str, default_port: int) -> Iterator[TcpProxy]:
    """An open proxy in front of the server a URL names (redis://, http://, ...), cut on exit."""
    address = urlsplit(url)
    tcp = TcpProxy((address.hostname or "127.0.0.1", address.port or default_port))
    tcp.restore()
    try:
        yield tcp
    finally:
        tcp.cut()
