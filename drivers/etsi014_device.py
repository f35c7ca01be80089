"""``Etsi014Device``: QKD keys from a key management entity (KME) that serves ETSI GS QKD 014
over HTTPS with client certificates, at either end of a link.

The model (ETSI014_DEVICES.md gives the operator's view): the KMEs of the two sites already
share keys. At the link master site, ``run`` keeps the sink supplied by calling ``enc_keys``
on the local KME as the master SAE, naming the peer site's SAE as slave. At the link slave
site, the daemon names the IDs the master picked and ``fetch_keys`` collects exactly those
with ``dec_keys``; there ``run`` only checks that the KME answers and keeps ``status``
current.

Layout: a sans-IO core (``KmeHttp`` moves one HTTP/1.1 connection's bytes through h11;
``parse_kme_url``, ``parse_status`` and ``parse_key_container`` turn configuration and the
standard's JSON into values and refuse anything malformed), then the Trio layer
(``_KmeConnection``: one kept-alive TLS connection; ``Etsi014Device``: the role loops,
backoff and status).

This module has its own small client rather than reusing ``qkdd.client``: the daemon package
imports this one, never the reverse, and a vendor's KME needs what the client of qkdd's own
API rightly refuses (TLS 1.2, an API path prefix, messages about a KME rather than qkdd).

Logs go to the ``qkdd.device`` logger, one event per line as ``event key=value``. Key
material is never logged, nor put in an exception message; key IDs are not secret and are
logged at debug level only.
"""

from __future__ import annotations

import base64
import binascii
import dataclasses
import json
import logging
import os
import re
import socket
import ssl
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Literal
from urllib.parse import quote, urlsplit

import h11
import trio

from .base import CountingKeySink, DeviceStatus, FetchByIdDevice, KeySink, QkdKey
from .constants import (
    DEFAULT_RECENT_IDS,
    DEFAULT_RECONNECT_INITIAL_DELAY,
    DEFAULT_RECONNECT_MAX_DELAY,
)
from .dedup import RecentKeyIds
from .errors import DeviceError

__all__ = [
    "Etsi014Device",
    "KmeConfigError",
    "KmeEndpoint",
    "KmeError",
    "KmeHttp",
    "KmeRefusedError",
    "KmeResponseError",
    "KmeStatus",
    "KmeStoreError",
    "KmeTlsError",
    "KmeUnauthorizedError",
    "KmeUnavailableError",
    "KmeUnreachableError",
    "UnknownKeyIdsError",
    "canonical_key_id",
    "kme_ssl_context",
    "parse_key_container",
    "parse_kme_url",
    "parse_status",
    "refusal",
]

log = logging.getLogger("qkdd.device")

Role = Literal["master", "slave"]

API_PATH = "/api/v1/keys/"
DEFAULT_KEY_SIZE_BITS = 256
#: Keys asked for in one enc_keys call (fewer if the KME's max_key_per_request is lower).
DEFAULT_KEYS_PER_REQUEST = 64
#: Seconds between status calls while there is nothing to fetch.
DEFAULT_POLL_INTERVAL = 1.0
#: Unused keys the master keeps in the sink, when the sink can count them: enough for many
#: batches, while taking no more from the KME than the daemon will use soon.
DEFAULT_BUFFER_TARGET = 1024
#: Bound on connecting, the TLS handshake and one request and its answer.
DEFAULT_REQUEST_TIMEOUT = 10.0
RECEIVE_SIZE = 64 * 1024
#: A full key container of 128 keys of 8192 bits is about 180 KB; anything near this
#: limit is not a KME answering the standard.
MAX_RESPONSE_BYTES = 4 * 1024 * 1024
#: How much of a KME's error text goes into messages.
MAX_MESSAGE_CHARS = 300

_UUID_PATTERN = r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}"
_UUID_TEXT = re.compile(_UUID_PATTERN, re.IGNORECASE)  # what a KME may send
_CANONICAL_UUID = re.compile(_UUID_PATTERN)  # what the daemon passes around


# -- errors ------------------------------------------------------------------------------


class KmeError(DeviceError):
    """A fault of an ETSI GS QKD 014 KME or of the way this daemon is set up to use it."""


class KmeConfigError(KmeError):
    """The configuration cannot work: a bad URL, unreadable certificate files, a key size the
    KME does not serve, or the KME knowing this client as another SAE."""


class KmeUnreachableError(KmeError):
    """No answer from the KME: it cannot be connected to, or the connection failed."""


class KmeTlsError(KmeUnreachableError):
    """The TLS handshake with the KME failed (untrusted KME certificate, client certificate
    refused, no common TLS version)."""


class KmeRefusedError(KmeError):
    """The KME answered a request with an error status."""

    def __init__(self, status: int, message: str, doing: str, where: str) -> None:
        super().__init__(f"the KME at {where} answered {doing} with {status}: {message}")
        self.status = status
        self.message = message


