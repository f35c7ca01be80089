"""A real ETSI GS QKD 014 KME for tests of the KME driver: qkdd's own ETSI GS QKD 014 server
over mutual TLS on 127.0.0.1, with a MemoryKeyPool as the two sites' KMEs (one pool serves
both SAEs, which is what a pair of KMEs sharing keys looks like from outside)."""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial

import trio
from cryptography import x509
from pki import Pki

from qkdd.etsi014.handler import RequestHandler
from qkdd.etsi014.memory_pool import MemoryKeyPool
from qkdd.http_server.tls import sae_ids_from_certificate, serve_tls

__all__ = ["A", "B", "CLIENT_NAMES", "Kme", "start_kme"]

# SAE A is the link master site's qkdd, SAE B the slave's. The KME knows A by the DNS name in
# client-a's certificate and B by client-b's Common Name.
A, B = "SAE-A", "SAE-B"
CLIENT_NAMES = {"app-a.example": A, "app-b": B}


@dataclass
class Kme:
    pool: MemoryKeyPool
    port: int
    scope: trio.CancelScope

    @property
    def url(self) -> str:
        return f"https://127.0.0.1:{self.port}"


async def _run_kme(
    pki: Pki,
    pool: MemoryKeyPool,
    port: int,
    *,
    task_status: trio.TaskStatus[tuple[trio.CancelScope, int]] = trio.TASK_STATUS_IGNORED,
) -> None:
    def identify(cert: x509.Certificate) -> frozenset[str]:
        return sae_ids_from_certificate(cert, CLIENT_NAMES)

    with trio.CancelScope() as scope:
        async with trio.open_nursery() as nursery:
            listeners = await nursery.start(
                partial(
                    serve_tls,
                    "127.0.0.1",
                    port,
                    RequestHandler(pool),
                    identify,
                    cert_file=pki.server.cert,
                    key_file=pki.server.key,
                    client_ca_file=pki.ca,
                )
            )
            task_status.started((scope, listeners[0].socket.getsockname()[1]))


async def start_kme(
    nursery: trio.Nursery, pki: Pki, pool: MemoryKeyPool | None = None, port: int = 0
) -> Kme:
    pool = pool or MemoryKeyPool([A, B], max_key_per_request=16)
    scope, bound = await nursery.start(_run_kme, pki, pool, port)
    return Kme(pool, bound, scope)
