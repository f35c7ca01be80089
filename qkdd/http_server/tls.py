"""HTTPS with mutual TLS, as ETSI GS QKD 014 prescribes for its API, with Trio (SKIP's
listener uses it too).

Owns the server's TLS policy (TLS 1.3 only, a client certificate required and verified against
the configured client CA), the TLS handshake of each connection, and turning the verified client
certificate into the SAE IDs the caller may act as. Once a connection is up, requests are served
by the same code as on the Unix socket (`qkdd.http_server.serving.serve_stream`), so both
transports can share one handler (the ETSI `RequestHandler`) and one key pool.

Every handshake runs under a deadline. A failed one (no client certificate, a certificate from
another CA, a client without TLS 1.3, plain HTTP) is logged with the peer's address and ends
only that connection. Connections are capped as on the Unix socket (`qkdd.http_server.accept`),
by remote address instead of uid; a refused one is closed before its handshake.

Which certificate is which SAE (`sae_ids_from_certificate`): the configuration maps certificate
names to SAE IDs. The names of a certificate are its subject Common Names and its DNS
subjectAltNames. A name matches a configured one when they are equal; DNS names are compared
without regard to ASCII case (DNS is case-insensitive), Common Names exactly. Names holding a
wildcard ("*") never match. Every matching name grants its SAE ID; a certificate granting
several SAEs must pick one per request with the X-SAE-ID header. A certificate matching no name
is still let in (it was issued by the client CA) but every request is answered 401.
"""

from __future__ import annotations

import functools
import itertools
import logging
import os
import ssl
from collections.abc import Callable, Mapping, Sequence

import trio
from cryptography import x509
from cryptography.x509.oid import NameOID

from qkdd.constants import DEFAULT_HANDSHAKE_TIMEOUT, DEFAULT_REQUEST_TIMEOUT, LINGER_SECONDS
from qkdd.etsi014.key_pool import KeyServiceError
from qkdd.http_server.accept import (
    ConnectionGate,
    ConnectionSlot,
    accept_forever,
    api_connection_table,
)
from qkdd.http_server.exchange import Caller
from qkdd.http_server.limits import ConnectionTable
from qkdd.http_server.serving import (
    BeforeSend,
    Handler,
    Observe,
    drain_and_close,
    printable,
    serve_stream,
)

__all__ = [
    "IdentifyCertificate",
    "TlsConfigError",
    "certificate_names",
    "sae_ids_from_certificate",
    "serve_tls",
    "server_ssl_context",
]

log = logging.getLogger("qkdd.api")


IdentifyCertificate = Callable[[x509.Certificate], frozenset[str]]

# OpenSSL's reason codes for the handshake failures an operator will meet, with what to do.
_HANDSHAKE_HINTS = {
    "PEER_DID_NOT_RETURN_A_CERTIFICATE": "the client sent no certificate; configure the "
    "application with its client certificate and key",
    "CERTIFICATE_VERIFY_FAILED": "the client certificate is not valid under the configured "
    "client CA (other CA, expired, or wrong usage)",
    "UNSUPPORTED_PROTOCOL": "the client does not offer TLS 1.3, which this service requires",
    "NO_PROTOCOLS_AVAILABLE": "the client does not offer TLS 1.3, which this service requires",
    "WRONG_VERSION_NUMBER": "the client does not speak TLS 1.3 (plain HTTP, or an old TLS)",
    "HTTP_REQUEST": "the client speaks plain HTTP; it must use https://",
    # Alerts from clients refusing this service's certificate.
    "TLSV1_ALERT_UNKNOWN_CA": "the client does not trust this service's certificate; give it "
    "the CA certificate that issued the API certificate",
    "SSLV3_ALERT_BAD_CERTIFICATE": "the client refused this service's certificate; the address "
    "it connects to must be in the API certificate's subjectAltName",
    "SSLV3_ALERT_CERTIFICATE_EXPIRED": "the client finds this service's certificate expired",
}


