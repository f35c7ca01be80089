"""HTTP/1.1 on one established connection, with Trio (`serve_stream`): the code every
listener shares (the Unix socket `qkdd.http_server.unix_socket`, TLS `qkdd.http_server.tls`,
the metrics listener).

Theory of operation: the task loops "read one request, answer it" while h11 says the
connection can be kept alive. Every read of a request and every write of a response runs under
a deadline, so a client that stalls costs one task for at most `request_timeout` seconds, and a
connection with no request in progress is closed after `idle_timeout` (or when its
`ConnectionSlot` is evicted to make room); any failure of one connection ends only that
connection. The handler is sans-IO (e.g. `qkdd.etsi014.handler`); this module only moves
bytes. A request in the plainest form (nearly every one) is read, and its answer written,
without h11 (`qkdd.http_server.plain_http`); h11 reads anything else, and writes the answers
the plain path leaves to it, on the same connection.

Answers that need I/O (`qkdd.http_server.exchange`): a `Deferred` one is awaited, shielded
from shutdown unless it says otherwise; a `Streamed` one is sent chunked as it is produced,
until it ends or the client closes its end, and is its connection's last answer. Before it
sends any bytes of an answer the connection awaits `before_send`, if given: the daemon's
durability barrier (`qkdd.durability`), so nothing a caller is told (keys handed out, a
message stored) can be lost to a power cut after the caller heard it.

Logging goes to "qkdd.api", one event per line: caller, SAE IDs, key IDs and status; never
request or response bodies, since those carry key material.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Sequence
from typing import Protocol

import h11
import trio

from qkdd.constants import (
    DEFAULT_REQUEST_TIMEOUT,
    LINGER_MAX_BYTES,
    LINGER_SECONDS,
    MAX_HEADER_BYTES,
)
from qkdd.http_server.accept import ConnectionSlot
from qkdd.http_server.exchange import (
    Answer,
    ApiRequest,
    ApiResponse,
    Caller,
    Deferred,
    Streamed,
    error_response,
)
from qkdd.http_server.plain_http import PlainResponses, parse_plain, reason

log = logging.getLogger("qkdd.api")

RECEIVE_SIZE = 16 * 1024
# Heads of answers written without h11, shared by every connection.
_PLAIN_RESPONSES = PlainResponses()


class Handler(Protocol):
    """What `serve_stream` serves: a sans-IO request handler (the ETSI API's
    `qkdd.etsi014.handler.RequestHandler`, SKIP's, or one of its own such as the metrics
    listener's)."""

    def handle(self, request: ApiRequest, caller: Caller) -> Answer: ...

    def body_limit(self, target: str) -> int: ...

    def body_too_large(self, target: str, limit: int) -> ApiResponse: ...


# Told of every answered request: the request, its response, and the seconds the handler took
# (e.g. to feed metrics). It must not block; an exception it raises is logged and ignored.
Observe = Callable[[ApiRequest, ApiResponse, float], None]

# Awaited before the bytes of an answer are sent (the store's durability barrier). What it
# raises ends the connection without the answer.
BeforeSend = Callable[[], Awaitable[None]]


class _BodyTooLarge(Exception):
    def __init__(self, target: str, limit: int) -> None:
        super().__init__(target, limit)
        self.target = target
        self.limit = limit


async def serve_stream(
    stream: trio.abc.Stream,
    handler: Handler,
    caller: Caller,
    *,
    who: str,
    request_timeout: float = DEFAULT_REQUEST_TIMEOUT,
    idle_timeout: float | None = None,
    slot: ConnectionSlot | None = None,
    conn_id: int = 0,
    observe: Observe | None = None,
    request_log_level: int = logging.INFO,
    before_send: BeforeSend | None = None,
) -> None:
    """Answer HTTP/1.1 requests from `caller` on one established connection until it ends.

    Shared by every transport (Unix socket, TLS). `who` names the caller in log events, as
    "key=value" fields. A failure of the connection is logged, never raised. The stream is left
    open for the transport to close, after an EOF and a drain of the client's unread input
    (not after an idle connection was let go: nothing is owed to it). `observe` is told of
    each request the handler answered. While no request is in progress the connection waits
    at most `idle_timeout` (default: `request_timeout`), and its `slot` may evict it.
    Each answered request is logged at `request_log_level`. `before_send` is awaited before
    each answer's bytes (and each chunk of a streamed one) are sent.
    """
    idle = request_timeout if idle_timeout is None else idle_timeout
    connection = _Connection(
        stream, handler, caller, who, (request_timeout, idle), slot, conn_id, observe
    )
    connection.request_log_level = request_log_level
    connection.before_send = before_send
    try:
        await connection.run()
        if not connection.peer_closed and not connection.let_go_idle:
            await drain_and_close(_half_closeable(stream))
    except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
        log.debug("event=api_dropped conn=%d reason=%r", conn_id, str(exc))
    except Exception:
        # One connection's failure must never end the server.
        log.exception("event=api_connection_failed conn=%d", conn_id)
    log.debug("event=api_closed conn=%d", conn_id)


def _half_closeable(stream: trio.abc.Stream) -> trio.abc.HalfCloseableStream:
    """The stream to send EOF on and drain. TLS cannot half-close without ending TLS, so a TLS
    stream's TCP transport is used: an HTTPS client takes a FIN after a complete response as
    the end, and the input left to drain is discarded unread anyway."""
    while isinstance(stream, trio.SSLStream):
        stream = stream.transport_stream
    if not isinstance(stream, trio.abc.HalfCloseableStream):
        raise TypeError(f"cannot half-close a {type(stream).__name__}")
    return stream


async def drain_and_close(stream: trio.abc.HalfCloseableStream) -> None:
    """Send EOF, then read and discard input until EOF, LINGER_MAX_BYTES or LINGER_SECONDS."""
    with trio.move_on_after(LINGER_SECONDS):
        await stream.send_eof()
        drained = 0
        while drained < LINGER_MAX_BYTES:
            chunk = await stream.receive_some(RECEIVE_SIZE)
            if not chunk:
                break
            drained += len(chunk)


class _Connection:
    def __init__(
        self,
        stream: trio.abc.Stream,
        handler: Handler,
        caller: Caller,
        who: str,
        timeouts: tuple[float, float],
        slot: ConnectionSlot | None,
        conn_id: int,
        observe: Observe | None = None,
    ) -> None:
        self._stream = stream
        self._handler = handler
        self._caller = caller
        self._who = who
        self._timeout, self._idle_timeout = timeouts
        self._slot = slot
        self._id = conn_id
        self._observe = observe
        self._h11 = h11.Connection(h11.SERVER, max_incomplete_event_size=MAX_HEADER_BYTES)
        # Between requests h11 holds no bytes (`_h11_idle`): what arrives is kept here, and
        # a plain request is read from here without h11 (`plain_http`); anything else goes
        # to h11, which then reads on to the end of its request/response cycle.
        self._buffer = bytearray()
        self._h11_idle = True
        # The bytes of the request being answered, when it was read without h11 (h11 is
        # given them only if it has to write the answer: `_catch_up_h11`).
        self._plain_request: bytes | None = None
        self._eof = False  # the peer closed its end between requests
        # Closed while idle (timed out, or evicted to make room): no request was cut short.
        self.let_go_idle = False
        self.request_log_level = logging.INFO
        self.before_send: BeforeSend | None = None

    @property
    def peer_closed(self) -> bool:
        return self._eof or self._h11.their_state is h11.CLOSED

    async def run(self) -> None:
        while True:
            request = await self._read_request()
            if request is None:
                return
            start = trio.current_time()
            try:
                handled = self._handler.handle(request, self._caller)
            except Exception:
                handled = self._failed(request)
            if isinstance(handled, Streamed):
                self._catch_up_h11()
                await self._stream_answer(request, handled)
                return
            if isinstance(handled, Deferred) and not handled.shielded:
                handled = await self._complete(request, handled)  # abandoned on shutdown
            # Shielded work may hand keys out (and erase them): once started it finishes
            # (it bounds its own time), and its answer must reach the caller even when the
            # daemon is shutting down. The sending is bounded by the send timeout.
            with trio.CancelScope(shield=True) as answering:
                if isinstance(handled, Deferred):
                    handled = await self._complete(request, handled)
                response = handled
                elapsed = trio.current_time() - start
                self._log(request, response, elapsed)
                if self._observe is not None:
                    try:
                        self._observe(request, response, elapsed)
                    except Exception:
                        # Metrics must never cost a caller its answer.
                        log.exception("event=api_observe_failed conn=%d", self._id)
                sent = await self._send(response, head=request.method == "HEAD", scope=answering)
            if answering.cancelled_caught:
                log.info("event=api_send_timeout conn=%d timeout=%g", self._id, self._timeout)
                return
            if not sent:
                return
            if self._plain_request is not None:  # read and answered without h11
                self._plain_request = None
                continue
            if self._h11.our_state is not h11.DONE or self._h11.their_state is not h11.DONE:
                return
            self._h11.start_next_cycle()
            pending, closed = self._h11.trailing_data
            self._h11_idle = not pending and not closed

    def _failed(self, request: ApiRequest) -> ApiResponse:
        log.exception(
            "event=api_handler_failed conn=%d method=%s target=%s",
            self._id,
            request.method,
            printable(request.target),
        )
        return error_response(503, "internal error in the key service; see the daemon log")

    async def _complete(self, request: ApiRequest, deferred: Deferred) -> ApiResponse:
        try:
            return await deferred.complete()
        except Exception:
            return self._failed(request)

    async def _read_request(self) -> ApiRequest | None:
        """The next complete request, or None when the connection should end (after any
        error response has been sent)."""
        if self._h11_idle:
            if not self._buffer:
                first = await self._wait_idle()
                if first is None:
                    self.let_go_idle = True
                    return None
                if not first:
                    self._eof = True
                    return None
                self._buffer += first
            plain = parse_plain(self._buffer, MAX_HEADER_BYTES, self._handler.body_limit)
            if plain is not None:
                self._plain_request = bytes(self._buffer[: plain.used])
                del self._buffer[: plain.used]
                return ApiRequest(plain.method, plain.target, plain.headers, plain.body)
            self._h11.receive_data(bytes(self._buffer))
            self._buffer.clear()
            self._h11_idle = False
        problem: ApiResponse | None = None
        with trio.move_on_after(self._timeout):
            try:
                return await self._receive_request()
            except h11.RemoteProtocolError as exc:
                problem = error_response(exc.error_status_hint, f"malformed HTTP request: {exc}")
            except _BodyTooLarge as exc:
                problem = self._handler.body_too_large(exc.target, exc.limit)
        if problem is None:  # timed out
            problem = error_response(408, f"request not received within {self._timeout:g} s")
        log.info(
            "event=api_rejected conn=%d %s status=%d %s",
            self._id,
            self._who,
            problem.status,
            printable(problem.note),
        )
        if self._h11.our_state in (h11.IDLE, h11.SEND_RESPONSE):
            await self._send(problem)
        return None

    async def _wait_idle(self) -> bytes | None:
        """The first bytes of the next request (b"" at EOF), or None if none came within the
        idle timeout or the connection was evicted meanwhile. (Bytes that did come are
        served even if the connection was evicted as they arrived; it then closes after.)"""
        if self._slot is not None and self._slot.evicted:
            return None
        waiting = (
            self._slot.idle(self._idle_timeout)
            if self._slot is not None
            else trio.move_on_after(self._idle_timeout)
        )
        data = None
        with waiting:
            data = bytes(await self._stream.receive_some(RECEIVE_SIZE))
        if data is None:
            log.debug(
                "event=api_idle_closed conn=%d evicted=%s",
                self._id,
                self._slot is not None and self._slot.evicted,
            )
            return None
        return data

    async def _receive_request(self) -> ApiRequest | None:
        event = await self._next_event()
        if isinstance(event, h11.ConnectionClosed):
            return None
        assert isinstance(event, h11.Request), event
        target = event.target.decode("ascii", "replace")
        limit = self._handler.body_limit(target)
        length = _content_length(event.headers)
        if length is not None and length > limit:
            raise _BodyTooLarge(target, limit)
        if self._h11.they_are_waiting_for_100_continue:
            go_on = self._h11.send(
                h11.InformationalResponse(status_code=100, headers=[], reason=reason(100))
            )
            if not go_on or not await self._send_bytes(go_on):
                return None
        body = bytearray()
        while True:
            part = await self._next_event()
            if isinstance(part, h11.Data):
                body += part.data
                if len(body) > limit:
                    raise _BodyTooLarge(target, limit)
            elif isinstance(part, h11.EndOfMessage):
                break
            else:  # ConnectionClosed mid-request
                return None
        return ApiRequest(
            method=event.method.decode("ascii"),
            target=event.target.decode("ascii", "replace"),
            headers=tuple(
                (name.decode("ascii"), value.decode("latin-1")) for name, value in event.headers
            ),
            body=bytes(body),
        )

    async def _next_event(self) -> h11.Event:
        while True:
            event = self._h11.next_event()
            # PAUSED only follows a complete request, and we never read past one.
            assert event is not h11.PAUSED
            if event is not h11.NEED_DATA:
                return event  # type: ignore[return-value]
            data = await self._stream.receive_some(RECEIVE_SIZE)
            self._h11.receive_data(bytes(data))  # b"" is EOF

    def _catch_up_h11(self) -> None:
        """Give h11 the request being answered if it was read without h11, so h11 can
        write the answer (a streamed one, or headers `plain_http` leaves to it)."""
        request, self._plain_request = self._plain_request, None
        if request is None:
            return
        self._h11.receive_data(request)
        self._h11_idle = False
        while True:  # the Request, its Data: read already
            event = self._h11.next_event()
            if isinstance(event, h11.EndOfMessage):
                return
            if not isinstance(event, h11.Request | h11.Data):
                raise RuntimeError(f"h11 read a plain request otherwise: {event!r}")

    async def _send(
        self, response: ApiResponse, *, head: bool = False, scope: trio.CancelScope | None = None
    ) -> bool:
        """Send `response`; False if the connection is gone or must close. With `scope`,
        the send timeout is its deadline (see `_send_bytes`)."""
        if self._plain_request is not None:
            start = _PLAIN_RESPONSES.head(response.status, response.headers, len(response.body))
            if start is not None:
                return await self._send_bytes(
                    start + response.body if response.body and not head else start, scope
                )
            self._catch_up_h11()
        headers = [*response.headers, ("content-length", str(len(response.body)))]
        keep = self._h11.their_state is h11.DONE
        if not keep:  # the request was not read to its end; h11 will close after this
            headers.append(("connection", "close"))
        try:
            data = self._h11.send(
                h11.Response(
                    status_code=response.status, headers=headers, reason=reason(response.status)
                )
            )
            if response.body and not head:
                data += self._h11.send(h11.Data(data=response.body))
            data += self._h11.send(h11.EndOfMessage())
        except h11.LocalProtocolError as exc:
            log.warning("event=api_cannot_answer conn=%d reason=%r", self._id, str(exc))
            return False
        return await self._send_bytes(data, scope)

    async def _stream_answer(self, request: ApiRequest, answer: Streamed) -> None:
        """Send a chunked body as it is produced, until it ends or the client goes away;
        the connection then closes (a stream is its connection's last answer)."""
        log.info(
            "event=api_stream_opened conn=%d %s target=%s %s",
            self._id,
            self._who,
            printable(request.target),
            printable(answer.note),
        )
        headers = [*answer.headers, ("transfer-encoding", "chunked"), ("connection", "close")]
        sent = 0
        try:
            data = self._h11.send(
                h11.Response(
                    status_code=answer.status, headers=headers, reason=reason(answer.status)
                )
            )
            if not await self._send_bytes(data):
                return
            async with trio.open_nursery() as nursery:
                # A client that closes its end stops the stream at once, not at the next chunk.
                nursery.start_soon(self._cancel_on_eof, nursery.cancel_scope)
                chunks = answer.chunks()
                try:
                    async for chunk in chunks:
                        if not await self._send_bytes(self._h11.send(h11.Data(data=chunk))):
                            break
                        sent += 1
                    else:
                        await self._send_bytes(self._h11.send(h11.EndOfMessage()))
                finally:
                    with trio.CancelScope(shield=True):
                        await chunks.aclose()  # type: ignore[attr-defined]
                nursery.cancel_scope.cancel()
        finally:
            log.info("event=api_stream_closed conn=%d chunks=%d", self._id, sent)

    async def _cancel_on_eof(self, scope: trio.CancelScope) -> None:
        try:
            while await self._stream.receive_some(RECEIVE_SIZE):
                pass  # nothing may follow a request on a streaming connection
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass
        scope.cancel()

    async def _send_bytes(self, data: bytes, scope: trio.CancelScope | None = None) -> bool:
        """Send `data` within the send timeout; False if the connection is gone or the time
        ran out. With `scope` (the caller's), the timeout is set as its deadline, and
        running out cancels it: the caller sees that as its ``cancelled_caught``."""
        # The one way out of a connection: whatever the handler committed (keys erased as
        # handed out, a message stored) is made durable before the caller hears of it.
        if self.before_send is not None:
            await self.before_send()
        if scope is not None:
            scope.deadline = trio.current_time() + self._timeout
            try:
                await self._stream.send_all(data)
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                log.debug("event=api_client_gone conn=%d", self._id)
                return False
            return True
        with trio.move_on_after(self._timeout) as scope:
            try:
                await self._stream.send_all(data)
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                log.debug("event=api_client_gone conn=%d", self._id)
                return False
        if scope.cancelled_caught:
            log.info("event=api_send_timeout conn=%d timeout=%g", self._id, self._timeout)
            return False
        return True

    def _log(self, request: ApiRequest, response: ApiResponse, elapsed: float) -> None:
        if not log.isEnabledFor(self.request_log_level):
            return
        log.log(
            self.request_log_level,
            "event=api_request conn=%d %s method=%s target=%s status=%d %s ms=%.2f",
            self._id,
            self._who,
            request.method,
            printable(request.target),
            response.status,
            printable(response.note),
            elapsed * 1000,
        )


def _content_length(headers: Sequence[tuple[bytes, bytes]]) -> int | None:
    for name, value in headers:
        if name == b"content-length":
            return int(value)  # h11 has already checked it is a number
    return None


def printable(text: str) -> str:
    """Escape control characters so a log event stays on one line."""
    if text.isprintable():
        return text
    return text.encode("unicode_escape").decode("ascii")
