"""Clients of the ETSI GS QKD 014 key service, on its local Unix socket or over HTTPS with
mutual TLS.

`KeyClient` is for Trio programs, `BlockingKeyClient` for plain blocking code (no Trio needed);
both keep one HTTP/1.1 connection alive between calls. The HTTP exchange itself is the sans-IO
`_Exchange`, so the two differ only in how they move bytes. `KeyClient(path)` talks to a Unix
socket; `KeyClient.tls(host, port, cert_file=..., ...)` to a TLS listener, presenting a client
certificate (which the service maps to an SAE) and checking the service's certificate.
Both also read the daemon's own site status and metrics (`site_status`, `metrics`), which
only the local socket serves (see `qkdd.admin`), and send and receive secure messages to and
from SAEs at other sites (`send_message`, `receive_message`, `acknowledge_message`,
`messages`; see `qkdd.messages_api`), and follow key events (`events`).
"""

from __future__ import annotations

import base64
import binascii
import json
import socket
import ssl
import uuid
from collections.abc import AsyncIterator, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Self
from urllib.parse import quote

import h11

from qkdd.api_paths import (
    EVENTS_PATH,
    INBOX_PATH,
    INBOX_PREFIX,
    METRICS_PATH,
    SEND_PREFIX,
    STATUS_PATH,
)
from qkdd.etsi014.pool import DeliveredKey

__all__ = [
    "BadResponse",
    "BlockingKeyClient",
    "ClientError",
    "DeliveredKey",
    "KeyClient",
    "KeyServiceClientError",
    "KeyServiceUnreachable",
    "Message",
    "client_ssl_context",
]

DEFAULT_TIMEOUT = 10.0
RECEIVE_SIZE = 64 * 1024
# A full key container of the largest allowed request stays far below this.
MAX_RESPONSE_BYTES = 16 * 1024 * 1024


class ClientError(Exception):
    """Base of the key-service client's errors."""


class KeyServiceClientError(ClientError):
    """The key service answered with an ETSI Error object (status other than 200)."""

    def __init__(self, status: int, message: str, details: list[Any] | None = None) -> None:
        super().__init__(f"key service answered {status}: {message}")
        self.status = status
        self.message = message
        self.details = details or []


class KeyServiceUnreachable(ClientError):
    """The key service socket could not be reached, or the connection failed."""


class BadResponse(ClientError):
    """The key service's answer is not valid HTTP or not the standard's JSON."""


class _Exchange:
    """One HTTP/1.1 client connection's bytes in and out, without I/O."""

    def __init__(self, host: str = "localhost") -> None:
        self.host = host
        self.h11 = h11.Connection(h11.CLIENT)
        self.used = False
        self._status = 0
        self._body = bytearray()

    def request(self, method: str, target: str, body: bytes | None, sae_id: str | None) -> bytes:
        headers = [("host", self.host), ("accept", "application/json")]
        if sae_id is not None:
            headers.append(("x-sae-id", sae_id))
        if body is not None:
            headers += [("content-type", "application/json"), ("content-length", str(len(body)))]
        data = self.h11.send(h11.Request(method=method, target=target, headers=headers))
        if body:
            data += self.h11.send(h11.Data(data=body))
        data += self.h11.send(h11.EndOfMessage())
        self.used = True
        return data

    def receive(self, data: bytes) -> tuple[int, bytes] | None:
        """Feed received bytes (b"" at EOF); the (status, body) once the response is whole."""
        if not data and self._status == 0:
            raise KeyServiceUnreachable("the key service closed the connection before answering")
        self.h11.receive_data(data)
        while True:
            try:
                event = self.h11.next_event()
            except h11.RemoteProtocolError as exc:
                raise BadResponse(f"malformed HTTP from the key service: {exc}") from exc
            if event is h11.NEED_DATA:
                return None
            if isinstance(event, h11.Response):
                self._status = event.status_code
            elif isinstance(event, h11.Data):
                self._body += event.data
                if len(self._body) > MAX_RESPONSE_BYTES:
                    raise BadResponse("response from the key service is too large")
            elif isinstance(event, h11.EndOfMessage):
                return self._status, bytes(self._body)
            elif isinstance(event, h11.ConnectionClosed):
                raise KeyServiceUnreachable("the key service closed the connection")
            # InformationalResponse: keep reading

    def next_cycle(self) -> bool:
        """Prepare for another request on this connection; False if it must be closed."""
        self._status, self._body = 0, bytearray()
        if self.h11.our_state is h11.DONE and self.h11.their_state is h11.DONE:
            self.h11.start_next_cycle()
            return True
        return False


