"""A request and its whole answer on a kept-alive HTTP/1.1 connection to a JSON service,
without I/O: what qkdd's own client (this package's front ends) and the daemon's driver for
a KME serving ETSI GS QKD 014 (`qkdd_drivers.kme`) both do on the wire, written once.

- `Service`: who answers, as messages and errors name it: its name, the exception types of
  a failed connection and of an answer that is not the API, the size limit of an answer,
  and what an operator is told when TLS fails.
- `Exchange`: one connection's requests and their whole answers, on `qkdd.client.http`.
- `KeptConnection`: a call as a plan of actions (`Connect`, `Send`, `Receive`, `Close`)
  that a front end carries out (`drive`, `drive_async`): the connection is kept between
  calls, a call is retried once on a new connection when the service had closed the kept
  one before reading the request (its idle timeout: nothing was processed), and the
  connection is abandoned after a failure or a cancellation.
- `tls_reason`, `connect_reason`: why a connection failed, in words for an operator.
- `key_entries`: the entries of the standard's Key container.

Standard library only, and nothing else of qkdd: the drivers may import it (README,
"Layout": `qkdd.client` is the one part of qkdd they use).
"""

from __future__ import annotations

import base64
import binascii
import socket
import ssl
from collections.abc import Awaitable, Callable, Generator, Sequence
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

from qkdd.client.http import (
    ClientConnection,
    ConnectionClosed,
    Data,
    EndOfMessage,
    Event,
    HttpProtocolError,
    Response,
)

__all__ = [
    "CONNECT",
    "Action",
    "Close",
    "Connect",
    "Exchange",
    "KeptConnection",
    "Plan",
    "Receive",
    "Send",
    "Service",
    "Steps",
    "connect_reason",
    "drive",
    "drive_async",
    "first_failure",
    "json_headers",
    "key_entries",
    "receive_events",
    "tls_reason",
]

C = TypeVar("C")  # a front end's connection: a socket, a pair of asyncio streams, a Trio stream
T = TypeVar("T")

# OpenSSL's reasons for a handshake that found no protocol version in common.
_NO_COMMON_VERSION = ("WRONG_VERSION_NUMBER", "UNSUPPORTED_PROTOCOL", "NO_PROTOCOLS_AVAILABLE")


@dataclass(frozen=True)
class Service:
    """Who answers, for messages and errors."""

    name: str  # "the key service", "the KME"
    unreachable: type[Exception]  # the connection failed, or ended before the answer did
    malformed: type[Exception]  # the answer is not HTTP, too large, or not the API's JSON
    max_answer_bytes: int
    # What went wrong in TLS, for an operator: the service's certificate is not trusted
    # ({verify}: OpenSSL's words), the service refused this client ({reason}: the alert),
    # no TLS version in common ({reason}; None: told as any other TLS failure).
    untrusted: str
    refused: str
    no_common_version: str | None = None


# -- one connection's requests and answers --------------------------------------------------


def json_headers(
    body: bytes | None, extra: Sequence[tuple[str, str]] = ()
) -> list[tuple[str, str]]:
    """The headers of a request to a JSON API (Host and Content-Length come from `http`)."""
    headers = [("Accept", "application/json"), *extra]
    if body is not None:
        headers.append(("Content-Type", "application/json"))
    return headers


def receive_events(http: ClientConnection, data: bytes, service: Service) -> list[Event]:
    """`http.receive(data)`, bytes that are not HTTP raising `service.malformed`."""
    try:
        return http.receive(data)
    except HttpProtocolError as exc:
        raise service.malformed(f"malformed HTTP from {service.name}: {exc}") from None


