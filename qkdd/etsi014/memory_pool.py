"""`MemoryKeyPool`: a `KeyPool` (`qkdd.etsi014.key_pool`) held in memory, for tests,
benchmarks and the demo."""

from __future__ import annotations

import os
import uuid
from collections.abc import Callable, Iterable, Sequence

from qkdd.etsi014.key_pool import KeyLimits, KeysUnavailable, PoolKey, PoolStatus, UnknownKeys

Pair = tuple[str, str]


class MemoryKeyPool:
    """A `KeyPool` held in memory; both SAEs of a pair are served by this one KME.

    Ready material is a byte reservoir per ordered (master, slave) pair, so keys of any allowed
    size can be cut from it. Keys handed to a master wait, by ID, until its slave collects
    them; collecting erases them. Set `unavailable` to a reason to make every take fail with
    `KeysUnavailable`, as when the QKD link or the peer site is down.
    """

    def __init__(
        self,
        sae_ids: Iterable[str],
        *,
        source_kme_id: str = "KME-local",
        target_kme_id: str = "KME-peer",
        key_size: int = 256,
        min_key_size: int = 64,
        max_key_size: int = 8192,
        max_key_per_request: int = 128,
        max_key_count: int = 100_000,
        new_key_id: Callable[[], str] = lambda: str(uuid.uuid4()),
    ) -> None:
        if key_size % 8 or not min_key_size <= key_size <= max_key_size:
            raise ValueError("key_size must be a multiple of 8 within [min_key_size, max_key_size]")
        self._sae_ids = frozenset(sae_ids)
        self._source_kme_id = source_kme_id
        self._target_kme_id = target_kme_id
        self._key_size = key_size
        self._min_key_size = min_key_size
        self._max_key_size = max_key_size
        self._max_key_per_request = max_key_per_request
        self._max_key_count = max_key_count
        self._new_key_id = new_key_id
        self._ready: dict[Pair, bytearray] = {}
        self._delivered: dict[Pair, dict[str, bytes]] = {}
        self.unavailable: str | None = None

    # -- filling (what the QKD side would do) --

    def add_material(self, master_sae_id: str, slave_sae_id: str, material: bytes) -> int:
        """Append ready material for the pair; returns the bytes accepted (the rest is dropped,
        as a full pool drops new QKD output)."""
        ready = self._ready.setdefault((master_sae_id, slave_sae_id), bytearray())
        room = max(0, self._max_key_count * (self._key_size // 8) - len(ready))
        accepted = material[:room]
        ready += accepted
        return len(accepted)

    def fill(self, master_sae_id: str, slave_sae_id: str, count: int) -> int:
        """Add `count` random keys of the default size for the pair."""
        return self.add_material(
            master_sae_id, slave_sae_id, os.urandom(count * (self._key_size // 8))
        )

    def pending_key_ids(self, master_sae_id: str, slave_sae_id: str) -> list[str]:
        """IDs handed to the master and not yet collected by the slave."""
        return list(self._delivered.get((master_sae_id, slave_sae_id), {}))

    # -- KeyPool --

    def knows_sae(self, sae_id: str) -> bool:
        return sae_id in self._sae_ids

    def status(self, master_sae_id: str, slave_sae_id: str) -> PoolStatus:
        ready = self._ready.get((master_sae_id, slave_sae_id), b"")
        return PoolStatus(
            source_kme_id=self._source_kme_id,
            target_kme_id=self._target_kme_id,
            key_size=self._key_size,
            stored_key_count=len(ready) // (self._key_size // 8),
            max_key_count=self._max_key_count,
            max_key_per_request=self._per_request(),
            max_key_size=self._max_key_size,
            min_key_size=self._min_key_size,
        )

    def limits(self, master_sae_id: str, slave_sae_id: str) -> KeyLimits:
        reason = (
            f"the pool holds at most {self._max_key_count} keys"
            if self._per_request() < self._max_key_per_request
            else ""
        )
        return KeyLimits(
            self._key_size, self._per_request(), self._min_key_size, self._max_key_size, reason
        )

    def _per_request(self) -> int:
        # A request for more keys than the pool can ever hold could never be met.
        return min(self._max_key_per_request, self._max_key_count)

    def take_for_master(
        self, master_sae_id: str, slave_sae_id: str, number: int, size_bits: int
    ) -> list[PoolKey]:
        self._check_available()
        pair = (master_sae_id, slave_sae_id)
        ready = self._ready.get(pair, bytearray())
        size_bytes = size_bits // 8
        if number * size_bytes > len(ready):
            raise KeysUnavailable(
                f"only {len(ready) // size_bytes} keys of {size_bits} bits are ready for "
                f"{master_sae_id} -> {slave_sae_id}; retry once the QKD link has delivered more"
            )
        keys = []
        delivered = self._delivered.setdefault(pair, {})
        for i in range(number):
            material = bytes(ready[i * size_bytes : (i + 1) * size_bytes])
            key = PoolKey(self._new_key_id(), material)
            delivered[key.key_id] = key.material
            keys.append(key)
        del ready[: number * size_bytes]
        return keys

    def take_for_slave(
        self, master_sae_id: str, slave_sae_id: str, key_ids: Sequence[str]
    ) -> list[PoolKey]:
        self._check_available()
        delivered = self._delivered.get((master_sae_id, slave_sae_id), {})
        missing = [key_id for key_id in key_ids if key_id not in delivered]
        if missing or len(set(key_ids)) != len(key_ids):
            raise UnknownKeys(
                f"no keys with IDs {', '.join(missing) or '(duplicated IDs)'} are held for "
                f"{master_sae_id} -> {slave_sae_id}"
            )
        return [PoolKey(key_id, delivered.pop(key_id)) for key_id in key_ids]

    async def take_assigned(
        self,
        master_sae_id: str,
        slave_sae_id: str,
        number: int,
        size_bits: int,
        additional_slave_sae_ids: Sequence[str],
    ) -> list[PoolKey]:
        keys = self.take_for_master(master_sae_id, slave_sae_id, number, size_bits)
        for extra in additional_slave_sae_ids:
            delivered = self._delivered.setdefault((master_sae_id, extra), {})
            for key in keys:
                delivered[key.key_id] = key.material
        return keys

    def _check_available(self) -> None:
        if self.unavailable is not None:
            raise KeysUnavailable(self.unavailable)