class KmeUnavailableError(KmeRefusedError):
    """HTTP 503: the KME has no keys to give now (QKD link down, key store empty...)."""


class KmeUnauthorizedError(KmeRefusedError):
    """HTTP 401: the KME does not accept this client as the configured SAE."""


class KmeResponseError(KmeError):
    """The KME's answer does not follow the standard (bad HTTP, JSON, key ID or key)."""


class UnknownKeyIdsError(KmeError):
    """The KME holds no keys with these IDs for this pair of SAEs (not yet, or not any more)."""

    def __init__(self, key_ids: Sequence[str], master_sae_id: str, where: str, reason: str) -> None:
        self.key_ids = tuple(key_ids)
        super().__init__(
            f"the KME at {where} holds no keys from master SAE {master_sae_id!r} with IDs "
            f"{', '.join(self.key_ids)} (it said: {reason}); if the master's KME handed them "
            "out just now they may not have reached this KME yet"
        )


class KmeStoreError(KmeError):
    """Storing keys the KME handed out failed."""


# -- sans-IO: configuration and the standard's JSON ----------------------------------------


@dataclass(frozen=True)
class KmeEndpoint:
    """Where a KME's ETSI GS QKD 014 API is, parsed from its URL."""

    url: str  # as configured, for messages
    host: str
    port: int
    api_path: str  # the path prefix ending in "/api/v1/keys/"
    host_header: str

    def target(self, sae_id: str, operation: str) -> str:
        return f"{self.api_path}{quote(sae_id, safe='')}/{operation}"


def parse_kme_url(url: str) -> KmeEndpoint:
    """``https://host[:port][/prefix]``: the standard's paths go under the prefix (a gateway
    may publish the KME under one). Raises ``KmeConfigError``."""
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError as exc:
        raise KmeConfigError(f"KME URL {url!r} is not valid: {exc}") from None
    if parts.scheme != "https":
        raise KmeConfigError(
            f"KME URL {url!r} must start with https:// (ETSI GS QKD 014 runs over HTTPS)"
        )
    if not parts.hostname:
        raise KmeConfigError(f"KME URL {url!r} names no host")
    if parts.query or parts.fragment or parts.username or parts.password:
        raise KmeConfigError(
            f"KME URL {url!r} must be https://host[:port][/path] without user, query or fragment"
        )
    prefix = parts.path.rstrip("/")
    if prefix.endswith("/api/v1/keys"):  # the operator gave the API's own path
        prefix = prefix[: -len("/api/v1/keys")]
    return KmeEndpoint(
        url=url,
        host=parts.hostname,
        port=port or 443,
        api_path=prefix + API_PATH,
        host_header=parts.netloc,
    )


@dataclass(frozen=True)
class KmeStatus:
    """The standard's Status object; fields the KME left out are None."""

    key_size: int
    stored_key_count: int
    source_kme_id: str | None = None
    target_kme_id: str | None = None
    master_sae_id: str | None = None
    slave_sae_id: str | None = None
    max_key_count: int | None = None
    max_key_per_request: int | None = None
    max_key_size: int | None = None
    min_key_size: int | None = None


def _json_object(body: bytes, what: str) -> dict[str, Any]:
    try:
        obj = json.loads(body)
    except (ValueError, RecursionError) as exc:
        raise KmeResponseError(f"the KME's {what} is not valid JSON ({exc})") from None
    if not isinstance(obj, dict):
        raise KmeResponseError(f"the KME's {what} is not a JSON object")
    return obj


def _int_field(obj: dict[str, Any], name: str, *, required: bool) -> int | None:
    value = obj.get(name)
    if value is None and not required:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise KmeResponseError(
            f"the KME's Status object has {name} = {value!r}; the standard wants a "
            "non-negative integer"
        )
    return value


def _str_field(obj: dict[str, Any], name: str) -> str | None:
    value = obj.get(name)
    return value if isinstance(value, str) else None


def parse_status(body: bytes) -> KmeStatus:
    """The Status object of a 200 answer to ``status``; raises ``KmeResponseError``."""
    obj = _json_object(body, "Status object")
    key_size = _int_field(obj, "key_size", required=True)
    stored = _int_field(obj, "stored_key_count", required=True)
    assert key_size is not None and stored is not None
    if key_size == 0:
        raise KmeResponseError("the KME's Status object has key_size 0")
    return KmeStatus(
        key_size=key_size,
        stored_key_count=stored,
        source_kme_id=_str_field(obj, "source_KME_ID"),
        target_kme_id=_str_field(obj, "target_KME_ID"),
        master_sae_id=_str_field(obj, "master_SAE_ID"),
        slave_sae_id=_str_field(obj, "slave_SAE_ID"),
        max_key_count=_int_field(obj, "max_key_count", required=False),
        max_key_per_request=_int_field(obj, "max_key_per_request", required=False) or None,
        max_key_size=_int_field(obj, "max_key_size", required=False),
        min_key_size=_int_field(obj, "min_key_size", required=False),
    )


