"""A sans-IO HTTP/1.1 client connection: `ClientConnection` turns a request into bytes and the
bytes received into events (`Response`, `Data`, `EndOfMessage`, `ConnectionClosed`), and says
whether the connection may carry another request. No sockets, no clock, no event loop.

It covers what a client of a JSON API over a kept-alive connection meets (RFC 9112): a status
line and headers (LF line ends tolerated, obs-fold refused), interim 1xx answers skipped, a body
framed by Content-Length, by chunked transfer coding (extensions and trailers read and
dropped), or by the end of the connection; no body for HEAD, 204 and 304; keep-alive unless the
answer says `Connection: close` or is HTTP/1.0. Anything else is `HttpProtocolError`. Limits:
the response head and the trailers are capped at `max_head_bytes`, a chunk-size line at 1 KiB;
the body is streamed as `Data` events, so whoever collects it sets its size limit.

Nothing here is specific to qkdd's API and the module imports only the standard library, so
another client of an HTTP/1.1 service (a KME's ETSI GS QKD 014 API, say) can move its bytes
through it the same way, mapping `HttpProtocolError` to errors of its own.
"""

from __future__ import annotations

import enum
import re
from collections.abc import Sequence
from dataclasses import dataclass, field

__all__ = [
    "ClientConnection",
    "ConnectionClosed",
    "Data",
    "EndOfMessage",
    "Event",
    "HttpProtocolError",
    "Response",
]

MAX_HEAD_BYTES = 64 * 1024
MAX_CHUNK_LINE = 1024

_TOKEN = rb"[!#$%&'*+.^_`|~0-9A-Za-z-]+"
_TOKEN_TEXT = re.compile(_TOKEN.decode())
_HEAD_END = re.compile(rb"\r?\n\r?\n")
_STATUS_LINE = re.compile(rb"HTTP/(\d)\.(\d) (\d{3})(?: (.*))?", re.DOTALL)
_HEADER_LINE = re.compile(rb"(" + _TOKEN + rb"):[ \t]*(.*?)[ \t]*", re.DOTALL)
# Control characters other than horizontal tab may appear nowhere in a head line.
_CONTROL = re.compile(rb"[\x00-\x08\x0a-\x1f\x7f]")
_CONTROL_TEXT = re.compile(r"[\x00-\x08\x0a-\x1f\x7f]")
_CHUNK_SIZE = re.compile(rb"([0-9A-Fa-f]{1,16})[ \t]*(?:;.*)?", re.DOTALL)


class HttpProtocolError(Exception):
    """The bytes received are not an HTTP/1.1 response this client can read."""


@dataclass(frozen=True)
class Response:
    """The status line and headers of the (final) response; header names in lower case."""

    status: int
    reason: str
    headers: tuple[tuple[str, str], ...]
    http_version: str

    def header(self, name: str) -> str | None:
        """The values of header `name` joined by ", " (None when absent)."""
        values = [value for key, value in self.headers if key == name.lower()]
        return ", ".join(values) if values else None


@dataclass(frozen=True)
class Data:
    """Part of the response body. Key material passes through here: never in a repr."""

    data: bytes = field(repr=False)


@dataclass(frozen=True)
class EndOfMessage:
    """The response is whole."""


@dataclass(frozen=True)
class ConnectionClosed:
    """The other end closed the connection before the response was whole (or before any)."""


Event = Response | Data | EndOfMessage | ConnectionClosed


class _State(enum.Enum):
    IDLE = "no request outstanding"
    HEAD = "reading the status line and headers"
    LENGTH = "reading a Content-Length body"
    CHUNK_SIZE = "reading a chunk-size line"
    CHUNK_DATA = "reading chunk data"
    CHUNK_END = "reading the line end after chunk data"
    TRAILERS = "reading trailers"
    UNTIL_CLOSE = "reading a body that ends with the connection"
    DONE = "response whole"
    CLOSED = "connection closed"


