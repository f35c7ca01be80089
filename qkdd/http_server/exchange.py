"""One HTTP exchange as the daemon's handlers see it, without I/O: the `ApiRequest`, the
`Caller` who sent it (fixed by the transport: SO_PEERCRED on the Unix socket, the client
certificate over TLS) and the `Answer` that goes back.

Owns the request and response types, the two answers that need I/O first (a `Deferred`
answer the server awaits, a `Streamed` one it sends chunked as it is produced), the reading
of a request target (origin- or absolute-form, RFC 3986 characters only) and of a JSON object
body, and the error answers. Every error, on every route, is the ETSI GS QKD 014 Error object
({"message": ..., "details": [...]}), so a client reads one shape whatever it called; a route
ends its request with one by `reject`, and `answer_or_error` turns what a route raises into
its answer, for a `Deferred` answer when it completes.
"""

from __future__ import annotations

import functools
import json
import re
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any, Final, NoReturn
from urllib.parse import urlsplit

JSON_HEADERS: tuple[tuple[str, str], ...] = (("content-type", "application/json"),)
# A stream of JSON texts, one a line (a `Streamed` answer's chunks).
NDJSON_HEADERS: Final = (("content-type", "application/x-ndjson"),)

# What a request target's path and query may hold (RFC 3986 pchar, "/" and "?"): anything
# else, e.g. a bare "[" or a space, makes the target malformed.
_TARGET_CHARS = re.compile(r"(?:[A-Za-z0-9\-._~!$&'()*+,;=:@/?]|%[0-9A-Fa-f]{2})*")


@dataclass(frozen=True)
class Caller:
    """Who is on the other end of the socket: credentials and the SAE IDs it may act as.

    ``description`` names the caller in answers when it is not a local user known by uid
    (e.g. "client certificate with subject 'CN=app'"), and ``mapping_hint`` says how the
    operator grants it an SAE."""

    uid: int | None
    gid: int | None
    sae_ids: frozenset[str]
    description: str = ""
    mapping_hint: str = ""

    def describe(self) -> str:
        return self.description or f"local user (uid {self.uid}, gid {self.gid})"

    def how_to_map(self) -> str:
        return self.mapping_hint or "map it to an SAE in the daemon's configuration"


@dataclass(frozen=True)
class ApiRequest:
    method: str
    target: str
    headers: tuple[tuple[str, str], ...] = ()  # names in lower case
    body: bytes = b""

    def header_values(self, name: str) -> list[str]:
        return [value for key, value in self.headers if key == name]


@dataclass(frozen=True)
class ApiResponse:
    status: int
    headers: tuple[tuple[str, str], ...]
    body: bytes
    # One-line outcome for the access log: SAE IDs, key IDs, error messages; never key material.
    note: str = ""


@dataclass(frozen=True)
class Deferred:
    """An answer that needs I/O before it exists: the server awaits ``complete()``.

    ``shielded`` work (it may hand keys out) runs to its end even when the daemon stops, so
    its answer is not lost; unshielded work (e.g. waiting for a message to arrive) is simply
    abandoned."""

    complete: Callable[[], Awaitable[ApiResponse]]
    shielded: bool = True


@dataclass(frozen=True)
class Streamed:
    """An answer whose body is produced over time and sent chunked as it comes; it ends
    when ``chunks`` ends (or the client goes away)."""

    status: int
    headers: tuple[tuple[str, str], ...]
    chunks: Callable[[], AsyncIterator[bytes]]
    note: str = ""


Answer = ApiResponse | Deferred | Streamed

# A route a handler passes requests on to (e.g. the daemon's own routes beside the ETSI API):
# the request and its caller in, an answer out.
Extension = Callable[[ApiRequest, Caller], Answer]


class Reject(Exception):
    """Ends handling of one request with an error answer (`rejection_response`)."""

    def __init__(self, status: int, message: str, details: Sequence[dict[str, Any]] = ()) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.details = list(details)


def reject(status: int, message: str, *details: dict[str, Any]) -> NoReturn:
    """End the request being handled with this status and the Error object."""
    raise Reject(status, message, details)


class MethodNotAllowed(Reject):
    """405, with an Allow header naming the methods the route takes."""

    def __init__(self, allowed: tuple[str, ...]) -> None:
        super().__init__(405, f"method not allowed here; use {' or '.join(allowed)}")
        self.allowed = allowed


def rejection_response(rej: Reject) -> ApiResponse:
    """The answer that ends a request rejected with `rej`."""
    allow = (("allow", ", ".join(rej.allowed)),) if isinstance(rej, MethodNotAllowed) else ()
    return error_response(rej.status, rej.message, rej.details, allow)


def error_response(
    status: int,
    message: str,
    details: Sequence[dict[str, Any]] = (),
    headers: tuple[tuple[str, str], ...] = (),
) -> ApiResponse:
    """An error answer: the ETSI Error object, {"message": ..., "details": [...]}."""
    body = dump_json({"message": message, "details": list(details)})
    return ApiResponse(status, JSON_HEADERS + headers, body, note=f"message={message!r}")


def dump_json(obj: object) -> bytes:
    """`obj` as compact JSON."""
    return json.dumps(obj, separators=(",", ":")).encode()


def json_object(body: bytes, what: str) -> dict[str, Any]:
    """The request body as a JSON object (a `what` object, in errors); 400 when it is not one."""
    if not body:
        reject(400, f"empty request body; send a JSON {what} object")
    try:
        # As json.loads reads bytes, with one decoder for every request.
        obj = _DECODER.decode(body.decode(json.detect_encoding(body), "surrogatepass"))
    except (ValueError, RecursionError, UnicodeDecodeError) as exc:
        reject(400, f"request body is not valid JSON: {exc}")
    if not isinstance(obj, dict):
        reject(400, f"request body must be a JSON {what} object")
    return obj


def _no_constant(name: str) -> NoReturn:
    raise ValueError(f"{name} is not allowed")


_DECODER: Final = json.JSONDecoder(parse_constant=_no_constant)


def split_target(target: str) -> tuple[str, str]:
    """The path and query of an HTTP request target: origin-form ("/path?query") or
    absolute-form ("http://host/path?query"); 400 when it is neither."""
    if target.startswith("/"):
        path, _, query = target.partition("?")
    else:
        try:
            url = urlsplit(target)
        except ValueError:  # e.g. "http://[" ("Invalid IPv6 URL")
            reject(400, "malformed request target")
        if url.scheme not in ("http", "https") or not url.path.startswith("/") or url.fragment:
            reject(400, "malformed request target; send a path such as /api/v1/keys/...")
        path, query = url.path, url.query
    if not _TARGET_CHARS.fullmatch(path) or not _TARGET_CHARS.fullmatch(query):
        reject(400, "malformed request target; percent-encode characters outside RFC 3986")
    return path, query


def answer_or_error(
    dispatch: Callable[[ApiRequest, Caller], Answer],
    request: ApiRequest,
    caller: Caller,
    error_for: Callable[[Exception], ApiResponse],
) -> Answer:
    """`dispatch`'s answer to `request`, or `error_for` what it raised; a `Deferred`
    answer's errors are answered the same way when it completes."""
    try:
        answer = dispatch(request, caller)
    except Exception as exc:
        return error_for(exc)
    if isinstance(answer, Deferred):
        return Deferred(functools.partial(_complete, answer, error_for), answer.shielded)
    return answer


async def _complete(
    deferred: Deferred, error_for: Callable[[Exception], ApiResponse]
) -> ApiResponse:
    try:
        return await deferred.complete()
    except Exception as exc:
        return error_for(exc)
