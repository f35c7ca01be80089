"""The ETSI GS QKD 014 v1.1.1 key-delivery API for local applications (SAEs).

`pool` defines what the API needs from the key store, `handler` answers requests without I/O,
`server` serves them over HTTP/1.1 on a Unix socket and `tls` over HTTPS; `limits` and
`accept` keep their connections below the file-descriptor limit. The servers are not
imported here so that clients importing this package do not pay for Trio.
"""

from qkdd.etsi014.handler import ApiRequest, ApiResponse, Caller, RequestHandler
from qkdd.etsi014.pool import (
    DeliveredKey,
    KeyPool,
    KeyServiceError,
    KeysUnavailable,
    MemoryKeyPool,
    PoolStatus,
    UnknownKeys,
)

__all__ = [
    "ApiRequest",
    "ApiResponse",
    "Caller",
    "DeliveredKey",
    "KeyPool",
    "KeyServiceError",
    "KeysUnavailable",
    "MemoryKeyPool",
    "PoolStatus",
    "RequestHandler",
    "UnknownKeys",
]