class ClientConnection:
    """One HTTP/1.1 client connection's bytes in and out, one request at a time, without I/O.

    `send_request` returns the bytes to send; `receive` takes the bytes received (b"" at the
    end of the connection) and returns the events they complete; once an `EndOfMessage` came,
    `next_cycle` readies the connection for the next request, or says it must be closed.
    """

    def __init__(self, host: str, *, max_head_bytes: int = MAX_HEAD_BYTES) -> None:
        _check_value("Host", host)
        self.host = host
        self.max_head_bytes = max_head_bytes
        self.used = False  # a request went out on this connection
        self._state = _State.IDLE
        self._buffer = bytearray()
        self._method = ""
        self._keep_alive = True
        self._eof = False
        self._remaining = 0
        self._trailer_bytes = 0

    @property
    def state(self) -> str:
        """Where the connection is, in words (for messages and tests)."""
        return self._state.value

    def send_request(
        self,
        method: str,
        target: str,
        headers: Sequence[tuple[str, str]] = (),
        body: bytes | None = None,
    ) -> bytes:
        """The bytes of a request. Host is added, and Content-Length when `body` is not None
        (an empty body is sent as Content-Length: 0). ValueError for a request that cannot be
        written (a bad method, target or header), RuntimeError while one is outstanding."""
        if self._state is not _State.IDLE:
            raise RuntimeError(f"cannot send a request now: {self._state.value}")
        if not _TOKEN_TEXT.fullmatch(method):
            raise ValueError(f"invalid HTTP method {method!r}")
        if not target or not target.isascii() or any(c <= " " or c == "\x7f" for c in target):
            raise ValueError(f"invalid request target {target!r}")
        lines = [f"{method} {target} HTTP/1.1", f"Host: {self.host}"]
        for name, value in headers:
            if not _TOKEN_TEXT.fullmatch(name):
                raise ValueError(f"invalid header name {name!r}")
            _check_value(name, value)
            lines.append(f"{name}: {value}")
            if name.lower() == "connection" and "close" in _tokens(value):
                self._keep_alive = False
        if body is not None:
            lines.append(f"Content-Length: {len(body)}")
        self._method = method.upper()
        self._state = _State.HEAD
        self.used = True
        head = ("\r\n".join(lines) + "\r\n\r\n").encode("ascii")
        return head + body if body else head

    def receive(self, data: bytes) -> list[Event]:
        """Feed bytes received, or b"" at the end of the connection; the events completed.
        Raises HttpProtocolError for bytes that are not a response this client can read."""
        if self._state is _State.CLOSED:
            return []
        if data:
            self._buffer += data
        else:
            self._eof = True
        events: list[Event] = []
        while self._step(events):
            pass
        return events

    def next_cycle(self) -> bool:
        """Ready the connection for another request; False when it must be closed instead
        (the answer said so, was framed by the end of the connection, is not whole, or more
        bytes than the answer came)."""
        if self._state is _State.IDLE and not self._eof and not self._buffer:
            return True
        if self._state is not _State.DONE or not self._keep_alive:
            return False
        if self._eof or self._buffer:
            return False
        self._state, self._method, self._keep_alive = _State.IDLE, "", True
        return True

    # -- parsing ------------------------------------------------------------------------

    def _step(self, events: list[Event]) -> bool:
        """Parse what the buffer holds in the current state; True to go on parsing."""
        state = self._state
        if state is _State.HEAD:
            return self._read_head(events)
        if state is _State.LENGTH or state is _State.CHUNK_DATA:
            self._emit_data(events, self._remaining)
            if self._remaining == 0:
                if state is _State.LENGTH:
                    return self._end(events)
                self._state = _State.CHUNK_END
                return True
            return self._closed(events) if self._eof else False
        if state is _State.CHUNK_SIZE:
            line = self._take_line(MAX_CHUNK_LINE, "a chunk-size line")
            if line is None:
                return self._closed(events) if self._eof else False
            match = _CHUNK_SIZE.fullmatch(line)
            if match is None:
                raise HttpProtocolError(f"invalid chunk-size line {line[:40]!r}")
            self._remaining = int(match[1], 16)
            self._state = _State.CHUNK_DATA if self._remaining else _State.TRAILERS
            self._trailer_bytes = 0
            return True
        if state is _State.CHUNK_END:
            line = self._take_line(MAX_CHUNK_LINE, "the end of a chunk")
            if line is None:
                return self._closed(events) if self._eof else False
            if line:
                raise HttpProtocolError("chunk data is longer than its chunk size")
            self._state = _State.CHUNK_SIZE
            return True
        if state is _State.TRAILERS:
            return self._read_trailer(events)
        if state is _State.UNTIL_CLOSE:
            self._emit_data(events, len(self._buffer))
            return self._end(events) if self._eof else False
        return False  # IDLE, DONE: bytes wait in the buffer (next_cycle refuses them)

    def _read_head(self, events: list[Event]) -> bool:
        # A client should ignore empty lines before the status line (RFC 9112, 2.2).
        while self._buffer.startswith((b"\r\n", b"\n")):
            del self._buffer[: 1 if self._buffer[0] == 10 else 2]
        match = _HEAD_END.search(self._buffer, 0, self.max_head_bytes + 4)
        if match is None or match.start() > self.max_head_bytes:
            if len(self._buffer) > self.max_head_bytes:
                raise HttpProtocolError(f"the response head is over {self.max_head_bytes} bytes")
            return self._closed(events) if self._eof else False
        head = bytes(self._buffer[: match.start()])
        del self._buffer[: match.end()]
        response = _parse_head(head)
        if 100 <= response.status < 200:
            if response.status == 101:
                raise HttpProtocolError("101 Switching Protocols without an upgrade asked for")
            return True  # an interim answer; the final one follows
        self._frame(response)
        events.append(response)
        if self._state is _State.DONE:
            events.append(EndOfMessage())
        return True

    def _frame(self, response: Response) -> None:
        """How the body of `response` ends, and whether the connection stays open."""
        connection = _tokens(response.header("connection") or "")
        if response.http_version != "1.1" or "close" in connection:
            self._keep_alive = False
        if self._method == "HEAD" or response.status in (204, 304):
            self._state = _State.DONE
            return
        coding = response.header("transfer-encoding")
        length = response.header("content-length")
        if coding is not None:
            if _tokens(coding) != ["chunked"]:
                raise HttpProtocolError(f"unsupported transfer coding {coding!r}")
            if length is not None:  # RFC 9112, 6.3: chunked wins; do not reuse
                self._keep_alive = False
            self._state = _State.CHUNK_SIZE
        elif length is not None:
            values = {value.strip() for value in length.split(",")}
            value = values.pop() if len(values) == 1 else ""
            if not value.isdigit() or not value.isascii() or len(value) > 18:
                raise HttpProtocolError(f"invalid Content-Length {length!r}")
            self._remaining = int(value)
            self._state = _State.LENGTH if self._remaining else _State.DONE
        else:
            self._keep_alive = False
            self._state = _State.UNTIL_CLOSE

    def _read_trailer(self, events: list[Event]) -> bool:
        line = self._take_line(self.max_head_bytes, "a trailer line")
        if line is None:
            return self._closed(events) if self._eof else False
        if not line:
            return self._end(events)
        self._trailer_bytes += len(line)
        if self._trailer_bytes > self.max_head_bytes:
            raise HttpProtocolError(f"the trailers are over {self.max_head_bytes} bytes")
        _parse_header_line(line)  # checked, then dropped
        return True

    def _take_line(self, limit: int, what: str) -> bytes | None:
        end = self._buffer.find(b"\n", 0, limit + 2)
        if end < 0:
            if len(self._buffer) > limit + 1:
                raise HttpProtocolError(f"{what} is over {limit} bytes")
            return None
        line = bytes(self._buffer[:end])
        del self._buffer[: end + 1]
        return line.removesuffix(b"\r")

    def _emit_data(self, events: list[Event], most: int) -> None:
        count = min(most, len(self._buffer))
        if count:
            events.append(Data(bytes(self._buffer[:count])))
            del self._buffer[:count]
            self._remaining -= count

    def _end(self, events: list[Event]) -> bool:
        events.append(EndOfMessage())
        self._state = _State.DONE
        return True

    def _closed(self, events: list[Event]) -> bool:
        events.append(ConnectionClosed())
        self._state = _State.CLOSED
        self._buffer.clear()
        return False


