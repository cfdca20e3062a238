"""A byte-counting TCP forwarder on loopback, to put in front of a local S3 server.

Every connection accepted on ``127.0.0.1:<port>`` gets its own connection to the upstream
server, and two threads pump the bytes (client to server: "uploaded", server to client:
"downloaded") until both directions have ended. HTTP keep-alive (which pyarrow's S3 client
uses) passes through untouched: the proxy knows nothing of HTTP. Bytes are counted as they
are received, before they are forwarded, so once a request's response has reached the client
both of its directions are counted. The counts include HTTP headers, not only payloads.
"""

from __future__ import annotations

import socket
import threading

CHUNK = 1 << 16


class CountingProxy:
    """``start`` it, point clients at ``endpoint``, read ``snapshot()`` (uploaded, downloaded)."""

    def __init__(self, upstream_host: str, upstream_port: int):
        self.upstream = (upstream_host, upstream_port)
        self._lock = threading.Lock()
        self._uploaded = 0
        self._downloaded = 0
        self.connections = 0
        self._listener: socket.socket | None = None
        self._open: set[socket.socket] = set()
        self.port = 0

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def snapshot(self) -> tuple[int, int]:
        """Bytes (uploaded, downloaded) so far."""
        with self._lock:
            return self._uploaded, self._downloaded

    def start(self) -> CountingProxy:
        listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind(("127.0.0.1", 0))
        listener.listen(128)
        self._listener = listener
        self.port = listener.getsockname()[1]
        threading.Thread(target=self._accept, name="s3proxy-accept", daemon=True).start()
        return self

    def stop(self) -> None:
        listener, self._listener = self._listener, None
        if listener is not None:
            try:
                listener.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            listener.close()
        with self._lock:
            still_open, self._open = list(self._open), set()
        for sock in still_open:
            _close(sock)

    def _accept(self) -> None:
        while self._listener is not None:
            try:
                client, _ = self._listener.accept()
            except OSError:  # closed by stop()
                return
            try:
                server = socket.create_connection(self.upstream)
            except OSError:
                _close(client)
                continue
            for sock in (client, server):
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            with self._lock:
                self.connections += 1
                self._open |= {client, server}
            done = threading.Barrier(2, action=lambda c=client, s=server: self._closed(c, s))
            for src, dst, up in ((client, server, True), (server, client, False)):
                threading.Thread(
                    target=self._pump, args=(src, dst, up, done), name="s3proxy-pump", daemon=True
                ).start()

    def _pump(self, src: socket.socket, dst: socket.socket, up: bool, done: threading.Barrier):
        try:
            while True:
                data = src.recv(CHUNK)
                if not data:
                    break
                with self._lock:
                    if up:
                        self._uploaded += len(data)
                    else:
                        self._downloaded += len(data)
                dst.sendall(data)
            dst.shutdown(socket.SHUT_WR)  # pass the half-close on
        except OSError:  # one side went away: end both directions
            _close(src)
            _close(dst)
        try:
            done.wait()
        except threading.BrokenBarrierError:
            pass

    def _closed(self, client: socket.socket, server: socket.socket) -> None:
        with self._lock:
            self._open -= {client, server}
        _close(client)
        _close(server)


def _close(sock: socket.socket) -> None:
    try:
        sock.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass
    sock.close()