@dataclass(frozen=True)
class Message:
    """A message received from an SAE at another site; acknowledge it once handled."""

    message_id: str
    seq: int
    sender_sae_id: str
    sender_site_id: str
    protection: str
    received_at: float
    body: bytes = field(repr=False)


def _send_request(
    recipient_sae_id: str, body: bytes, message_id: str | None, protection: str = "hybrid"
) -> tuple[str, bytes]:
    obj: dict[str, Any] = {"body": base64.b64encode(body).decode("ascii")}
    if protection != "hybrid":
        obj["protection"] = protection
    if message_id is not None:
        obj["message_ID"] = message_id
    return f"{SEND_PREFIX}{quote(recipient_sae_id, safe='')}", json.dumps(obj).encode()


def _message(obj: Any) -> Message:
    try:
        return Message(
            str(obj["message_ID"]),
            int(obj["seq"]),
            str(obj["sender_SAE_ID"]),
            str(obj["sender_site_ID"]),
            str(obj["protection"]),
            float(obj["received_at"]),
            base64.b64decode(obj["body"], validate=True),
        )
    except (KeyError, TypeError, ValueError, binascii.Error) as exc:
        raise BadResponse(f"the service sent a malformed message object: {exc!r}") from exc


def _first_message(obj: dict[str, Any]) -> Message | None:
    found = obj.get("messages")
    if not isinstance(found, list):
        raise BadResponse("the service's inbox answer has no messages array")
    return _message(found[0]) if found else None


def _inbox_target(wait: float, after: int, stream: bool = False) -> str:
    if stream:
        return f"{INBOX_PATH}?stream=1&after={after}"
    return f"{INBOX_PATH}?timeout={wait:g}&after={after}"


def _events_target(kinds: Sequence[str]) -> str:
    return f"{EVENTS_PATH}?kinds={','.join(kinds)}" if kinds else EVENTS_PATH


def _ack_target(message_id: str) -> str:
    return f"{INBOX_PREFIX}{uuid.UUID(message_id)}"


class _LineStream:
    """The bytes of a streamed answer (one JSON object per line) in, objects out (sans-IO)."""

    def __init__(self, exchange: _Exchange) -> None:
        self._h11 = exchange.h11
        self._status = 0
        self._pending = bytearray()
        self._error = bytearray()

    def receive(self, data: bytes) -> list[dict[str, Any]]:
        """Objects complete so far; KeyServiceUnreachable at the end of the stream."""
        self._h11.receive_data(data)
        out: list[dict[str, Any]] = []
        while True:
            try:
                event = self._h11.next_event()
            except h11.RemoteProtocolError as exc:
                raise BadResponse(f"malformed HTTP from the key service: {exc}") from exc
            if event is h11.NEED_DATA:
                return out
            if isinstance(event, h11.Response):
                self._status = event.status_code
            elif isinstance(event, h11.Data):
                if self._status != 200:
                    self._error += event.data
                    continue
                self._pending += event.data
                while b"\n" in self._pending:
                    line, _, rest = bytes(self._pending).partition(b"\n")
                    self._pending = bytearray(rest)
                    try:
                        obj = json.loads(line)
                    except ValueError as exc:
                        raise BadResponse(f"malformed line in the stream: {exc}") from exc
                    if not isinstance(obj, dict):
                        raise BadResponse("a line of the stream is not a JSON object")
                    out.append(obj)
                if len(self._pending) > MAX_RESPONSE_BYTES:
                    raise BadResponse("a streamed line is too large")
            elif isinstance(event, h11.EndOfMessage | h11.ConnectionClosed):
                if self._status != 200:
                    _decode_json(self._status, bytes(self._error))
                if out:
                    return out
                raise KeyServiceUnreachable("the key service ended the stream")