def _parse_head(head: bytes) -> Response:
    lines = [line.removesuffix(b"\r") for line in head.split(b"\n")]
    match = _STATUS_LINE.fullmatch(lines[0])
    if match is None or _CONTROL.search(lines[0]):
        raise HttpProtocolError(f"invalid status line {lines[0][:80]!r}")
    if match[1] != b"1":
        raise HttpProtocolError(f"HTTP/{match[1].decode()}.{match[2].decode()} is not HTTP/1")
    headers = tuple(_parse_header_line(line) for line in lines[1:])
    return Response(
        status=int(match[3]),
        reason=(match[4] or b"").decode("latin-1"),
        headers=headers,
        http_version=f"{match[1].decode()}.{match[2].decode()}",
    )


def _parse_header_line(line: bytes) -> tuple[str, str]:
    if line[:1] in (b" ", b"\t"):
        raise HttpProtocolError("folded header lines (obs-fold) are not accepted")
    match = _HEADER_LINE.fullmatch(line)
    if match is None or _CONTROL.search(match[2]):
        raise HttpProtocolError(f"invalid header line {line[:80]!r}")
    return match[1].decode("ascii").lower(), match[2].decode("latin-1")


def _tokens(value: str) -> list[str]:
    return [token.strip().lower() for token in value.split(",") if token.strip()]


def _check_value(name: str, value: str) -> None:
    if not value.isascii() or _CONTROL_TEXT.search(value) or value != value.strip(" \t"):
        raise ValueError(f"invalid value for header {name}: {value!r}")
