"""HTTP/1.1 in its plainest form, read and written without h11: the fast path of the API
server (`qkdd.http_server.serving`).

Nearly every request a key service sees is the same few lines: a request line, a handful of
headers and a body framed by Content-Length, all of it in one read. `parse_plain` takes
such a request straight from a connection's buffer. Anything else is left in the buffer
for h11 to read (None): a request not yet complete, HTTP/1.0, a header whose meaning h11
must judge (Transfer-Encoding, Expect, Connection, Upgrade, a repeated Content-Length, no
or several Host), a byte outside printable ASCII, a bare LF, a head over the size limit or
a body over the route's limit. So the fast path reads a strict subset of what h11 accepts,
and reads it as h11 would: the same method, target, header names (lower case) and values
(without surrounding whitespace), the same body.

`PlainResponses.head` writes the status line and headers of an answer with a body of
Content-Length bytes on a kept-alive connection, byte for byte as h11 writes them; headers
that are not plainly valid get None, and h11 writes (or refuses) them instead.

Sans-IO: bytes in, a request or bytes out.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from http import HTTPStatus
from typing import Final, NamedTuple

from qkdd.constants import MAX_HEADS

# h11's grammar (h11._abnf), narrowed to printable ASCII: a token, and a field value of
# visible characters with single spaces or tabs inside, surrounded by optional whitespace.
_REQUEST_LINE: Final = re.compile(r"([A-Z]{1,20}) ([\x21-\x7e]+) HTTP/1\.1")
_HEADER: Final = re.compile(
    r"([-!#$%&'*+.^_`|~0-9a-zA-Z]+):[ \t]*((?:[\x21-\x7e]+(?:[ \t]+[\x21-\x7e]+)*)?)[ \t]*"
)
_TOKEN: Final = re.compile(r"[-!#$%&'*+.^_`|~0-9a-zA-Z]+")
_VALUE: Final = re.compile(r"(?:[\x21-\x7e]+(?:[ \t]+[\x21-\x7e]+)*)?")
_DIGITS: Final = re.compile(r"[0-9]{1,18}")
# Headers whose meaning h11 must judge (framing, connection state, 100-continue).
_FOR_H11: Final = frozenset({"transfer-encoding", "expect", "connection", "upgrade"})
_END_OF_HEAD: Final = b"\r\n\r\n"
# Answers h11 frames or rewrites itself: no body allowed, or headers it sets or reorders.
_NO_BODY: Final = frozenset({204, 304})
_WRITTEN_BY_H11: Final = frozenset({"content-length", "transfer-encoding", "connection", "host"})

Headers = tuple[tuple[str, str], ...]


class PlainRequest(NamedTuple):
    """A request read by `parse_plain`; ``used`` bytes of the buffer held it."""

    method: str
    target: str
    headers: Headers  # names in lower case
    body: bytes
    used: int


class _Head(NamedTuple):
    method: str
    target: str
    headers: Headers
    length: int  # of the body


def parse_plain(
    buffer: bytes | bytearray, max_head: int, body_limit: Callable[[str], int]
) -> PlainRequest | None:
    """The request at the start of ``buffer`` if it is whole and plain (see the module
    docstring), else None: h11 then reads it. ``body_limit(target)`` is the largest body
    the request's route accepts; a larger one is left to h11 too (which refuses it)."""
    end = buffer.find(_END_OF_HEAD, 0, max_head + len(_END_OF_HEAD))
    if end < 0:
        return None
    raw = bytes(buffer[:end])
    head = _HEADS.get(raw)
    if head is None:
        head = _read_head(raw)
        if head is None:
            return None
        if len(_HEADS) >= MAX_HEADS:
            _HEADS.clear()
        _HEADS[raw] = head
    if head.length and head.length > body_limit(head.target):
        return None
    start = end + len(_END_OF_HEAD)
    stop = start + head.length
    if len(buffer) < stop:
        return None
    return PlainRequest(head.method, head.target, head.headers, bytes(buffer[start:stop]), stop)


# Heads read before, by their bytes (at most MAX_HEADS): a caller sends the same head again
# and again (the same target, headers and body length), so most requests are read from here.
_HEADS: dict[bytes, _Head] = {}


def _read_head(raw: bytes) -> _Head | None:
    lines = raw.decode("latin-1").split("\r\n")
    first = _REQUEST_LINE.fullmatch(lines[0])
    if first is None:
        return None
    headers: list[tuple[str, str]] = []
    length: str | None = None
    hosts = 0
    for line in lines[1:]:
        field = _HEADER.fullmatch(line)
        if field is None:
            return None
        name = field[1].lower()
        value = field[2]
        if name in _FOR_H11:
            return None
        if name == "content-length":
            if length is not None or not _DIGITS.fullmatch(value):
                return None
            length = value
        elif name == "host":
            hosts += 1
        headers.append((name, value))
    if hosts != 1:
        return None
    return _Head(first[1], first[2], tuple(headers), int(length) if length is not None else 0)


def reason(status: int) -> bytes:
    """The standard reason phrase of an HTTP status code ("OK", "Not Found"), which h11
    would otherwise leave empty."""
    try:
        return HTTPStatus(status).phrase.encode("ascii")
    except ValueError:
        return b""


class PlainResponses:
    """Status lines and headers of answers, each kind written once and then reused."""

    # Kinds of answer kept at most; a handler has a few dozen (status, headers) pairs.
    MAX_KINDS: Final = 256

    def __init__(self) -> None:
        self._heads: dict[tuple[int, Headers], bytes] = {}

    def head(self, status: int, headers: Headers, length: int) -> bytes | None:
        """The status line and headers of an answer with a ``length``-byte body, ending in
        the blank line; None when a header is not plainly valid (h11 judges it)."""
        key = (status, headers)
        start = self._heads.get(key)
        if start is None:
            if status < 200 or status > 999 or status in _NO_BODY:
                return None
            for name, value in headers:
                if not _TOKEN.fullmatch(name) or not _VALUE.fullmatch(value):
                    return None
                if name.lower() in _WRITTEN_BY_H11:
                    return None
            start = b"HTTP/1.1 %d %s\r\n" % (status, reason(status)) + b"".join(
                b"%s: %s\r\n" % (name.encode("ascii"), value.encode("ascii"))
                for name, value in headers
            )
            if len(self._heads) >= self.MAX_KINDS:
                self._heads.clear()
            self._heads[key] = start
        return b"%scontent-length: %d\r\n\r\n" % (start, length)