def _shown(value: object) -> str:
    """A value from the KME, for a message: bounded, one line."""
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def canonical_key_id(value: object) -> str:
    """A KME's key_ID as a canonical lowercase UUID; raises ``KmeResponseError`` for anything
    but the standard's 8-4-4-4-12 hexadecimal form."""
    if not isinstance(value, str) or not _UUID_TEXT.fullmatch(value):
        raise KmeResponseError(
            f"the KME sent key_ID {_shown(value)}, which is not a UUID "
            "(ETSI GS QKD 014 key IDs are UUIDs, 8-4-4-4-12 hexadecimal digits); "
            "qkdd cannot use keys from this KME"
        )
    return value.lower()


def parse_key_container(body: bytes) -> list[QkdKey]:
    """The keys of a 200 answer to ``enc_keys`` or ``dec_keys``, IDs made canonical; raises
    ``KmeResponseError`` (whose message never holds key material)."""
    obj = _json_object(body, "Key container")
    entries = obj.get("keys")
    if not isinstance(entries, list) or not entries:
        raise KmeResponseError("the KME's Key container has no non-empty 'keys' array")
    keys: list[QkdKey] = []
    seen: set[str] = set()
    for index, entry in enumerate(entries):
        if not isinstance(entry, dict):
            raise KmeResponseError(f"entry {index} of the KME's Key container is not an object")
        key_id = canonical_key_id(entry.get("key_ID"))
        if key_id in seen:
            raise KmeResponseError(f"the KME's Key container holds key_ID {key_id} twice")
        seen.add(key_id)
        encoded = entry.get("key")
        if not isinstance(encoded, str):
            raise KmeResponseError(f"key {key_id} in the KME's Key container has no 'key' string")
        try:
            material = base64.b64decode(encoded, validate=True)
        except (binascii.Error, ValueError):
            raise KmeResponseError(
                f"key {key_id} in the KME's Key container is not valid base64"
            ) from None
        if not material:
            raise KmeResponseError(f"key {key_id} in the KME's Key container is empty")
        keys.append(QkdKey(key_id, material))
    return keys


def _error_message(body: bytes) -> str:
    """The message of the standard's Error object, or the start of whatever came instead."""
    message: object = None
    try:
        obj = json.loads(body)
    except (ValueError, RecursionError):
        obj = None
    if isinstance(obj, dict):
        message = obj.get("message")
    if not isinstance(message, str):
        message = body.decode("utf-8", "replace").strip() or "no message"
    text = message if message.isprintable() else message.encode("unicode_escape").decode()
    return text if len(text) <= MAX_MESSAGE_CHARS else text[: MAX_MESSAGE_CHARS - 3] + "..."


def refusal(status: int, body: bytes, doing: str, where: str) -> KmeRefusedError:
    """The error for a non-200 answer."""
    message = _error_message(body)
    if status == 503:
        return KmeUnavailableError(status, message, doing, where)
    if status in (401, 403):
        return KmeUnauthorizedError(status, message, doing, where)
    return KmeRefusedError(status, message, doing, where)


# -- sans-IO: HTTP/1.1 ---------------------------------------------------------------------


class KmeHttp:
    """One HTTP/1.1 client connection's bytes in and out, through h11, without I/O."""

    def __init__(self, host_header: str) -> None:
        self.host_header = host_header
        self.used = False  # a request went out on this connection
        self._h11 = h11.Connection(h11.CLIENT)
        self._status = 0
        self._body = bytearray()

    def request(self, method: str, target: str, body: bytes | None) -> bytes:
        headers = [("host", self.host_header), ("accept", "application/json")]
        if body is not None:
            headers += [("content-type", "application/json"), ("content-length", str(len(body)))]
        data = self._h11.send(h11.Request(method=method, target=target, headers=headers))
        if body:
            data += self._h11.send(h11.Data(data=body)) or b""
        data += self._h11.send(h11.EndOfMessage()) or b""
        self.used = True
        return data or b""

    def receive(self, data: bytes) -> tuple[int, bytes] | None:
        """Feed bytes received (b"" at end of file); (status, body) once the answer is whole.
        Raises ``KmeUnreachableError`` when the KME closed before answering,
        ``KmeResponseError`` for bytes that are not HTTP."""
        if not data and self._status == 0:
            raise KmeUnreachableError("the KME closed the connection without answering")
        self._h11.receive_data(data)
        while True:
            try:
                event = self._h11.next_event()
            except h11.RemoteProtocolError as exc:
                raise KmeResponseError(f"the KME's answer is not valid HTTP/1.1: {exc}") from None
            if event is h11.NEED_DATA:
                return None
            if isinstance(event, h11.Response):
                self._status = event.status_code
            elif isinstance(event, h11.Data):
                self._body += event.data
                if len(self._body) > MAX_RESPONSE_BYTES:
                    raise KmeResponseError(
                        f"the KME's answer is over {MAX_RESPONSE_BYTES} bytes; that is not "
                        "an ETSI GS QKD 014 answer"
                    )
            elif isinstance(event, h11.EndOfMessage):
                return self._status, bytes(self._body)
            elif isinstance(event, h11.ConnectionClosed):
                raise KmeUnreachableError("the KME closed the connection in mid-answer")
            # InformationalResponse (100 Continue): the real answer follows.

    def next_cycle(self) -> bool:
        """Ready the connection for another request; False when it must be closed."""
        self._status, self._body = 0, bytearray()
        if self._h11.our_state is h11.DONE and self._h11.their_state is h11.DONE:
            self._h11.start_next_cycle()
            return True
        return False


