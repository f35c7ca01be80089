"""`AsyncioKeyClient`: the key service from asyncio programs, over asyncio's streams
(`open_unix_connection`, or `open_connection` with TLS). Standard library only.

One HTTP/1.1 connection is kept alive between calls, used by one call at a time (concurrent
calls queue on a lock); `messages()` and `events()` each hold a connection of their own.
Every call is bounded by the client's timeout (plus a long-poll's wait); a call cancelled
midway closes the connection, so the next one starts clean.
"""

from __future__ import annotations

import asyncio
import contextlib
from typing import TypeVar

from qkdd.client.api import Call
from qkdd.client.endpoint import RECEIVE_SIZE, Endpoint, unreachable
from qkdd.client.front import AsyncFrontEnd

__all__ = ["AsyncioKeyClient"]

T = TypeVar("T")

# How long closing waits for the other end (a TLS close_notify) before dropping the connection.
CLOSE_WAIT = 2.0

_Connection = tuple[asyncio.StreamReader, asyncio.StreamWriter]


class AsyncioKeyClient(AsyncFrontEnd[_Connection]):
    """asyncio client: `async with AsyncioKeyClient(path) as client:
    keys = await client.enc_keys(...)`."""

    def _setup(self, endpoint: Endpoint, sae_id: str | None, timeout: float) -> None:
        super()._setup(endpoint, sae_id, timeout)
        # The event loop the connection and the lock belong to: a client used from another
        # loop later (a second asyncio.run) starts afresh there.
        self._loop: asyncio.AbstractEventLoop | None = None
        self._lock = asyncio.Lock()

    async def _run(self, call: Call[T]) -> T:
        loop = asyncio.get_running_loop()
        if self._loop is not loop:
            connection = self._kept.forget()
            if connection is not None and self._loop is not None and self._loop.is_closed():
                # Its transport belongs to the other loop: closed with it, or left to it.
                _abort(connection[1])
            self._lock = asyncio.Lock()
            self._loop = loop
        seconds = self.timeout + call.extra_time
        async with self._lock:
            try:
                async with asyncio.timeout(seconds):
                    return await self._drive(self._call_plan(call))
            except TimeoutError:
                raise self._no_answer(seconds) from None

    async def _open_stream(self) -> _Connection:
        try:
            async with asyncio.timeout(self.timeout):
                return await self._connect()
        except TimeoutError:
            raise self._no_answer(self.timeout) from None

    async def _connect(self) -> _Connection:
        endpoint = self._endpoint
        try:
            if endpoint.socket_path is not None:
                return await asyncio.open_unix_connection(endpoint.socket_path)
            return await asyncio.open_connection(
                endpoint.host,
                endpoint.port,
                ssl=endpoint.ssl_context,
                server_hostname=endpoint.server_hostname,
            )
        except OSError as exc:  # ssl.SSLError is an OSError
            raise unreachable(endpoint.where, exc) from None

    async def _send(self, connection: _Connection, data: bytes) -> None:
        connection[1].write(data)
        await connection[1].drain()

    async def _receive(self, connection: _Connection) -> bytes:
        return await connection[0].read(RECEIVE_SIZE)

    async def _close(self, connection: _Connection, abort: bool) -> None:
        writer = connection[1]
        if abort:
            _abort(writer)
            return
        writer.close()
        try:
            async with asyncio.timeout(CLOSE_WAIT):
                await writer.wait_closed()
        except (OSError, TimeoutError):  # the connection had failed, or TLS closed slowly
            _abort(writer)
        except asyncio.CancelledError:
            _abort(writer)
            raise


def _abort(writer: asyncio.StreamWriter) -> None:
    with contextlib.suppress(Exception):  # already closed or closing
        writer.transport.abort()