def _status_target(slave_sae_id: str) -> str:
    return f"/api/v1/keys/{quote(slave_sae_id, safe='')}/status"


def _enc_request(
    slave_sae_id: str, number: int, size: int | None, additional: Sequence[str] = ()
) -> tuple[str, bytes]:
    body: dict[str, Any] = {"number": number}
    if size is not None:
        body["size"] = size
    if additional:
        body["additional_slave_SAE_IDs"] = list(additional)
    return f"/api/v1/keys/{quote(slave_sae_id, safe='')}/enc_keys", json.dumps(body).encode()


def _dec_request(master_sae_id: str, key_ids: Sequence[str]) -> tuple[str, bytes]:
    body = {"key_IDs": [{"key_ID": key_id} for key_id in key_ids]}
    return f"/api/v1/keys/{quote(master_sae_id, safe='')}/dec_keys", json.dumps(body).encode()


def _decode_json(status: int, body: bytes) -> dict[str, Any]:
    try:
        obj = json.loads(body)
    except ValueError:
        obj = None
    if status != 200:
        if isinstance(obj, dict) and isinstance(obj.get("message"), str):
            details = obj.get("details")
            raise KeyServiceClientError(
                status, obj["message"], details if isinstance(details, list) else []
            )
        raise KeyServiceClientError(status, body[:200].decode("utf-8", "replace") or "no message")
    if not isinstance(obj, dict):
        raise BadResponse("the key service answered 200 without a JSON object")
    return obj


def _decode_text(status: int, body: bytes) -> str:
    if status != 200:
        _decode_json(status, body)  # raises with the service's Error object
    return body.decode("utf-8", "replace")


def _decode_keys(obj: dict[str, Any]) -> list[DeliveredKey]:
    try:
        return [
            DeliveredKey(entry["key_ID"], base64.b64decode(entry["key"], validate=True))
            for entry in obj["keys"]
        ]
    except (KeyError, TypeError, binascii.Error) as exc:
        raise BadResponse(f"the key service sent a malformed key container: {exc!r}") from exc


def client_ssl_context(
    cert_file: str, key_file: str | None = None, ca_file: str | None = None
) -> ssl.SSLContext:
    """TLS 1.3 with the client certificate `cert_file` (its key in `key_file`, or in `cert_file`
    when None), trusting the service certificates issued by the CAs in `ca_file` (PEM), or the
    system's CAs when None. The service's name is checked against its certificate."""
    context = ssl.create_default_context(cafile=ca_file)
    context.minimum_version = ssl.TLSVersion.TLSv1_3
    try:
        context.load_cert_chain(cert_file, key_file)
    except OSError as exc:  # ssl.SSLError is an OSError
        raise ClientError(
            f"cannot load the client certificate {cert_file}"
            f"{f' with key {key_file}' if key_file else ''}: {exc}"
        ) from exc
    return context


@dataclass(frozen=True)
class _Endpoint:
    """Where the service is: a Unix socket path, or a TLS host and port."""

    where: str  # for messages
    socket_path: str | None = None
    host: str = "localhost"
    port: int = 0
    ssl_context: ssl.SSLContext | None = None
    server_hostname: str | None = None

    @classmethod
    def unix(cls, path: str) -> _Endpoint:
        return cls(where=path, socket_path=path)

    @classmethod
    def tls(
        cls, host: str, port: int, context: ssl.SSLContext, server_hostname: str | None
    ) -> _Endpoint:
        shown = f"[{host}]" if ":" in host else host
        return cls(
            where=f"https://{shown}:{port}",
            host=host,
            port=port,
            ssl_context=context,
            server_hostname=server_hostname or host,
        )

    @property
    def host_header(self) -> str:
        if self.socket_path is not None:
            return "localhost"
        return self.where.removeprefix("https://")