# -- TLS -----------------------------------------------------------------------------------


def kme_ssl_context(cert_file: str, key_file: str | None, ca_file: str | None) -> ssl.SSLContext:
    """TLS 1.2 or later (the standard's floor, and what many KMEs offer), presenting the
    client certificate ``cert_file`` (key in ``key_file``, or in ``cert_file`` when None),
    trusting KME certificates issued by the CAs in ``ca_file`` (the system's when None) and
    checking the KME's name. Raises ``KmeConfigError``."""
    try:
        context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=ca_file)
    except FileNotFoundError:
        raise KmeConfigError(f"KME CA file not found: {ca_file}; check ca_file") from None
    except (ssl.SSLError, OSError) as exc:
        raise KmeConfigError(
            f"cannot load the KME CA file {ca_file}: {exc}; it must hold PEM CA certificates"
        ) from None
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        context.load_cert_chain(cert_file, key_file)
    except FileNotFoundError:
        missing = [p for p in (cert_file, key_file) if p is not None and not os.path.exists(p)]
        raise KmeConfigError(
            f"client certificate or key file not found: {', '.join(missing) or cert_file}; "
            "check cert_file and key_file"
        ) from None
    except (ssl.SSLError, OSError) as exc:
        raise KmeConfigError(
            f"cannot load the client certificate {cert_file}"
            f"{f' with key {key_file}' if key_file else ''}: {exc}; both must be PEM and "
            "the key must belong to the certificate"
        ) from None
    return context


def _tls_problem(exc: BaseException) -> str | None:
    """What went wrong in TLS, in words for an operator, if ``exc`` comes from TLS."""
    seen: BaseException | None = exc
    while seen is not None and not isinstance(seen, ssl.SSLError):
        seen = seen.__cause__ or seen.__context__
    # A connection closed without an alert is not a TLS problem.
    if seen is None or isinstance(
        seen, ssl.SSLEOFError | ssl.SSLZeroReturnError | ssl.SSLSyscallError
    ):
        return None
    if isinstance(seen, ssl.SSLCertVerificationError):
        return (
            f"the KME's certificate is not trusted ({seen.verify_message}); ca_file must hold "
            "the CA that issued it, and the URL's host must be a name in it"
        )
    reason = seen.reason or str(seen)
    if "ALERT" in reason.upper():
        return (
            f"the KME refused this client's certificate ({reason}); cert_file must be issued "
            "by a CA the KME trusts for SAE clients, be valid now and allow client "
            "authentication"
        )
    if reason in ("WRONG_VERSION_NUMBER", "UNSUPPORTED_PROTOCOL", "NO_PROTOCOLS_AVAILABLE"):
        return (
            f"no TLS in common with the KME ({reason}); it must speak TLS 1.2 or later, and "
            "the URL's port must be its HTTPS port"
        )
    return f"TLS failed ({reason})"


def _connect_problem(exc: OSError) -> str:
    # trio reports a failed connect as one OSError caused by a group of the failures of
    # each address tried; the first of those says what happened.
    group = exc.__cause__
    if isinstance(group, BaseExceptionGroup) and isinstance(group.exceptions[0], OSError):
        exc = group.exceptions[0]
    if isinstance(exc, ConnectionRefusedError):
        return "connection refused; is the KME running, and are the URL's host and port right?"
    if isinstance(exc, socket.gaierror):
        return f"cannot resolve the host name ({exc.strerror or exc})"
    return exc.strerror or str(exc)


# -- Trio: one kept-alive connection -------------------------------------------------------


class _StaleConnection(Exception):
    pass


