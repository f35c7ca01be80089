"""What the three front ends (blocking, asyncio, Trio) share: how a client is made, the key
service's calls as its methods, and how a call or a stream runs on a connection.

The calls are one table (`FrontEnd`): each method is the call of `qkdd.client.api` with the
same name, signature and docstring; on a `SyncFrontEnd` it returns the value, on an
`AsyncFrontEnd` it is a coroutine function, and a stream (`messages`, `events`) is an
iterator or an async iterator.

How a call runs is a plan, without I/O (`qkdd.client.roundtrip.KeptConnection`): a
generator that yields the actions `Connect`, `Send`, `Receive` and `Close`, is sent what
each gave (the new connection, the bytes received) or thrown what it raised, and returns
the answer, which the call decodes. The plan keeps one HTTP/1.1 connection alive between
calls, retries once on a new connection when the service had closed the kept one before
reading the request, and abandons the connection after a failure or a cancellation. A
front end carries the actions out (`_connect`, `_send`, `_receive`, `_close`) and bounds
them in time (`_run`, `_open_stream`); that is all that differs between the three.
"""

from __future__ import annotations

import functools
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from typing import Any, Generic, ParamSpec, Self, TypeVar, overload

from qkdd.client import api
from qkdd.client.api import Call, LineStream, Stream, sae_header
from qkdd.client.client_errors import ClientError, KeyServiceUnreachable
from qkdd.client.endpoint import DEFAULT_TIMEOUT, KEY_SERVICE, Endpoint, client_ssl_context, failed
from qkdd.client.roundtrip import (
    Action,
    Close,
    KeptConnection,
    Plan,
    Receive,
    Send,
    drive,
    drive_async,
)

__all__ = ["AsyncFrontEnd", "FrontEnd", "SyncFrontEnd"]

C = TypeVar("C")  # a front end's connection: a socket, a pair of asyncio streams, a Trio stream
T = TypeVar("T")
P = ParamSpec("P")


# -- the calls as methods -------------------------------------------------------------------


class _CallMethod(Generic[P, T]):
    """A call of `qkdd.client.api` as a front end's method."""

    def __init__(self, build: Callable[P, Call[T]]) -> None:
        self._build = build
        self.__doc__ = build.__doc__

    @overload
    def __get__(self, client: None, owner: type) -> Self: ...
    @overload
    def __get__(self, client: SyncFrontEnd[Any], owner: type) -> Callable[P, T]: ...
    @overload
    def __get__(self, client: AsyncFrontEnd[Any], owner: type) -> Callable[P, Awaitable[T]]: ...
    def __get__(self, client: Any, owner: type) -> Any:
        if client is None:
            return self
        return functools.update_wrapper(client._call_method(self._build), self._build)


class _StreamMethod(Generic[P, T]):
    """A stream of `qkdd.client.api` as a front end's method."""

    def __init__(self, build: Callable[P, Stream[T]]) -> None:
        self._build = build
        self.__doc__ = build.__doc__

    @overload
    def __get__(self, client: None, owner: type) -> Self: ...
    @overload
    def __get__(self, client: SyncFrontEnd[Any], owner: type) -> Callable[P, Iterator[T]]: ...
    @overload
    def __get__(self, client: AsyncFrontEnd[Any], owner: type) -> Callable[P, AsyncIterator[T]]: ...
    def __get__(self, client: Any, owner: type) -> Any:
        if client is None:
            return self
        return functools.update_wrapper(client._stream_method(self._build), self._build)