class TlsConfigError(KeyServiceError):
    """The API's TLS listener cannot be set up from its configuration."""


def server_ssl_context(cert_file: str, key_file: str, client_ca_file: str) -> ssl.SSLContext:
    """The server's TLS policy: TLS 1.3 only, client certificates required and verified
    against the CA certificates in `client_ca_file` (PEM)."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_3
    context.verify_mode = ssl.CERT_REQUIRED
    try:
        context.load_cert_chain(cert_file, key_file)
    except FileNotFoundError as exc:
        # OpenSSL does not say which of the two it could not open.
        missing = [path for path in (cert_file, key_file) if not os.path.exists(path)]
        raise TlsConfigError(
            f"API TLS certificate or key file not found: "
            f"{', '.join(missing) or exc}; check the [api.tls] cert and key "
            "settings"
        ) from exc
    except (ssl.SSLError, OSError) as exc:
        raise TlsConfigError(
            f"cannot load the API TLS certificate {cert_file} with key {key_file}: {exc}; "
            "both must be PEM and the key must belong to the certificate"
        ) from exc
    try:
        context.load_verify_locations(cafile=client_ca_file)
    except FileNotFoundError as exc:
        raise TlsConfigError(
            f"API client CA file not found: {client_ca_file}; check the [api.tls] client CA setting"
        ) from exc
    except (ssl.SSLError, OSError) as exc:
        raise TlsConfigError(
            f"cannot load the API client CA file {client_ca_file}: {exc}; "
            "it must hold PEM CA certificates"
        ) from exc
    return context


def certificate_names(cert: x509.Certificate) -> tuple[list[str], list[str]]:
    """The certificate's subject Common Names and its DNS subjectAltNames."""
    common_names = [
        attr.value
        for attr in cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
        if isinstance(attr.value, str)
    ]
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return common_names, []
    return common_names, list(san.get_values_for_type(x509.DNSName))


def sae_ids_from_certificate(cert: x509.Certificate, allowed: Mapping[str, str]) -> frozenset[str]:
    """The SAE IDs granted to `cert` by `allowed` ({certificate name: SAE ID}); see the module
    docstring for the matching rule."""
    common_names, dns_names = certificate_names(cert)
    by_dns_name = {name.lower(): sae for name, sae in allowed.items()}
    granted = {allowed[name] for name in common_names if "*" not in name and name in allowed}
    granted.update(
        by_dns_name[name.lower()]
        for name in dns_names
        if "*" not in name and name.lower() in by_dns_name
    )
    return frozenset(granted)


