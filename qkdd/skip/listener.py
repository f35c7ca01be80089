"""The SKIP key provider's listener, with Trio: SKIP over HTTPS with TLS 1.3 and required
client certificates, served by the ETSI TLS listener's code (`qkdd.http_server.tls.serve_tls`:
the TLS policy, handshake deadlines, connection caps, h11 framing) with the SKIP provider
(`qkdd.skip.provider`) as its handler.

Which certificate is which local system (`local_systems_from_certificate`): a certificate
matches a ``[skip.clients]`` entry by one of its names (subject Common Names, DNS
subjectAltNames; the rule of `qkdd.http_server.tls.sae_ids_from_certificate`) or by its SHA-256
fingerprint. A certificate from a CA other than ``client_ca`` never completes the handshake;
one from that CA that matches no entry is answered 401 on every request, as on the ETSI listener.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Mapping

import trio
from cryptography import x509
from cryptography.hazmat.primitives import hashes

from qkdd.http_server.limits import ConnectionTable
from qkdd.http_server.serving import BeforeSend
from qkdd.http_server.tls import TlsConfigError, sae_ids_from_certificate, serve_tls
from qkdd.skip.provider import SkipProvider
from qkdd.skip.skip_config import SkipConfig

__all__ = ["SkipListenerError", "local_systems_from_certificate", "serve_skip"]

log = logging.getLogger("qkdd.skip")


class SkipListenerError(TlsConfigError):
    """The SKIP listener cannot be set up from the ``[skip]`` section."""


def local_systems_from_certificate(
    cert: x509.Certificate, by_name: Mapping[str, str], by_fingerprint: Mapping[str, str]
) -> frozenset[str]:
    """The local system IDs ``cert`` is granted: by name ({certificate name: system ID}) and
    by fingerprint ({SHA-256 fingerprint in lower-case hexadecimal: system ID})."""
    granted = set(sae_ids_from_certificate(cert, by_name))
    system = by_fingerprint.get(cert.fingerprint(hashes.SHA256()).hex())
    if system is not None:
        granted.add(system)
    return frozenset(granted)


async def serve_skip(
    skip: SkipConfig,
    provider: SkipProvider,
    *,
    connections: ConnectionTable | None = None,
    before_send: BeforeSend | None = None,
    task_status: trio.TaskStatus[list[trio.SocketListener]] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve SKIP on ``skip.listen`` until cancelled; ``task_status.started(listeners)``
    once connections are accepted. ``connections`` and ``before_send`` are as for
    `serve_tls` (the daemon passes the API's connection budget and its durability barrier).
    Raises `SkipListenerError` when the TLS files cannot be loaded or the address bound."""
    host, port = skip.listen
    identify = functools.partial(
        local_systems_from_certificate,
        by_name=skip.systems_by_name,
        by_fingerprint=skip.systems_by_fingerprint,
    )
    try:
        await serve_tls(
            host,
            port,
            provider,
            identify,
            cert_file=str(skip.certificate),
            key_file=str(skip.private_key),
            client_ca_file=str(skip.client_ca),
            connections=connections,
            before_send=before_send,
            task_status=_Announce(task_status, skip),
        )
    except TlsConfigError as exc:
        if isinstance(exc, SkipListenerError):
            raise
        raise SkipListenerError(f"SKIP listener: {_reworded(str(exc))}") from exc


# serve_tls's messages name the ETSI API's settings; their twins here are in [skip].
_REWORDING = (
    ("[api.tls]", "[skip]"),
    ("API TLS certificate", "TLS certificate"),
    ("API client CA", "client CA"),
    ("for the API", "for SKIP"),
)


def _reworded(message: str) -> str:
    for old, new in _REWORDING:
        message = message.replace(old, new)
    return message


class _Announce:
    """Passes the listeners on to the starter once SKIP is served, saying so in the log."""

    def __init__(self, outer: trio.TaskStatus[list[trio.SocketListener]], skip: SkipConfig) -> None:
        self._outer = outer
        self._skip = skip

    def started(self, value: list[trio.SocketListener] | None = None) -> None:
        listeners = value or []
        log.info(
            "event=skip_listening address=%s clients=%d remote_systems=%s entropy=%s",
            ",".join(_address(listener.socket.getsockname()) for listener in listeners),
            len(self._skip.clients),
            ",".join(name for name, _sae in self._skip.remote_systems),
            "on" if self._skip.entropy else "off",
        )
        self._outer.started(listeners)


def _address(sockaddr: object) -> str:
    if isinstance(sockaddr, tuple) and len(sockaddr) >= 2:
        host, port = sockaddr[0], sockaddr[1]
        return f"[{host}]:{port}" if ":" in str(host) else f"{host}:{port}"
    return str(sockaddr)