class _KmeConnection:
    """One HTTPS connection to the KME, opened on demand, kept alive between requests, and
    used by one task at a time."""

    def __init__(
        self,
        endpoint: KmeEndpoint,
        make_context: Callable[[], ssl.SSLContext],
        server_hostname: str,
        timeout: float,
    ) -> None:
        self._endpoint = endpoint
        self._make_context = make_context
        self._server_hostname = server_hostname
        self._timeout = timeout
        self._stream: trio.SSLStream[trio.SocketStream] | None = None
        self._http = KmeHttp(endpoint.host_header)
        self._lock = trio.Lock()

    async def aclose(self) -> None:
        if self._stream is not None:
            stream, self._stream = self._stream, None
            await trio.aclose_forcefully(stream)

    async def call(self, method: str, target: str, body: bytes | None) -> tuple[int, bytes]:
        """(status, body) of one request; raises ``KmeUnreachableError`` (``KmeTlsError``),
        ``KmeResponseError`` or ``KmeConfigError``."""
        async with self._lock:
            with trio.move_on_after(self._timeout):
                try:
                    return await self._exchange(method, target, body)
                except _StaleConnection:
                    # The KME closed a kept-alive connection before reading this request
                    # (its idle timeout), so nothing was processed: one retry is safe.
                    return await self._exchange(method, target, body)
            await self.aclose()
            raise KmeUnreachableError(
                f"no answer from the KME at {self._endpoint.url} within {self._timeout:g} s"
            )

    async def _exchange(self, method: str, target: str, body: bytes | None) -> tuple[int, bytes]:
        where = self._endpoint.url
        if self._stream is None:
            self._stream = await self._connect()
            self._http = KmeHttp(self._endpoint.host_header)
        http, stream = self._http, self._stream
        reused = http.used
        got_bytes = False
        try:
            await stream.send_all(http.request(method, target, body))
            while True:
                data = await stream.receive_some(RECEIVE_SIZE)
                got_bytes = got_bytes or bool(data)
                result = http.receive(bytes(data))
                if result is not None:
                    break
        except (trio.BrokenResourceError, trio.ClosedResourceError, KmeUnreachableError) as exc:
            await self.aclose()
            tls = _tls_problem(exc)
            if reused and not got_bytes and tls is None:
                raise _StaleConnection from exc
            if tls is not None:
                raise KmeTlsError(f"cannot use the KME at {where}: {tls}") from None
            raise KmeUnreachableError(
                f"the connection to the KME at {where} failed: {_cause(exc)}"
            ) from None
        except BaseException:
            await self.aclose()
            raise
        if not http.next_cycle():
            await self.aclose()
        return result

    async def _connect(self) -> trio.SSLStream[trio.SocketStream]:
        endpoint = self._endpoint
        # A fresh context per connection picks up renewed certificate files.
        context = self._make_context()
        try:
            tcp = await trio.open_tcp_stream(endpoint.host, endpoint.port)
        except OSError as exc:
            raise KmeUnreachableError(
                f"cannot connect to the KME at {endpoint.url}: {_connect_problem(exc)}"
            ) from None
        # https_compatible: HTTP servers commonly close without close_notify.
        stream = trio.SSLStream(
            tcp, context, server_hostname=self._server_hostname, https_compatible=True
        )
        try:
            await stream.do_handshake()
        except trio.BrokenResourceError as exc:
            await trio.aclose_forcefully(tcp)
            why = _tls_problem(exc) or f"the TLS handshake failed: {_cause(exc)}"
            raise KmeTlsError(f"cannot use the KME at {endpoint.url}: {why}") from None
        except BaseException:
            await trio.aclose_forcefully(tcp)
            raise
        return stream


def _cause(exc: BaseException) -> str:
    inner = exc.__cause__ or exc
    return str(inner) or type(inner).__name__


# -- the device ----------------------------------------------------------------------------