def _tls_reason(exc: BaseException) -> str | None:
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
        return (
            f"the service's certificate is not trusted ({seen.verify_message}); check the CA "
            "file and that the address matches the certificate"
        )
    reason = seen.reason or str(seen)
    if "ALERT" in reason.upper():
        return (
            f"the service refused this client's TLS connection ({reason}); its certificate "
            "must be issued by the service's client CA, and TLS 1.3 is required"
        )
    return f"TLS failed ({reason})"


def _unreachable(path: str, exc: OSError) -> KeyServiceUnreachable:
    tls = _tls_reason(exc)
    if tls is not None:
        return KeyServiceUnreachable(f"cannot reach the key service at {path}: {tls}")
    if path.startswith("https://"):
        if isinstance(exc, ConnectionRefusedError):
            why = (
                "connection refused; is qkdd running with its TLS API listening on this "
                "address and port?"
            )
        elif isinstance(exc, socket.gaierror):
            why = f"cannot resolve the host name ({exc.strerror or exc})"
        else:
            why = exc.strerror or str(exc)
    elif isinstance(exc, FileNotFoundError):
        why = "no such socket; is qkdd running, and is this the configured API socket?"
    elif isinstance(exc, PermissionError):
        why = "permission denied; the user must be in the group that owns the socket"
    elif isinstance(exc, ConnectionRefusedError):
        why = "connection refused; the socket is stale, qkdd is not running"
    else:
        why = exc.strerror or str(exc)
    return KeyServiceUnreachable(f"cannot reach the key service at {path}: {why}")


class _Endpoints:
    """How both clients are made: on a Unix socket path, or with `tls` on a TLS listener."""

    def __init__(
        self, socket_path: str, *, sae_id: str | None = None, timeout: float = DEFAULT_TIMEOUT
    ) -> None:
        self._setup(_Endpoint.unix(socket_path), sae_id, timeout)

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
        client._setup(_Endpoint.tls(host, port, context, server_hostname), sae_id, timeout)
        return client

    def _setup(self, endpoint: _Endpoint, sae_id: str | None, timeout: float) -> None:
        raise NotImplementedError


