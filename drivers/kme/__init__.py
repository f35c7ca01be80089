"""QKD keys from a key management entity (KME) serving ETSI GS QKD 014: ``Etsi014Device``.

By job: ``kme_errors`` (what goes wrong, for operators), ``objects`` (the KME's URL and the
standard's JSON objects, without I/O), ``https`` (TLS and one kept-alive connection, on the
HTTP client core shared with qkdd's own client, ``qkdd.client.roundtrip``), ``device``
(the master's and the slave's loops, backoff and status).
"""

from .device import Etsi014Device, KmeRole
from .https import kme_ssl_context
from .kme_errors import (
    KmeConfigError,
    KmeError,
    KmeRefusedError,
    KmeResponseError,
    KmeStoreError,
    KmeTlsError,
    KmeUnauthorizedError,
    KmeUnavailableError,
    KmeUnreachableError,
    UnknownKeyIdsError,
)
from .objects import (
    KmeEndpoint,
    KmeStatus,
    canonical_key_id,
    parse_key_container,
    parse_kme_url,
    parse_status,
)

__all__ = [
    "Etsi014Device",
    "KmeConfigError",
    "KmeEndpoint",
    "KmeError",
    "KmeRefusedError",
    "KmeResponseError",
    "KmeRole",
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
]