async def serve_tls(
    host: str,
    port: int,
    handler: Handler,
    identify_certificate: IdentifyCertificate,
    *,
    cert_file: str,
    key_file: str,
    client_ca_file: str,
    request_timeout: float = DEFAULT_REQUEST_TIMEOUT,
    handshake_timeout: float = DEFAULT_HANDSHAKE_TIMEOUT,
    idle_timeout: float | None = None,
    connections: ConnectionTable | None = None,
    task_status: trio.TaskStatus[list[trio.SocketListener]] = trio.TASK_STATUS_IGNORED,
    listeners: Sequence[trio.SocketListener] | None = None,
    observe: Observe | None = None,
    before_send: BeforeSend | None = None,
) -> None:
    """Serve `handler` over HTTPS with mutual TLS on `host`:`port` until cancelled.

    `port` 0 picks a free port; `host` "" listens on every address. With `listeners` given
    (already listening TCP sockets, e.g. from systemd), `host` and `port` are not used; as with
    `trio.serve_listeners`, the listeners are closed when this returns.
    `task_status.started(listeners)` is called once connections are accepted. Raises
    `TlsConfigError` when the certificate, key or client CA cannot be loaded or the address
    cannot be bound. `idle_timeout` (default: `request_timeout`) closes a connection with no
    request in progress; `connections` caps the connections (default:
    `api_connection_table()`; pass the Unix socket's table to share one budget), by address.
    `before_send` is awaited before each answer's bytes are sent (`serve_stream`).
    """
    context = server_ssl_context(cert_file, key_file, client_ca_file)
    gate = ConnectionGate(connections or api_connection_table(), "tls")
    idle = request_timeout if idle_timeout is None else idle_timeout
    owned = listeners is None
    if listeners is None:
        try:
            listeners = await trio.open_tcp_listeners(port, host=host or None)
        except OSError as exc:
            raise TlsConfigError(
                f"cannot listen on {host or '*'}:{port} for the API: "
                f"{exc.strerror or exc}; check the [api.tls] listen "
                "address"
            ) from exc
    ready = list(listeners)
    counter = itertools.count(1)

    async def serve_one(stream: trio.SocketStream, peer: str, slot: ConnectionSlot) -> None:
        conn_id = next(counter)
        try:
            await _serve_tls(
                stream,
                peer,
                slot,
                context,
                handler,
                identify_certificate,
                (request_timeout, handshake_timeout, idle),
                conn_id,
                observe,
                before_send,
            )
        except Exception:
            # One connection's failure must never end the server.
            log.exception("event=api_connection_failed conn=%d", conn_id)
        finally:
            # With https_compatible there is no close_notify to send first.
            await trio.aclose_forcefully(stream)
            slot.release()

    try:
        async with trio.open_nursery() as nursery:

            def on_accept(stream: trio.SocketStream) -> None:
                try:
                    peer_address = stream.socket.getpeername()
                except OSError:
                    peer_address = None
                peer = _address(peer_address) if peer_address is not None else "unknown"
                host = peer_address[0] if isinstance(peer_address, tuple) else peer
                slot = gate.admit(host, f"peer={peer}")
                if slot is None:
                    stream.socket.close()  # no TLS yet: nothing to tell it
                    return
                nursery.start_soon(serve_one, stream, peer, slot)

            for listener in ready:
                await nursery.start(
                    functools.partial(accept_forever, listener, on_accept, transport="tls")
                )
            log.info(
                "event=api_tls_listening address=%s",
                ",".join(_address(listener.socket.getsockname()) for listener in ready),
            )
            task_status.started(ready)
    finally:
        gate.log_totals()
        if owned:  # accept_forever closes them too, but only once it has started
            for listener in ready:
                await listener.aclose()


async def _serve_tls(
    tcp: trio.SocketStream,
    peer: str,
    slot: ConnectionSlot,
    context: ssl.SSLContext,
    handler: Handler,
    identify_certificate: IdentifyCertificate,
    timeouts: tuple[float, float, float],
    conn_id: int,
    observe: Observe | None,
    before_send: BeforeSend | None = None,
) -> None:
    request_timeout, handshake_timeout, idle_timeout = timeouts
    # https_compatible: HTTP clients commonly close without close_notify; the HTTP framing
    # already tells a complete response from a cut one.
    stream = trio.SSLStream(tcp, context, server_side=True, https_compatible=True)
    try:
        with trio.move_on_after(handshake_timeout) as deadline:
            await stream.do_handshake()
        if deadline.cancelled_caught:
            log.info(
                "event=api_tls_handshake_timeout conn=%d peer=%s timeout=%g",
                conn_id,
                peer,
                handshake_timeout,
            )
            return
        der = stream.getpeercert(binary_form=True)
    except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
        _log_handshake_failure(conn_id, peer, exc)
        await _send_alert(stream)
        return
    caller, who = _certificate_caller(der, identify_certificate, peer, conn_id)
    await serve_stream(
        stream,
        handler,
        caller,
        who=who,
        request_timeout=request_timeout,
        idle_timeout=idle_timeout,
        slot=slot,
        conn_id=conn_id,
        observe=observe,
        before_send=before_send,
    )