class KeyClient(_Endpoints):
    """Trio client: `async with KeyClient(path) as client: keys = await client.enc_keys(...)`."""

    def _setup(self, endpoint: _Endpoint, sae_id: str | None, timeout: float) -> None:
        import trio  # only Trio users pay for the import

        self._trio = trio
        self._endpoint = endpoint
        # The Unix socket path; None for a TLS client.
        self.socket_path = endpoint.socket_path
        self.sae_id = sae_id
        self.timeout = timeout
        self._stream: trio.abc.Stream | None = None
        self._exchange = _Exchange(endpoint.host_header)
        self._lock = trio.Lock()

    async def __aenter__(self) -> KeyClient:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        if self._stream is not None:
            stream, self._stream = self._stream, None
            await stream.aclose()

    async def status(self, slave_sae_id: str) -> dict[str, Any]:
        """The standard's Status object for this SAE as master and `slave_sae_id`."""
        return _decode_json(*await self._call("GET", _status_target(slave_sae_id), None))

    async def enc_keys(
        self,
        slave_sae_id: str,
        number: int = 1,
        size: int | None = None,
        additional_slave_sae_ids: Sequence[str] = (),
    ) -> list[DeliveredKey]:
        """New keys for this SAE as master; `size` in bits (default: the KME's key size);
        each additional slave SAE may also collect each key once."""
        target, body = _enc_request(slave_sae_id, number, size, additional_slave_sae_ids)
        return _decode_keys(_decode_json(*await self._call("POST", target, body)))

    async def dec_keys(self, master_sae_id: str, key_ids: Sequence[str]) -> list[DeliveredKey]:
        target, body = _dec_request(master_sae_id, key_ids)
        return _decode_keys(_decode_json(*await self._call("POST", target, body)))

    async def site_status(self) -> dict[str, Any]:
        """The daemon's site status (links, devices, pools, recent errors); local socket only."""
        return _decode_json(*await self._call("GET", STATUS_PATH, None))

    async def metrics(self) -> str:
        """The daemon's Prometheus metrics, in the text format; local socket only."""
        return _decode_text(*await self._call("GET", METRICS_PATH, None))

    async def request(self, method: str, target: str, body: bytes | None) -> tuple[int, bytes]:
        """A raw exchange with the service: (status, body)."""
        return await self._call(method, target, body)

    async def send_message(
        self,
        recipient_sae_id: str,
        body: bytes,
        *,
        message_id: str | None = None,
        protection: str = "hybrid",
    ) -> str:
        """Send `body` to an SAE at another site; returns the message ID once the recipient's
        site has stored it. After a failure, sending again with the same `message_id` is
        safe: the message is kept once. `protection` "otp" asks for a one-time pad."""
        target, request = _send_request(recipient_sae_id, body, message_id, protection)
        return str(_decode_json(*await self._call("POST", target, request))["message_ID"])

    async def receive_message(self, wait: float = 0.0, *, after: int = 0) -> Message | None:
        """The oldest unacknowledged message for this SAE (after sequence number `after`),
        waiting up to `wait` seconds; None if none came."""
        answer = await self._call("GET", _inbox_target(wait, after), None, extra_time=wait)
        return _first_message(_decode_json(*answer))

    async def acknowledge_message(self, message_id: str) -> None:
        """Erase a handled message at the daemon; it is not delivered again."""
        _decode_json(*await self._call("DELETE", _ack_target(message_id), None))

    async def messages(self, *, after: int = 0) -> AsyncIterator[Message]:
        """Every unacknowledged message, then each new one as it arrives, on a connection of
        its own. Messages not acknowledged come again on the next stream."""
        async for obj in self._lines(_inbox_target(0, after, True)):
            yield _message(obj)

    async def events(self, kinds: Sequence[str] = ()) -> AsyncIterator[dict[str, Any]]:
        """Key events for this SAE from now on (``qkdd.events``), each a dict with at least
        "event", "seq" and "at"; `kinds` limits them. On a connection of its own."""
        async for obj in self._lines(_events_target(kinds)):
            yield obj

    async def _lines(self, target: str) -> AsyncIterator[dict[str, Any]]:
        trio = self._trio
        stream = await self._connect()
        try:
            exchange = _Exchange(self._endpoint.host_header)
            await stream.send_all(exchange.request("GET", target, None, self.sae_id))
            reader = _LineStream(exchange)
            while True:
                try:
                    data = await stream.receive_some(RECEIVE_SIZE)
                except trio.BrokenResourceError as exc:
                    raise KeyServiceUnreachable(f"the stream broke: {exc}") from exc
                for obj in reader.receive(bytes(data)):
                    yield obj
        finally:
            with trio.CancelScope(shield=True):
                await stream.aclose()

    async def _call(
        self, method: str, target: str, body: bytes | None, *, extra_time: float = 0.0
    ) -> tuple[int, bytes]:
        trio = self._trio
        async with self._lock:
            with trio.fail_after(self.timeout + extra_time):
                try:
                    return await self._exchange_once(method, target, body)
                except _StaleConnection:
                    # The service closed a kept-alive connection before reading this request
                    # (idle timeout); nothing was processed, so one retry is safe.
                    return await self._exchange_once(method, target, body)

    async def _exchange_once(
        self, method: str, target: str, body: bytes | None
    ) -> tuple[int, bytes]:
        trio = self._trio
        where = self._endpoint.where
        if self._stream is None:
            self._stream = await self._connect()
            self._exchange = _Exchange(self._endpoint.host_header)
        exchange, stream = self._exchange, self._stream
        reused = exchange.used
        got_bytes = False
        try:
            await stream.send_all(exchange.request(method, target, body, self.sae_id))
            while True:
                data = await stream.receive_some(RECEIVE_SIZE)
                got_bytes = got_bytes or bool(data)
                result = exchange.receive(bytes(data))
                if result is not None:
                    break
        except (trio.BrokenResourceError, KeyServiceUnreachable) as exc:
            await self.aclose()
            tls = _tls_reason(exc)
            if reused and not got_bytes and tls is None:
                raise _StaleConnection from exc
            raise KeyServiceUnreachable(f"connection to {where} failed: {tls or exc}") from exc
        except BaseException:
            await self.aclose()
            raise
        if not exchange.next_cycle():
            await self.aclose()
        return result

    async def _connect(self) -> Any:
        trio, endpoint = self._trio, self._endpoint
        if endpoint.socket_path is not None:
            try:
                return await trio.open_unix_socket(endpoint.socket_path)
            except OSError as exc:
                raise _unreachable(endpoint.where, exc) from None
        try:
            tcp = await trio.open_tcp_stream(endpoint.host, endpoint.port)
        except OSError as exc:
            raise _unreachable(endpoint.where, exc) from None
        stream = trio.SSLStream(
            tcp,
            endpoint.ssl_context,
            server_hostname=endpoint.server_hostname,
            https_compatible=True,
        )
        try:
            await stream.do_handshake()
        except trio.BrokenResourceError as exc:
            await tcp.aclose()
            why = _tls_reason(exc) or f"the TLS handshake failed: {exc.__cause__ or exc}"
            raise KeyServiceUnreachable(
                f"cannot reach the key service at {endpoint.where}: {why}"
            ) from exc
        except BaseException:
            await tcp.aclose()
            raise
        return stream


