"""`BlockingKeyClient`: the key service from plain blocking code, over `socket` and `ssl`.

One HTTP/1.1 connection is kept alive between calls; `messages()` and `events()` each hold a
connection of their own and block between items. Each socket operation of a call is bounded
by the client's timeout (plus a long-poll's wait). Standard library only.
"""

from __future__ import annotations

import socket
from typing import TypeVar

from qkdd.client.api import Call
from qkdd.client.endpoint import RECEIVE_SIZE, unreachable
from qkdd.client.front import SyncFrontEnd

__all__ = ["BlockingKeyClient"]

T = TypeVar("T")


class BlockingKeyClient(SyncFrontEnd[socket.socket]):
    """Blocking client: `with BlockingKeyClient(path) as client: keys = client.enc_keys(...)`.
    Not for use by several threads at once (give each thread its own)."""

    # The time limit of each socket operation of the call under way.
    _seconds: float | None = None

    def _run(self, call: Call[T]) -> T:
        self._seconds = seconds = self.timeout + call.extra_time
        if (kept := self._kept.connection) is not None:
            kept.settimeout(seconds)
        try:
            return self._drive(self._call_plan(call))
        except TimeoutError as exc:
            raise self._no_answer(seconds) from exc

    def _connect(self) -> socket.socket:
        sock = self._connected()
        sock.settimeout(self._seconds)
        return sock

    def _open_stream(self) -> socket.socket:
        sock = self._connected()
        sock.settimeout(None)  # a stream waits for what comes as long as it takes
        return sock

    def _connected(self) -> socket.socket:
        """A new connection, made within the client's timeout."""
        endpoint = self._endpoint
        try:
            if endpoint.socket_path is not None:
                sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                try:
                    sock.settimeout(self.timeout)
                    sock.connect(endpoint.socket_path)
                except BaseException:
                    sock.close()
                    raise
                return sock
            assert endpoint.ssl_context is not None
            tcp = socket.create_connection((endpoint.host, endpoint.port), timeout=self.timeout)
            try:
                # wrap_socket performs the handshake (the socket is connected and blocking).
                return endpoint.ssl_context.wrap_socket(
                    tcp, server_hostname=endpoint.server_hostname
                )
            except BaseException:
                tcp.close()
                raise
        except TimeoutError:
            raise self._no_answer(self.timeout) from None
        except OSError as exc:  # ssl.SSLError is an OSError
            raise unreachable(endpoint.where, exc) from None

    def _send(self, connection: socket.socket, data: bytes) -> None:
        connection.sendall(data)

    def _receive(self, connection: socket.socket) -> bytes:
        return connection.recv(RECEIVE_SIZE)

    def _close(self, connection: socket.socket, abort: bool) -> None:
        connection.close()
