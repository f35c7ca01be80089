"""The key pool as the ETSI GS QKD 014 layer sees it: the `KeyPool` protocol, its value types
(`PoolKey`, `PoolStatus`, `KeyLimits`) and errors, and the `HandOuts` a handler may take keys
through.

Two pools implement the protocol: the daemon's store-backed one (`qkdd.store_pool`) and an
in-memory one for tests, benchmarks and the demo (`qkdd.etsi014.memory_pool`). The request
handler only ever talks to a `KeyPool`, so both behave identically on the wire.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol, cast

from qkdd.errors import KeyServiceError as KeyServiceError


@dataclass(frozen=True, slots=True)
class PoolKey:
    """One key handed to an SAE: its ID (a UUID string) and its material."""

    key_id: str
    material: bytes = field(repr=False)


_new_key = object.__new__
_set_key_id = cast(Any, PoolKey.__dict__["key_id"]).__set__
_set_material = cast(Any, PoolKey.__dict__["material"]).__set__


def _pool_key(key_id: str, material: bytes) -> PoolKey:
    key = _new_key(PoolKey)
    _set_key_id(key, key_id)
    _set_material(key, material)
    return key


def pool_keys(key_ids: Iterable[str], materials: Iterable[bytes]) -> list[PoolKey]:
    """``PoolKey(key_id, material)`` of each pair, made by setting the two slots
    directly: a frozen dataclass's ``__init__`` costs as much again, per key of a batch."""
    return list(map(_pool_key, key_ids, materials))


@dataclass(frozen=True)
class PoolStatus:
    """What the ETSI Status object reports about one master/slave pair."""

    source_kme_id: str
    target_kme_id: str
    key_size: int
    stored_key_count: int
    max_key_count: int
    max_key_per_request: int
    max_key_size: int
    min_key_size: int
    # Sent as the Status object's status_extension (the master SAE's quota), when set.
    extension: dict[str, object] | None = None


@dataclass(frozen=True)
class KeyLimits:
    """What a key request may ask for (the request-checking part of the Status object,
    without the stored key count, which costs a count of the pool)."""

    key_size: int
    max_key_per_request: int
    min_key_size: int
    max_key_size: int
    # Why max_key_per_request is below the configured cap (e.g. the pool never holds more),
    # told to a caller who asks for more; "" when it is the cap itself.
    max_key_per_request_reason: str = ""


class KeysUnavailable(KeyServiceError):
    """No keys can be delivered now (QKD link down, peer down, pool empty); HTTP 503."""


class InvalidKeyRequest(KeyServiceError):
    """The request cannot be met as asked (e.g. slave SAEs at different sites); HTTP 400."""


class UnknownKeys(KeyServiceError):
    """Requested key IDs are not held for this master/slave pair; HTTP 400."""


class HandOuts(Protocol):
    """Runs a hand-out (a call of a pool's ``take_for_master``) together with the others
    ready at the same moment, in one store transaction (``qkdd.etsi014.hand_outs``)."""

    def __call__(self, take: Callable[[], list[PoolKey]]) -> Awaitable[list[PoolKey]]: ...


class KeyPool(Protocol):
    def status(self, master_sae_id: str, slave_sae_id: str) -> PoolStatus: ...

    def limits(self, master_sae_id: str, slave_sae_id: str) -> KeyLimits: ...

    def take_for_master(
        self, master_sae_id: str, slave_sae_id: str, number: int, size_bits: int
    ) -> list[PoolKey]: ...

    def take_for_slave(
        self, master_sae_id: str, slave_sae_id: str, key_ids: Sequence[str]
    ) -> list[PoolKey]: ...

    async def take_assigned(
        self,
        master_sae_id: str,
        slave_sae_id: str,
        number: int,
        size_bits: int,
        additional_slave_sae_ids: Sequence[str],
    ) -> list[PoolKey]:
        """Keys of a size other than ``status().key_size``, or for more slave SAEs than one;
        each slave collects each key once. May need the peer site's confirmation."""
        ...

    def knows_sae(self, sae_id: str) -> bool: ...