class Etsi014Device(FetchByIdDevice):
    """A QKD link whose keys come from an ETSI GS QKD 014 KME at this site.

    ``role`` must be this site's role on the link: "master" at the link master (it calls
    ``enc_keys`` and fills the sink from ``run``), "slave" at the link slave (the daemon calls
    ``fetch_keys`` with the IDs the master named). ``own_sae_id`` is the SAE ID under which the
    KME knows this daemon (through ``cert_file``), ``peer_sae_id`` the one it knows the peer
    site's daemon by.
    """

    def __init__(
        self,
        url: str,
        *,
        cert_file: str,
        key_file: str | None = None,
        ca_file: str | None = None,
        own_sae_id: str,
        peer_sae_id: str,
        role: Role,
        key_size_bits: int = DEFAULT_KEY_SIZE_BITS,
        keys_per_request: int = DEFAULT_KEYS_PER_REQUEST,
        poll_interval: float = DEFAULT_POLL_INTERVAL,
        buffer_target: int = DEFAULT_BUFFER_TARGET,
        request_timeout: float = DEFAULT_REQUEST_TIMEOUT,
        reconnect_initial_delay: float = DEFAULT_RECONNECT_INITIAL_DELAY,
        reconnect_max_delay: float = DEFAULT_RECONNECT_MAX_DELAY,
        server_hostname: str | None = None,
        recent_ids: int = DEFAULT_RECENT_IDS,
    ) -> None:
        super().__init__()
        if role not in ("master", "slave"):
            raise ValueError(f"role must be 'master' or 'slave', not {role!r}")
        if not own_sae_id or not peer_sae_id or own_sae_id == peer_sae_id:
            raise ValueError("own_sae_id and peer_sae_id must be two different, non-empty IDs")
        if key_size_bits <= 0 or key_size_bits % 8:
            raise ValueError("key_size_bits must be a positive multiple of 8")
        if keys_per_request < 1 or buffer_target < 1:
            raise ValueError("keys_per_request and buffer_target must be at least 1")
        if poll_interval <= 0 or request_timeout <= 0:
            raise ValueError("poll_interval and request_timeout must be positive")
        self.endpoint = parse_kme_url(url)
        self.url = url
        self.role: Role = role
        self.own_sae_id = own_sae_id
        self.peer_sae_id = peer_sae_id
        self.key_size_bits = key_size_bits
        self.keys_per_request = keys_per_request
        self.poll_interval = poll_interval
        self.buffer_target = buffer_target
        self.reconnect_max_delay = reconnect_max_delay
        self.reconnect_initial_delay = min(reconnect_initial_delay, reconnect_max_delay)

        def make_context() -> ssl.SSLContext:
            return kme_ssl_context(cert_file, key_file, ca_file)

        make_context()  # a configuration error shows at start-up, not as a retry loop
        hostname = server_hostname or self.endpoint.host
        # The status loop and fetch_keys each have their own connection, so a slow status
        # call never delays the keys a batch waits for.
        self._poll_conn = _KmeConnection(self.endpoint, make_context, hostname, request_timeout)
        self._fetch_conn = _KmeConnection(self.endpoint, make_context, hostname, request_timeout)
        self._recent = RecentKeyIds(recent_ids)
        # One fetch at a time, so a fetch sees what the one before it stored and does not
        # ask again for keys the KME has already erased.
        self._fetch_lock = trio.Lock()
        self._sink: KeySink | None = None
        self._unstored: list[QkdKey] = []  # taken from the KME, not yet in the sink
        self._max_per_request: int | None = None  # the KME's, once its status is known
        self._healthy = False
        self.status = DeviceStatus(state="connecting", detail=f"not yet connected to {url}")

    def __repr__(self) -> str:
        return (
            f"Etsi014Device({self.url!r}, role={self.role!r}, own_sae_id={self.own_sae_id!r}, "
            f"peer_sae_id={self.peer_sae_id!r})"
        )

    def _update(self, **changes: object) -> None:
        # A fresh object each time: whoever holds the previous snapshot keeps a consistent one.
        self.status = dataclasses.replace(self.status, **changes)  # type: ignore[arg-type]

    # -- the reconnect loop --

    async def run(
        self, sink: KeySink, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
    ) -> None:
        self._sink = sink
        delay = self.reconnect_initial_delay
        started = False

        def attempted() -> None:
            nonlocal started
            if not started:
                task_status.started()
                started = True

        try:
            while True:
                self._healthy = False
                error: Exception
                try:
                    if self.role == "master":
                        await self._master_session(sink, attempted)
                    else:
                        await self._slave_session(attempted)
                except KmeError as exc:
                    error = exc
                except Exception as exc:
                    # A fault in this process must not stop key delivery for good; the
                    # traceback goes to the log and the session is retried.
                    log.exception("device.unexpected-error url=%s", self.url)
                    error = exc
                if not isinstance(error, KmeRefusedError):
                    # After a refusal the connection is fine (the KME answered on it);
                    # after anything else the next attempt starts on a fresh one.
                    await self._poll_conn.aclose()
                if self._healthy:
                    delay = self.reconnect_initial_delay
                log.warning(
                    "device.down url=%s role=%s error=%s reason=%r retry_in=%g",
                    self.url,
                    self.role,
                    type(error).__name__,
                    str(error),
                    delay,
                )
                self._update(
                    state="down", detail=f"{error}; retrying in {delay:g} s", keys_buffered=None
                )
                attempted()  # the caller sees this first attempt's outcome in status
                await trio.sleep(delay)
                delay = min(delay * 2, self.reconnect_max_delay)
        finally:
            self._sink = None
            with trio.CancelScope(shield=True):
                await self._poll_conn.aclose()
                await self._fetch_conn.aclose()

    def _mark_healthy(self, detail: str, **changes: object) -> None:
        if not self._healthy or self.status.state != "up":
            log.info(
                "device.up url=%s role=%s own_sae=%s peer_sae=%s",
                self.url,
                self.role,
                self.own_sae_id,
                self.peer_sae_id,
            )
        self._healthy = True
        self._update(state="up", detail=detail, **changes)

    async def _status(self, conn: _KmeConnection) -> KmeStatus:
        target = self.endpoint.target(self.peer_sae_id, "status")
        status, body = await conn.call("GET", target, None)
        if status != 200:
            raise refusal(status, body, "a status request", self.url)
        st = parse_status(body)
        if st.max_key_per_request:
            self._max_per_request = st.max_key_per_request
        return st

    # -- master: keep the sink supplied --

    async def _master_session(self, sink: KeySink, attempted: Callable[[], None]) -> None:
        while True:
            if self._unstored:  # before anything else, KME or not
                await self._store_taken(sink)
            st = await self._status(self._poll_conn)
            self._check_master_status(st)
            wanted = self._wanted(st, sink)
            if wanted:
                await self._take(wanted, st, sink)
            self._mark_healthy(
                self._master_detail(st),
                keys_buffered=st.stored_key_count,
                key_size_bits=self.key_size_bits,
            )
            attempted()
            if not wanted:  # else ask again at once: the buffer may still be short
                await trio.sleep(self.poll_interval)

    def _check_master_status(self, st: KmeStatus) -> None:
        if st.master_sae_id is not None and st.master_sae_id != self.own_sae_id:
            raise KmeConfigError(
                f"the KME at {self.url} knows this client as SAE {st.master_sae_id!r}, but "
                f"own_sae_id is {self.own_sae_id!r}; fix own_sae_id or use the client "
                "certificate the KME maps to it"
            )
        if st.slave_sae_id is not None and st.slave_sae_id != self.peer_sae_id:
            raise KmeConfigError(
                f"the KME at {self.url} reports status for slave SAE {st.slave_sae_id!r} "
                f"when asked for {self.peer_sae_id!r}"
            )
        low, high = st.min_key_size, st.max_key_size
        if (low is not None and self.key_size_bits < low) or (
            high is not None and self.key_size_bits > high
        ):
            raise KmeConfigError(
                f"the KME at {self.url} serves keys of {'?' if low is None else low} to "
                f"{'?' if high is None else high} bits; "
                f"key_size_bits = {self.key_size_bits} is outside that range, change it"
            )

    def _wanted(self, st: KmeStatus, sink: KeySink) -> int:
        """How many keys to take now: room in the sink, the KME's per-request limit, and
        what the KME holds (counted in its own key size)."""
        wanted = self.keys_per_request
        if isinstance(sink, CountingKeySink):
            wanted = min(wanted, self.buffer_target - sink.qkd_keys_buffered())
        if st.max_key_per_request:
            wanted = min(wanted, st.max_key_per_request)
        available = st.stored_key_count * st.key_size // self.key_size_bits
        return max(0, min(wanted, available))

    def _master_detail(self, st: KmeStatus) -> str:
        kme = f"KME {st.source_kme_id!r}" if st.source_kme_id else "KME"
        detail = (
            f"{kme} at {self.url}: keys for {self.own_sae_id} -> {self.peer_sae_id}, "
            f"{st.stored_key_count} of {st.key_size} bits ready"
        )
        if st.stored_key_count * st.key_size < self.key_size_bits:
            detail += "; waiting for the QKD link to deliver more"
        return detail

    async def _take(self, number: int, st: KmeStatus, sink: KeySink) -> None:
        request: dict[str, int] = {"number": number}
        # Ask for a size only when it is not the KME's default: some KMEs serve one size.
        if self.key_size_bits != st.key_size:
            request["size"] = self.key_size_bits
        status, body = await self._poll_conn.call(
            "POST",
            self.endpoint.target(self.peer_sae_id, "enc_keys"),
            json.dumps(request).encode(),
        )
        if status != 200:
            raise refusal(status, body, f"a request for {number} keys", self.url)
        keys = parse_key_container(body)
        if len(keys) > number:
            raise KmeResponseError(
                f"the KME at {self.url} sent {len(keys)} keys when asked for {number}"
            )
        fresh = [key for key in keys if self._recent.check(key.key_id, key.material) == "new"]
        if len(fresh) < len(keys):
            # Dropped: the daemon may already have used the first copy.
            log.error(
                "device.key-id-reused url=%s count=%d action=dropped "
                "hint='the KME handed out key IDs it had handed out before; report this'",
                self.url,
                len(keys) - len(fresh),
            )
        self._unstored += fresh
        await self._store_taken(sink)

    async def _store_taken(self, sink: KeySink) -> None:
        """Store the keys taken from the KME. On failure they stay here and are stored before
        any more are taken: the KME has handed them out and will not give them again."""
        keys = self._unstored
        if not keys:
            return
        try:
            await sink.store_qkd_keys(keys)
        except Exception as exc:
            raise KmeStoreError(
                f"storing {len(keys)} keys taken from the KME failed ({exc}); they are held "
                "in memory and stored again before more are taken"
            ) from exc
        self._unstored = []
        for key in keys:
            self._recent.add(key.key_id, key.material)
        self._update(keys_received=self.status.keys_received + len(keys))
        log.debug(
            "device.keys url=%s stored=%d key_ids=%s",
            self.url,
            len(keys),
            ",".join(k.key_id for k in keys),
        )

    # -- slave: health check, and keys by ID --

    async def _slave_session(self, attempted: Callable[[], None]) -> None:
        while True:
            self._mark_healthy(await self._slave_check())
            attempted()
            await trio.sleep(self.poll_interval)

    async def _slave_check(self) -> str:
        kme = "KME"
        try:
            st = await self._status(self._poll_conn)
        except KmeRefusedError as exc:
            # The standard has the master SAE ask for status; a KME may refuse the slave
            # with 400 or 404. It answered over mutual TLS, which is what is checked here.
            if exc.status not in (400, 404):
                raise
        else:
            if st.source_kme_id:
                kme = f"KME {st.source_kme_id!r}"
        return f"{kme} at {self.url} answers; keys from {self.peer_sae_id} are fetched by ID"

    async def fetch_keys(self, key_ids: Sequence[str]) -> None:
        """Collect these keys from the KME with ``dec_keys`` and store them in the sink of the
        running ``run``; see ``FetchByIdDevice.fetch_keys``.

        IDs this device stored recently are skipped (the KME has erased them). Raises
        ``UnknownKeyIdsError`` naming the IDs the KME does not hold, after storing the ones
        it does; ``KmeUnreachableError``, ``KmeRefusedError`` or ``KmeResponseError`` when
        the KME cannot be used; ``KmeStoreError`` when the sink fails (those keys are lost:
        the KME erased them when it handed them out)."""
        if self.role != "slave":
            raise KmeConfigError(
                "fetch_keys is for the link slave; this device is configured as the master"
            )
        sink = self._sink
        if sink is None:
            raise KmeError("fetch_keys needs the device running: start run(sink) first")
        for key_id in key_ids:
            if not isinstance(key_id, str) or not _CANONICAL_UUID.fullmatch(key_id):
                raise ValueError(f"key ID {key_id!r} is not a canonical lowercase UUID")
        async with self._fetch_lock:
            await self._fetch(sink, key_ids)

    async def _fetch(self, sink: KeySink, key_ids: Sequence[str]) -> None:
        wanted = [k for k in dict.fromkeys(key_ids) if k not in self._recent]
        if not wanted:
            return
        chunk = max(1, min(self.keys_per_request, self._max_per_request or self.keys_per_request))
        missing: list[str] = []
        reason = ""
        stored = 0
        for start in range(0, len(wanted), chunk):
            part = wanted[start : start + chunk]
            try:
                keys = await self._dec_keys(part)
            except KmeRefusedError as exc:
                if exc.status not in (400, 404):
                    raise
                reason = exc.message
                keys = []
                if len(part) == 1:
                    missing += part
                else:
                    # The standard's dec_keys is all or nothing: ask one by one to learn
                    # which IDs the KME lacks, and still collect the others.
                    for key_id in part:
                        try:
                            keys += await self._dec_keys([key_id])
                        except KmeRefusedError as one:
                            if one.status not in (400, 404):
                                raise
                            missing.append(key_id)
                            reason = one.message
            if keys:
                await self._store_fetched(sink, keys)
                stored += len(keys)
        log.debug(
            "device.fetched url=%s requested=%d stored=%d missing=%d",
            self.url,
            len(wanted),
            stored,
            len(missing),
        )
        if missing:
            log.info(
                "device.keys-not-held url=%s master_sae=%s count=%d",
                self.url,
                self.peer_sae_id,
                len(missing),
            )
            log.debug("device.keys-not-held url=%s key_ids=%s", self.url, ",".join(missing))
            raise UnknownKeyIdsError(missing, self.peer_sae_id, self.url, reason)

    async def _dec_keys(self, key_ids: Sequence[str]) -> list[QkdKey]:
        body = json.dumps({"key_IDs": [{"key_ID": key_id} for key_id in key_ids]}).encode()
        status, answer = await self._fetch_conn.call(
            "POST", self.endpoint.target(self.peer_sae_id, "dec_keys"), body
        )
        if status != 200:
            raise refusal(status, answer, f"a request for {len(key_ids)} keys by ID", self.url)
        by_id = {key.key_id: key for key in parse_key_container(answer)}
        got = set(by_id)
        if got != set(key_ids):
            extra = sorted(got - set(key_ids))
            lacking = sorted(set(key_ids) - got)
            raise KmeResponseError(
                f"the KME at {self.url} answered a request for keys by ID with other keys "
                f"(not sent: {', '.join(lacking) or 'none'}; not asked for: "
                f"{', '.join(extra) or 'none'})"
            )
        # In the order asked for: the key store keeps keys in arrival order.
        return [by_id[key_id] for key_id in key_ids]

    async def _store_fetched(self, sink: KeySink, keys: list[QkdKey]) -> None:
        try:
            await sink.store_qkd_keys(keys)
        except Exception as exc:
            raise KmeStoreError(
                f"storing {len(keys)} keys fetched from the KME failed ({exc}); they are "
                "lost (the KME erased them when it handed them out)"
            ) from exc
        for key in keys:
            self._recent.add(key.key_id, key.material)
        self._update(keys_received=self.status.keys_received + len(keys))
