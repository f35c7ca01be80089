"""HTTPS to a KME: the client's TLS context (``kme_ssl_context``) and ``KmeConnection``, one
kept-alive connection carried out with Trio.

What happens on the connection is the HTTP client core qkdd's own client uses
(``qkdd.client.roundtrip``): the request and its whole answer, the one retry when the KME
had closed a kept-alive connection before reading the request, TLS failures told for an
operator. This module only opens connections, moves their bytes and bounds a call in time.
"""

from __future__ import annotations

import os
import ssl
from collections.abc import Callable
from typing import Any

import trio

from qkdd.client.roundtrip import (
    Action,
    Close,
    KeptConnection,
    Receive,
    Send,
    connect_reason,
    drive_async,
    tls_reason,
)
from qkdd.client.trio_client import open_tls_stream

from .kme_errors import KME, KmeConfigError, KmeTlsError, KmeUnreachableError
from .objects import KmeEndpoint

__all__ = ["KmeConnection", "kme_ssl_context"]

RECEIVE_SIZE = 64 * 1024


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


class KmeConnection:
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
        self._kept: KeptConnection[trio.SSLStream[trio.SocketStream]] = KeptConnection(
            endpoint.host_header, KME, self._is_failure, self._failed
        )
        self._lock = trio.Lock()

    async def aclose(self) -> None:
        stream = self._kept.forget()
        if stream is not None:
            await trio.aclose_forcefully(stream)

    async def call(self, method: str, target: str, body: bytes | None) -> tuple[int, bytes]:
        """(status, body) of one request; raises ``KmeUnreachableError`` (``KmeTlsError``),
        ``KmeResponseError`` or ``KmeConfigError``."""
        async with self._lock:
            with trio.move_on_after(self._timeout):
                return await drive_async(self._kept.call(method, target, body), self._act)
            await self.aclose()
            raise KmeUnreachableError(
                f"no answer from the KME at {self._endpoint.url} within {self._timeout:g} s"
            )

    async def _act(self, action: Action) -> Any:
        if isinstance(action, Receive):
            return bytes(await action.connection.receive_some(RECEIVE_SIZE))
        if isinstance(action, Send):
            return await action.connection.send_all(action.data)
        if isinstance(action, Close):
            return await trio.aclose_forcefully(action.connection)
        return await self._connect()

    @staticmethod
    def _is_failure(exc: BaseException) -> bool:
        return isinstance(
            exc, trio.BrokenResourceError | trio.ClosedResourceError | KmeUnreachableError
        )

    def _failed(self, exc: BaseException) -> KmeUnreachableError:
        where = self._endpoint.url
        tls = tls_reason(exc, KME)
        if tls is not None:
            return KmeTlsError(f"cannot use the KME at {where}: {tls}")
        return KmeUnreachableError(f"the connection to the KME at {where} failed: {_cause(exc)}")

    async def _connect(self) -> trio.SSLStream[trio.SocketStream]:
        endpoint = self._endpoint
        # A fresh context per connection picks up renewed certificate files.
        context = self._make_context()
        try:
            return await open_tls_stream(
                endpoint.host, endpoint.port, context, self._server_hostname
            )
        except OSError as exc:
            why = connect_reason(
                exc,
                refused="connection refused; is the KME running, and are the URL's host and "
                "port right?",
            )
            raise KmeUnreachableError(
                f"cannot connect to the KME at {endpoint.url}: {why}"
            ) from None
        except trio.BrokenResourceError as exc:
            why = tls_reason(exc, KME) or f"the TLS handshake failed: {_cause(exc)}"
            raise KmeTlsError(f"cannot use the KME at {endpoint.url}: {why}") from None


def _cause(exc: BaseException) -> str:
    inner = exc.__cause__ or exc
    return str(inner) or type(inner).__name__