async def _send_alert(stream: trio.SSLStream[trio.SocketStream]) -> None:
    """Send the alert OpenSSL queued when it failed the handshake, then linger.

    Trio drops that alert, but it is what tells the client why it was refused ("certificate
    required", "unknown CA") instead of a bare closed connection. With TLS 1.3 the client may
    already have sent its request, so its input is drained before closing, or the kernel would
    reset the connection and the client might never read the alert.
    """
    outgoing = getattr(stream, "_outgoing", None)  # trio's memory BIO; absent in other versions
    if not isinstance(outgoing, ssl.MemoryBIO) or not outgoing.pending:
        return
    try:
        with trio.move_on_after(LINGER_SECONDS):
            await stream.transport_stream.send_all(outgoing.read())
        await drain_and_close(stream.transport_stream)
    except (trio.BrokenResourceError, trio.ClosedResourceError):
        pass


def _log_handshake_failure(conn_id: int, peer: str, exc: BaseException) -> None:
    cause = exc.__cause__
    if not isinstance(cause, ssl.SSLError):
        # A port scan or a health check that just opens and closes the port.
        log.info(
            "event=api_tls_handshake_failed conn=%d peer=%s reason=%r",
            conn_id,
            peer,
            str(cause or exc),
        )
        return
    reason = cause.reason or type(cause).__name__
    detail = getattr(cause, "verify_message", None) or cause.strerror or str(cause)
    hint = _HANDSHAKE_HINTS.get(reason, "the client's TLS setup does not match this service's")
    log.warning(
        "event=api_tls_handshake_failed conn=%d peer=%s reason=%s detail=%r hint=%r",
        conn_id,
        peer,
        reason,
        detail,
        hint,
    )


def _certificate_caller(
    der: bytes | None, identify_certificate: IdentifyCertificate, peer: str, conn_id: int
) -> tuple[Caller, str]:
    """The caller behind a verified client certificate, and how log events name it."""
    unknown = Caller(None, None, frozenset(), description=f"TLS client at {peer}")
    if not der:  # cannot happen with CERT_REQUIRED; refuse rather than trust
        return unknown, f"peer={peer} subject=none"
    try:
        cert = x509.load_der_x509_certificate(der)
        subject = printable(cert.subject.rfc4514_string())
    except ValueError as exc:
        log.warning(
            "event=api_tls_bad_certificate conn=%d peer=%s reason=%r", conn_id, peer, str(exc)
        )
        return unknown, f"peer={peer} subject=unreadable"
    who = f"peer={peer} subject={subject!r}"
    try:
        sae_ids = frozenset(identify_certificate(cert))
    except Exception:
        log.exception(
            "event=api_identify_failed conn=%d %s; treating the caller as unknown", conn_id, who
        )
        sae_ids = frozenset()
    common_names, dns_names = certificate_names(cert)
    names = [printable(name) for name in common_names + dns_names]
    caller = Caller(
        None,
        None,
        sae_ids,
        description=f"client certificate with subject {subject!r}",
        mapping_hint=(
            f"map one of its names ({', '.join(names) or 'it has none'}) to an SAE ID "
            "in [api.tls.clients] of the daemon's configuration"
        ),
    )
    if sae_ids:
        log.debug(
            "event=api_tls_open conn=%d %s sae_ids=%s", conn_id, who, ",".join(sorted(sae_ids))
        )
    else:
        log.warning(
            "event=api_tls_unmapped conn=%d %s names=%s hint=%r",
            conn_id,
            who,
            ",".join(names) or "none",
            "map one of these names to an SAE ID in the "
            "API's TLS client mapping, or every request is answered 401",
        )
    return caller, who


def _address(sockaddr: object) -> str:
    if isinstance(sockaddr, tuple) and len(sockaddr) >= 2:
        host, port = sockaddr[0], sockaddr[1]
        return f"[{host}]:{port}" if ":" in str(host) else f"{host}:{port}"
    return str(sockaddr)
