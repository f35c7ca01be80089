"""The ETSI GS QKD 014 v1.1.1 key-delivery API for local applications (SAEs), the standard
alone: `key_pool` defines what the API needs from the key store, `memory_pool` is a pool held
in memory, `handler` answers requests without I/O, and `hand_outs` gathers the hand-outs of
requests ready at the same moment into one store transaction (with Trio). HTTP (the servers,
TLS, connection caps) belongs to `qkdd.http_server`. Importing this package loads no Trio.
"""

from qkdd.etsi014.handler import RequestHandler
from qkdd.etsi014.key_pool import (
    KeyPool,
    KeyServiceError,
    KeysUnavailable,
    PoolKey,
    PoolStatus,
    UnknownKeys,
)
from qkdd.etsi014.memory_pool import MemoryKeyPool

__all__ = [
    "KeyPool",
    "KeyServiceError",
    "KeysUnavailable",
    "MemoryKeyPool",
    "PoolKey",
    "PoolStatus",
    "RequestHandler",
    "UnknownKeys",
]