class Exchange:
    """One kept-alive connection's requests and their whole answers, without I/O."""

    def __init__(self, host: str, service: Service, max_body: int | None = None) -> None:
        self.http = ClientConnection(host)
        self.service = service
        self.max_body = service.max_answer_bytes if max_body is None else max_body
        self._status = 0
        self._body = bytearray()

    @property
    def used(self) -> bool:
        """A request went out on this connection (so it may have gone stale since)."""
        return self.http.used

    def request(
        self,
        method: str,
        target: str,
        body: bytes | None,
        extra_headers: Sequence[tuple[str, str]] = (),
    ) -> bytes:
        self._status, self._body = 0, bytearray()
        return self.http.send_request(method, target, json_headers(body, extra_headers), body)

    def receive(self, data: bytes) -> tuple[int, bytes] | None:
        """Feed received bytes (b"" at EOF); the (status, body) once the answer is whole.
        `service.unreachable` if the connection ends first, `service.malformed` for bytes
        that are not HTTP or an answer over the size limit."""
        name = self.service.name
        for event in receive_events(self.http, data, self.service):
            if isinstance(event, Response):
                self._status = event.status
            elif isinstance(event, Data):
                self._body += event.data
                if len(self._body) > self.max_body:
                    raise self.service.malformed(f"{name}'s answer is over {self.max_body} bytes")
            elif isinstance(event, EndOfMessage):
                return self._status, bytes(self._body)
            elif isinstance(event, ConnectionClosed):
                if self._status == 0:
                    raise self.service.unreachable(f"{name} closed the connection before answering")
                raise self.service.unreachable(f"{name} closed the connection mid-answer")
        return None

    def next_cycle(self) -> bool:
        """Ready for another request on this connection; False if it must be closed."""
        return self.http.next_cycle()


# -- a call on a kept-alive connection, as actions ------------------------------------------


class Connect:
    """Open a new connection; the plan is sent it."""


CONNECT = Connect()


@dataclass(frozen=True, slots=True)
class Send(Generic[C]):
    """Send all of `data` on `connection`."""

    connection: C
    data: bytes = field(repr=False)


@dataclass(frozen=True, slots=True)
class Receive(Generic[C]):
    """Receive what comes next on `connection` (b"" at its end); the plan is sent it."""

    connection: C


@dataclass(frozen=True, slots=True)
class Close(Generic[C]):
    """Close `connection`: cleanly, or at once (`abort`, after a failure or a cancellation)."""

    connection: C
    abort: bool


Action = Connect | Send[Any] | Receive[Any] | Close[Any]
Plan = Generator[Action, Any, T]


class Steps(Generic[T]):
    """Carries a plan forward for a driver: `next()` is the action to carry out (None once
    the plan returned `result`); what the action gave goes in `sent`, or what it raised in
    `thrown`."""

    def __init__(self, plan: Plan[T]) -> None:
        self._plan = plan
        self.sent: Any = None
        self.thrown: BaseException | None = None

    def next(self) -> Action | None:
        try:
            if self.thrown is not None:
                thrown, self.thrown = self.thrown, None
                return self._plan.throw(thrown)
            sent, self.sent = self.sent, None
            return self._plan.send(sent)
        except StopIteration as done:
            self.result: T = done.value
            return None


def drive(plan: Plan[T], act: Callable[[Action], Any]) -> T:
    """Carry `plan` out with `act` (which does one action and gives what it gave): its value."""
    steps = Steps(plan)
    while (action := steps.next()) is not None:
        try:
            steps.sent = act(action)
        except BaseException as exc:
            steps.thrown = exc
    return steps.result


async def drive_async(plan: Plan[T], act: Callable[[Action], Awaitable[Any]]) -> T:
    """`drive` for an event loop: each action is awaited."""
    steps = Steps(plan)
    while (action := steps.next()) is not None:
        try:
            steps.sent = await act(action)
        except BaseException as exc:
            steps.thrown = exc
    return steps.result