class FrontEnd(Generic[C]):
    """How every front end is made: on a Unix socket path, or with `tls` on a TLS listener.
    `sae_id` names the SAE to act as when the caller may act as several."""

    status = _CallMethod(api.status)
    enc_keys = _CallMethod(api.enc_keys)
    dec_keys = _CallMethod(api.dec_keys)
    site_status = _CallMethod(api.site_status)
    metrics = _CallMethod(api.metrics)
    request = _CallMethod(api.request)
    send_message = _CallMethod(api.send_message)
    receive_message = _CallMethod(api.receive_message)
    acknowledge_message = _CallMethod(api.acknowledge_message)
    messages = _StreamMethod(api.messages)
    events = _StreamMethod(api.events)

    # What the front end's `_send` and `_receive` raise when the connection fails.
    _failures: tuple[type[BaseException], ...] = (OSError,)

    def __init__(
        self, socket_path: str, *, sae_id: str | None = None, timeout: float = DEFAULT_TIMEOUT
    ) -> None:
        self._setup(Endpoint.unix(socket_path), sae_id, timeout)

    @classmethod
    def tls(
        cls,
        host: str,
        port: int,
        *,
        cert_file: str,
        key_file: str | None = None,
        ca_file: str | None = None,
        sae_id: str | None = None,
        timeout: float = DEFAULT_TIMEOUT,
        server_hostname: str | None = None,
    ) -> Self:
        """A client of the TLS listener at `host`:`port`; see `client_ssl_context`.
        `server_hostname` is the name the service's certificate must carry (default `host`)."""
        context = client_ssl_context(cert_file, key_file, ca_file)
        client = cls.__new__(cls)
        client._setup(Endpoint.tls(host, port, context, server_hostname), sae_id, timeout)
        return client

    def _setup(self, endpoint: Endpoint, sae_id: str | None, timeout: float) -> None:
        if sae_id is not None and not (
            sae_id and sae_id.isascii() and sae_id.isprintable() and sae_id == sae_id.strip()
        ):
            raise ClientError(
                f"SAE ID {sae_id!r} cannot be sent in a header: it must be printable ASCII, "
                "without leading or trailing spaces"
            )
        self._endpoint = endpoint
        # The Unix socket path; None for a TLS client.
        self.socket_path = endpoint.socket_path
        self.sae_id = sae_id
        self.timeout = timeout
        # The connection kept alive between calls, and its HTTP state.
        self._kept: KeptConnection[C] = KeptConnection(
            endpoint.host_header,
            KEY_SERVICE,
            self._connection_failed,
            lambda exc: failed(endpoint.where, exc),
        )

    def _no_answer(self, seconds: float) -> KeyServiceUnreachable:
        return KeyServiceUnreachable(
            f"no answer from the key service at {self._endpoint.where} within {seconds:g} s"
        )

    # -- plans ------------------------------------------------------------------------------

    def _call_plan(self, call: Call[T]) -> Plan[T]:
        """`call` on the kept-alive connection (a new one if there is none): its value."""
        answer = yield from self._kept.call(
            call.method, call.target, call.body, sae_header(self.sae_id)
        )
        return call.decode(*answer)

    def _operation(self, action: Action) -> Callable[[], Any]:
        """The front end's method that carries `action` out (for an `AsyncFrontEnd`, its
        call is to be awaited)."""
        if isinstance(action, Receive):
            return functools.partial(self._receive, action.connection)
        if isinstance(action, Send):
            return functools.partial(self._send, action.connection, action.data)
        if isinstance(action, Close):
            return functools.partial(self._close, action.connection, action.abort)
        return self._connect

    # Carrying actions out: each front end's own (`SyncFrontEnd`, `AsyncFrontEnd`).
    _receive: Callable[..., Any]
    _send: Callable[..., Any]
    _close: Callable[..., Any]
    _connect: Callable[[], Any]

    def _connection_failed(self, exc: BaseException) -> bool:
        # A timeout is not a failed connection: the front end says no answer came in time.
        failure = isinstance(exc, self._failures + (KeyServiceUnreachable,))
        return failure and not isinstance(exc, TimeoutError)

    def _stream_start(self, connection: C, stream: Stream[Any]) -> Plan[LineStream]:
        """Ask for `stream` on `connection` (a connection of its own)."""
        lines = LineStream(self._endpoint.host_header)
        try:
            yield Send(connection, lines.request(stream.target, self.sae_id))
        except self._failures as exc:
            raise failed(self._endpoint.where, exc) from exc
        return lines

    def _stream_next(self, connection: C, lines: LineStream, stream: Stream[T]) -> Plan[list[T]]:
        """The next values of `stream` (maybe none); KeyServiceUnreachable once it ended."""
        if lines.ended:
            raise KeyServiceUnreachable("the key service ended the stream")
        try:
            data = yield Receive(connection)
        except self._failures as exc:
            raise KeyServiceUnreachable(f"the stream broke: {exc}") from exc
        return [stream.decode(obj) for obj in lines.receive(data)]


