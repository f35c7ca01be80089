"""Where the key service is (`Endpoint`: a Unix socket path, or a TLS host and port with the
client's TLS context), and what a failed connection is told as: the messages an operator
sees when the socket is missing, refused, not permitted, or TLS fails. No I/O here; `ssl`
and `socket` only for the context and the exception types.
"""

from __future__ import annotations

import socket
import ssl
from dataclasses import dataclass

from qkdd.client.errors import ClientError, KeyServiceUnreachable

__all__ = ["DEFAULT_TIMEOUT", "Endpoint", "client_ssl_context"]

DEFAULT_TIMEOUT = 10.0
RECEIVE_SIZE = 64 * 1024


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


def tls_reason(exc: BaseException) -> str | None:
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


def failed(where: str, exc: BaseException) -> KeyServiceUnreachable:
    """An established connection failed (or the service closed it)."""
    return KeyServiceUnreachable(f"connection to {where} failed: {tls_reason(exc) or exc}")


def unreachable(where: str, exc: OSError) -> KeyServiceUnreachable:
    """Connecting (or the TLS handshake) failed: why, in words for an operator."""
    # Some event loops report a failed connect as one OSError caused by a group of the
    # failures of each address tried; the first of those says what happened.
    group = exc.__cause__
    if isinstance(group, BaseExceptionGroup) and isinstance(group.exceptions[0], OSError):
        exc = group.exceptions[0]
    tls = tls_reason(exc)
    if tls is not None:
        return KeyServiceUnreachable(f"cannot reach the key service at {where}: {tls}")
    if where.startswith("https://"):
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
    return KeyServiceUnreachable(f"cannot reach the key service at {where}: {why}")