class KeptConnection(Generic[C]):
    """The connection kept alive between calls to one service, and its HTTP state.

    `is_failure` tells a failed connection (the front end's transport errors, and
    `service.unreachable`) from anything else, which is raised as it is; `failed` turns a
    failed connection into the error the caller raises."""

    def __init__(
        self,
        host: str,
        service: Service,
        is_failure: Callable[[BaseException], bool],
        failed: Callable[[BaseException], Exception],
    ) -> None:
        self.host = host
        self.service = service
        self._is_failure = is_failure
        self._failed = failed
        self._kept: tuple[C, Exchange] | None = None

    @property
    def connection(self) -> C | None:
        return None if self._kept is None else self._kept[0]

    def forget(self) -> C | None:
        """The kept-alive connection, which is no longer kept (None if there was none)."""
        kept, self._kept = self._kept, None
        return None if kept is None else kept[0]

    def call(
        self,
        method: str,
        target: str,
        body: bytes | None,
        extra_headers: Sequence[tuple[str, str]] = (),
    ) -> Plan[tuple[int, bytes]]:
        """One request on the kept-alive connection (a new one if there is none): the
        answer's (status, body)."""
        while True:
            if self._kept is None:
                self._kept = (yield CONNECT), Exchange(self.host, self.service)
            connection, exchange = self._kept
            reused, got_bytes = exchange.used, False
            try:
                yield Send(connection, exchange.request(method, target, body, extra_headers))
                answer = None
                while answer is None:
                    data = yield Receive(connection)
                    got_bytes = got_bytes or bool(data)
                    answer = exchange.receive(data)
            except BaseException as exc:  # failed, cancelled, timed out, or a bad answer
                self.forget()
                yield Close(connection, abort=True)
                if not self._is_failure(exc):
                    raise
                if reused and not got_bytes and tls_reason(exc, self.service) is None:
                    # The service closed the kept-alive connection before reading this
                    # request (idle timeout); nothing was processed: one retry is safe (a
                    # new connection is not reused, so there is no second).
                    continue
                raise self._failed(exc) from exc
            if not exchange.next_cycle():
                self.forget()
                yield Close(connection, abort=False)
            return answer


# -- why a connection failed ----------------------------------------------------------------


def tls_reason(exc: BaseException, service: Service) -> str | None:
    """What went wrong in TLS, told for an operator, if `exc` comes from TLS."""
    seen: BaseException | None = exc
    while seen is not None and not isinstance(seen, ssl.SSLError):
        seen = seen.__cause__ or seen.__context__
    # A closed connection is not a TLS problem (and a kept-alive one may be retried).
    if seen is None or isinstance(
        seen, ssl.SSLEOFError | ssl.SSLZeroReturnError | ssl.SSLSyscallError
    ):
        return None
    if isinstance(seen, ssl.SSLCertVerificationError):
        return service.untrusted.format(verify=seen.verify_message)
    reason = seen.reason or str(seen)
    if "ALERT" in reason.upper():
        return service.refused.format(reason=reason)
    if service.no_common_version is not None and reason in _NO_COMMON_VERSION:
        return service.no_common_version.format(reason=reason)
    return f"TLS failed ({reason})"


def first_failure(exc: OSError) -> OSError:
    """The failure that says what happened: some event loops report a failed connect as one
    OSError caused by a group of the failures of each address tried; the first of those."""
    group = exc.__cause__
    if isinstance(group, BaseExceptionGroup) and isinstance(group.exceptions[0], OSError):
        return group.exceptions[0]
    return exc


def connect_reason(exc: OSError, refused: str) -> str:
    """Why connecting to a host and port failed; `refused` is what a refused connection
    means for this service."""
    exc = first_failure(exc)
    if isinstance(exc, ConnectionRefusedError):
        return refused
    if isinstance(exc, socket.gaierror):
        return f"cannot resolve the host name ({exc.strerror or exc})"
    return exc.strerror or str(exc)


# -- the standard's Key container -----------------------------------------------------------


def key_entries(obj: dict[str, Any], service: Service) -> list[tuple[object, bytes]]:
    """The (key_ID as sent, key material) of each entry of the Key container `obj` (ETSI GS
    QKD 014), in order; each caller checks the IDs its own way. Raises `service.malformed`
    saying what is wrong, never with key material in it."""
    what = f"{service.name}'s Key container"
    entries = obj.get("keys")
    if not isinstance(entries, list):
        raise service.malformed(f"{what} has no 'keys' array")
    found: list[tuple[object, bytes]] = []
    for index, entry in enumerate(entries):
        if not isinstance(entry, dict):
            raise service.malformed(f"entry {index} of {what} is not an object")
        if "key_ID" not in entry:
            raise service.malformed(f"entry {index} of {what} has no key_ID")
        encoded = entry.get("key")
        if not isinstance(encoded, str):
            raise service.malformed(f"entry {index} of {what} has no 'key' string")
        try:
            material = base64.b64decode(encoded, validate=True)
        except (binascii.Error, ValueError):
            raise service.malformed(f"entry {index} of {what} is not valid base64") from None
        found.append((entry["key_ID"], material))
    return found