class SyncFrontEnd(FrontEnd[C]):
    """A front end for blocking code: carries the plans out as they come."""

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def close(self) -> None:
        connection = self._kept.forget()
        if connection is not None:
            self._close(connection, abort=False)

    def _call_method(self, build: Callable[P, Call[T]]) -> Callable[P, T]:
        def method(*args: P.args, **kwargs: P.kwargs) -> T:
            return self._run(build(*args, **kwargs))

        return method

    def _stream_method(self, build: Callable[P, Stream[T]]) -> Callable[P, Iterator[T]]:
        def method(*args: P.args, **kwargs: P.kwargs) -> Iterator[T]:
            return self._stream(build(*args, **kwargs))

        return method

    def _drive(self, plan: Plan[T]) -> T:
        return drive(plan, self._act)

    def _stream(self, stream: Stream[T]) -> Iterator[T]:
        connection = self._open_stream()
        try:
            lines = self._drive(self._stream_start(connection, stream))
            while True:
                yield from self._drive(self._stream_next(connection, lines, stream))
        finally:
            self._close(connection, abort=True)

    def _act(self, action: Action) -> Any:
        return self._operation(action)()

    # -- what a front end carries out -------------------------------------------------------

    def _run(self, call: Call[T]) -> T:
        """`call`'s value (`self._drive(self._call_plan(call))`), bounded in time."""
        raise NotImplementedError

    def _open_stream(self) -> C:
        """A new connection for a stream, connected within the client's timeout."""
        raise NotImplementedError

    def _connect(self) -> C:
        raise NotImplementedError

    def _send(self, connection: C, data: bytes) -> None:
        raise NotImplementedError

    def _receive(self, connection: C) -> bytes:
        raise NotImplementedError

    def _close(self, connection: C, abort: bool) -> None:
        raise NotImplementedError


class AsyncFrontEnd(FrontEnd[C]):
    """A front end for an event loop (asyncio, Trio): carries the plans out, awaiting."""

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        connection = self._kept.forget()
        if connection is not None:
            await self._close(connection, abort=False)

    def _call_method(self, build: Callable[P, Call[T]]) -> Callable[P, Awaitable[T]]:
        async def method(*args: P.args, **kwargs: P.kwargs) -> T:
            return await self._run(build(*args, **kwargs))

        return method

    def _stream_method(self, build: Callable[P, Stream[T]]) -> Callable[P, AsyncIterator[T]]:
        def method(*args: P.args, **kwargs: P.kwargs) -> AsyncIterator[T]:
            return self._stream(build(*args, **kwargs))

        return method

    async def _drive(self, plan: Plan[T]) -> T:
        return await drive_async(plan, self._act)

    async def _stream(self, stream: Stream[T]) -> AsyncIterator[T]:
        connection = await self._open_stream()
        try:
            lines = await self._drive(self._stream_start(connection, stream))
            while True:
                for value in await self._drive(self._stream_next(connection, lines, stream)):
                    yield value
        finally:
            await self._close(connection, abort=True)

    async def _act(self, action: Action) -> Any:
        return await self._operation(action)()

    # -- what a front end carries out -------------------------------------------------------

    async def _run(self, call: Call[T]) -> T:
        """`call`'s value (`await self._drive(self._call_plan(call))`), bounded in time."""
        raise NotImplementedError

    async def _open_stream(self) -> C:
        """A new connection for a stream, connected within the client's timeout."""
        raise NotImplementedError

    async def _connect(self) -> C:
        raise NotImplementedError

    async def _send(self, connection: C, data: bytes) -> None:
        raise NotImplementedError

    async def _receive(self, connection: C) -> bytes:
        raise NotImplementedError

    async def _close(self, connection: C, abort: bool) -> None:
        raise NotImplementedError
