"""A TCP proxy a test can cut: what an outage of PostgreSQL or Redis looks like from the gateway.

Connections are refused and open ones dropped while it is cut; while it is stalled they stay open but nothing
passes, which is a server that stops answering (hung, or behind a network that drops packets) rather than one
that refuses. The shared services themselves are never stopped.
"""

from __future__ import annotations

import contextlib
import socket
import threading

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
        self._flowing = threading.Event()
        self._flowing.set()

    def restore(self) -> None:
        listener = socket.create_server(("127.0.0.1", self.port))
        with self._lock:
            self._listener = listener
            self._open = True
        threading.Thread(target=self._accept, args=(listener,), daemon=True).start()

    def cut(self) -> None:
        self._flowing.set()  # pipe threads blocked in a stall wake up and find their sockets closed
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

    def stall(self) -> None:
        self._flowing.clear()

    def resume(self) -> None:
        self._flowing.set()

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
            for source, sink in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pipe, args=(source, sink), daemon=True).start()

    def _pipe(self, source: socket.socket, sink: socket.socket) -> None:
        try:
            while data := source.recv(65536):
                self._flowing.wait()
                sink.sendall(data)
        except OSError:
            pass
        finally:
            for sock in (source, sink):
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)
