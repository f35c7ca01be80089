"""Where the key service is (`Endpoint`: a Unix socket path, or a TLS host and port with the
client's TLS context), who answers there (`KEY_SERVICE`: its name and errors for
`qkdd.client.roundtrip`), and what a failed connection is told as: the messages an operator
sees when the socket is missing, refused, not permitted, or TLS fails. No I/O here; `ssl`
only for the context.
"""

from __future__ import annotations

import ssl
from dataclasses import dataclass

from qkdd.client.client_errors import BadResponse, ClientError, KeyServiceUnreachable
from qkdd.client.roundtrip import Service, connect_reason, first_failure, tls_reason

__all__ = ["DEFAULT_TIMEOUT", "KEY_SERVICE", "Endpoint", "client_ssl_context"]

DEFAULT_TIMEOUT = 10.0
RECEIVE_SIZE = 64 * 1024

KEY_SERVICE = Service(
    name="the key service",
    unreachable=KeyServiceUnreachable,
    malformed=BadResponse,
    # A full key container of the largest allowed request stays far below this.
    max_answer_bytes=16 * 1024 * 1024,
    untrusted=(
        "the service's certificate is not trusted ({verify}); check the CA file and that "
        "the address matches the certificate"
    ),
    refused=(
        "the service refused this client's TLS connection ({reason}); its certificate must "
        "be issued by the service's client CA, and TLS 1.3 is required"
    ),
)


def client_ssl_context(
    cert_file: str, key_file: str | None = None, ca_file: str | None = None
) -> ssl.SSLContext:
    """TLS 1.3 with the client certificate `cert_file` (its key in `key_file`, or in `cert_file`
    when None), trusting the service certificates issued by the CAs in `ca_file` (PEM), or the
    system's CAs when None. The service's name is checked against its certificate."""
    try:
        context = ssl.create_default_context(cafile=ca_file)
    except OSError as exc:  # ssl.SSLError is an OSError
        raise ClientError(f"cannot load the CA file {ca_file}: {exc}") from None
    context.minimum_version = ssl.TLSVersion.TLSv1_3
    try:
        context.load_cert_chain(cert_file, key_file)
    except OSError as exc:
        raise ClientError(
            f"cannot load the client certificate {cert_file}"
            f"{f' with key {key_file}' if key_file else ''}: {exc}"
        ) from exc
    return context


@dataclass(frozen=True)
class Endpoint:
    """Where the service is: a Unix socket path, or a TLS host and port."""

    where: str  # for messages
    socket_path: str | None = None
    host: str = "localhost"
    port: int = 0
    ssl_context: ssl.SSLContext | None = None
    server_hostname: str | None = None

    @classmethod
    def unix(cls, path: str) -> Endpoint:
        return cls(where=str(path), socket_path=str(path))

    @classmethod
    def tls(
        cls, host: str, port: int, context: ssl.SSLContext, server_hostname: str | None
    ) -> Endpoint:
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


def failed(where: str, exc: BaseException) -> KeyServiceUnreachable:
    """An established connection failed (or the service closed it)."""
    why = tls_reason(exc, KEY_SERVICE) or exc
    return KeyServiceUnreachable(f"connection to {where} failed: {why}")


def unreachable(where: str, exc: OSError) -> KeyServiceUnreachable:
    """Connecting (or the TLS handshake) failed: why, in words for an operator."""
    exc = first_failure(exc)
    tls = tls_reason(exc, KEY_SERVICE)
    if tls is not None:
        return KeyServiceUnreachable(f"cannot reach the key service at {where}: {tls}")
    if where.startswith("https://"):
        why = connect_reason(
            exc,
            refused="connection refused; is qkdd running with its TLS API listening on this "
            "address and port?",
        )
    elif isinstance(exc, FileNotFoundError):
        why = "no such socket; is qkdd running, and is this the configured API socket?"
    elif isinstance(exc, PermissionError):
        why = "permission denied; the user must be in the group that owns the socket"
    elif isinstance(exc, ConnectionRefusedError):
        why = "connection refused; the socket is stale, qkdd is not running"
    else:
        why = exc.strerror or str(exc)
    return KeyServiceUnreachable(f"cannot reach the key service at {where}: {why}")