class _StaleConnection(Exception):
    pass


class BlockingKeyClient(_Endpoints):
    """Blocking client over a plain socket; usable as a context manager."""

    def _setup(self, endpoint: _Endpoint, sae_id: str | None, timeout: float) -> None:
        self._endpoint = endpoint
        # The Unix socket path; None for a TLS client.
        self.socket_path = endpoint.socket_path
        self.sae_id = sae_id
        self.timeout = timeout
        self._sock: socket.socket | None = None
        self._exchange = _Exchange(endpoint.host_header)
        self._call_timeout = timeout

    def __enter__(self) -> BlockingKeyClient:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def close(self) -> None:
        if self._sock is not None:
            sock, self._sock = self._sock, None
            sock.close()

    def status(self, slave_sae_id: str) -> dict[str, Any]:
        """The standard's Status object for this SAE as master and `slave_sae_id`."""
        return _decode_json(*self._call("GET", _status_target(slave_sae_id), None))

    def enc_keys(
        self,
        slave_sae_id: str,
        number: int = 1,
        size: int | None = None,
        additional_slave_sae_ids: Sequence[str] = (),
    ) -> list[DeliveredKey]:
        """New keys for this SAE as master; `size` in bits (default: the KME's key size);
        each additional slave SAE may also collect each key once."""
        target, body = _enc_request(slave_sae_id, number, size, additional_slave_sae_ids)
        return _decode_keys(_decode_json(*self._call("POST", target, body)))

    def dec_keys(self, master_sae_id: str, key_ids: Sequence[str]) -> list[DeliveredKey]:
        target, body = _dec_request(master_sae_id, key_ids)
        return _decode_keys(_decode_json(*self._call("POST", target, body)))

    def site_status(self) -> dict[str, Any]:
        """The daemon's site status (links, devices, pools, recent errors); local socket only."""
        return _decode_json(*self._call("GET", STATUS_PATH, None))

    def metrics(self) -> str:
        """The daemon's Prometheus metrics, in the text format; local socket only."""
        return _decode_text(*self._call("GET", METRICS_PATH, None))

    def request(self, method: str, target: str, body: bytes | None) -> tuple[int, bytes]:
        """A raw exchange with the service: (status, body)."""
        return self._call(method, target, body)

    def send_message(
        self,
        recipient_sae_id: str,
        body: bytes,
        *,
        message_id: str | None = None,
        protection: str = "hybrid",
    ) -> str:
        """Send `body` to an SAE at another site; returns the message ID once the recipient's
        site has stored it. After a failure, sending again with the same `message_id` is
        safe: the message is kept once. `protection` "otp" asks for a one-time pad."""
        target, request = _send_request(recipient_sae_id, body, message_id, protection)
        return str(_decode_json(*self._call("POST", target, request))["message_ID"])

    def receive_message(self, wait: float = 0.0, *, after: int = 0) -> Message | None:
        """The oldest unacknowledged message for this SAE (after sequence number `after`),
        waiting up to `wait` seconds; None if none came."""
        answer = self._call("GET", _inbox_target(wait, after), None, extra_time=wait)
        return _first_message(_decode_json(*answer))

    def acknowledge_message(self, message_id: str) -> None:
        """Erase a handled message at the daemon; it is not delivered again."""
        _decode_json(*self._call("DELETE", _ack_target(message_id), None))

    def messages(self, *, after: int = 0) -> Iterator[Message]:
        """Every unacknowledged message, then each new one as it arrives, on a connection of
        its own (blocking between messages). Unacknowledged messages come again next time."""
        for obj in self._lines(_inbox_target(0, after, True)):
            yield _message(obj)

    def events(self, kinds: Sequence[str] = ()) -> Iterator[dict[str, Any]]:
        """Key events for this SAE from now on (``qkdd.events``), each a dict with at least
        "event", "seq" and "at"; `kinds` limits them. On a connection of its own."""
        yield from self._lines(_events_target(kinds))

    def _lines(self, target: str) -> Iterator[dict[str, Any]]:
        sock = self._connect()
        sock.settimeout(None)
        try:
            exchange = _Exchange(self._endpoint.host_header)
            sock.sendall(exchange.request("GET", target, None, self.sae_id))
            reader = _LineStream(exchange)
            while True:
                try:
                    data = sock.recv(RECEIVE_SIZE)
                except OSError as exc:
                    raise KeyServiceUnreachable(f"the stream broke: {exc}") from exc
                yield from reader.receive(data)
        finally:
            sock.close()

    def _call(
        self, method: str, target: str, body: bytes | None, *, extra_time: float = 0.0
    ) -> tuple[int, bytes]:
        self._call_timeout = self.timeout + extra_time
        try:
            return self._exchange_once(method, target, body)
        except _StaleConnection:
            return self._exchange_once(method, target, body)

    def _exchange_once(self, method: str, target: str, body: bytes | None) -> tuple[int, bytes]:
        where = self._endpoint.where
        if self._sock is None:
            self._sock, self._exchange = self._connect(), _Exchange(self._endpoint.host_header)
        exchange, sock = self._exchange, self._sock
        sock.settimeout(self._call_timeout)
        reused = exchange.used
        got_bytes = False
        try:
            sock.sendall(exchange.request(method, target, body, self.sae_id))
            while True:
                data = sock.recv(RECEIVE_SIZE)
                got_bytes = got_bytes or bool(data)
                result = exchange.receive(data)
                if result is not None:
                    break
        except TimeoutError as exc:
            self.close()
            raise KeyServiceUnreachable(
                f"no answer from the key service at {where} within {self.timeout:g} s"
            ) from exc
        except (OSError, KeyServiceUnreachable) as exc:
            self.close()
            tls = _tls_reason(exc)
            if reused and not got_bytes and tls is None:
                raise _StaleConnection from exc
            raise KeyServiceUnreachable(f"connection to {where} failed: {tls or exc}") from exc
        except BaseException:
            self.close()
            raise
        if not exchange.next_cycle():
            self.close()
        return result

    def _connect(self) -> socket.socket:
        endpoint = self._endpoint
        if endpoint.socket_path is not None:
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            sock.settimeout(self.timeout)
            try:
                sock.connect(endpoint.socket_path)
            except OSError as exc:
                sock.close()
                raise _unreachable(endpoint.where, exc) from None
            return sock
        assert endpoint.ssl_context is not None
        try:
            tcp = socket.create_connection((endpoint.host, endpoint.port), timeout=self.timeout)
        except TimeoutError:
            raise KeyServiceUnreachable(
                f"no answer from the key service at {endpoint.where} within {self.timeout:g} s"
            ) from None
        except OSError as exc:
            raise _unreachable(endpoint.where, exc) from None
        try:
            # wrap_socket performs the handshake (the socket is connected and blocking).
            return endpoint.ssl_context.wrap_socket(tcp, server_hostname=endpoint.server_hostname)
        except OSError as exc:
            tcp.close()
            raise _unreachable(endpoint.where, exc) from None
