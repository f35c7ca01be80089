"""`KeyClient` (also `TrioKeyClient`): the key service from Trio programs. Trio is imported
when a client is made, never when this module is, so `qkdd.client` stays importable without it.

One HTTP/1.1 connection is kept alive between calls, used by one task at a time (concurrent
calls queue on a lock); `messages()` and `events()` each hold a connection of their own.
Every call is bounded by the client's timeout (plus a long-poll's wait).
"""

from __future__ import annotations

import contextlib
from typing import TYPE_CHECKING, TypeVar

from qkdd.client.api import Call
from qkdd.client.client_errors import KeyServiceUnreachable
from qkdd.client.endpoint import KEY_SERVICE, RECEIVE_SIZE, Endpoint, unreachable
from qkdd.client.front import AsyncFrontEnd
from qkdd.client.roundtrip import tls_reason

if TYPE_CHECKING:
    import ssl

    import trio

__all__ = ["KeyClient", "TrioKeyClient", "open_tls_stream"]

T = TypeVar("T")


class KeyClient(AsyncFrontEnd["trio.abc.Stream"]):
    """Trio client: `async with KeyClient(path) as client: keys = await client.enc_keys(...)`."""

    def _setup(self, endpoint: Endpoint, sae_id: str | None, timeout: float) -> None:
        import trio  # only Trio users pay for the import

        super()._setup(endpoint, sae_id, timeout)
        self._trio = trio
        self._failures = (trio.BrokenResourceError,)
        self._lock = trio.Lock()

    async def _run(self, call: Call[T]) -> T:
        seconds = self.timeout + call.extra_time
        async with self._lock:
            with self._trio.move_on_after(seconds):
                return await self._drive(self._call_plan(call))
            raise self._no_answer(seconds)

    async def _open_stream(self) -> trio.abc.Stream:
        with self._trio.move_on_after(self.timeout):
            return await self._connect()
        raise self._no_answer(self.timeout)

    async def _connect(self) -> trio.abc.Stream:
        trio, endpoint = self._trio, self._endpoint
        if endpoint.socket_path is not None:
            try:
                return await trio.open_unix_socket(endpoint.socket_path)
            except OSError as exc:
                raise unreachable(endpoint.where, exc) from None
        assert endpoint.ssl_context is not None
        try:
            return await open_tls_stream(
                endpoint.host, endpoint.port, endpoint.ssl_context, endpoint.server_hostname
            )
        except OSError as exc:
            raise unreachable(endpoint.where, exc) from None
        except trio.BrokenResourceError as exc:
            why = (
                tls_reason(exc, KEY_SERVICE) or f"the TLS handshake failed: {exc.__cause__ or exc}"
            )
            raise KeyServiceUnreachable(
                f"cannot reach the key service at {endpoint.where}: {why}"
            ) from exc

    async def _send(self, connection: trio.abc.Stream, data: bytes) -> None:
        await connection.send_all(data)

    async def _receive(self, connection: trio.abc.Stream) -> bytes:
        return bytes(await connection.receive_some(RECEIVE_SIZE))

    async def _close(self, connection: trio.abc.Stream, abort: bool) -> None:
        if abort:
            await self._trio.aclose_forcefully(connection)
            return
        # A connection that had already failed is closed all the same.
        with contextlib.suppress(self._trio.BrokenResourceError):
            await connection.aclose()


TrioKeyClient = KeyClient


async def open_tls_stream(
    host: str, port: int, context: ssl.SSLContext, server_hostname: str | None
) -> trio.SSLStream[trio.SocketStream]:
    """A TCP connection to `host`:`port` with its TLS handshake done. Raises OSError when
    connecting fails, trio.BrokenResourceError when the handshake does (the TCP connection
    closed again)."""
    import trio

    tcp = await trio.open_tcp_stream(host, port)
    # https_compatible: HTTP servers commonly close without close_notify.
    stream = trio.SSLStream(tcp, context, server_hostname=server_hostname, https_compatible=True)
    try:
        await stream.do_handshake()
    except BaseException:
        await trio.aclose_forcefully(tcp)
        raise
    return stream
