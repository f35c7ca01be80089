"""A bounded memory of key IDs the driver has already handed to the sink.

Devices resend every unacknowledged key after a reconnect or restart, so duplicates are
normal. The driver drops IDs it remembers here; IDs older than the memory reach the sink,
which must ignore keys it already holds (the daemon's key store does). Alongside each ID a
short digest of the material is kept, so a device that resends an ID with *different*
material is caught instead of silently trusted.
"""

from __future__ import annotations

import collections
from collections.abc import Callable, Iterable

__all__ = ["DEFAULT_RECENT_IDS", "RecentKeyIds", "material_digest"]

#: Key IDs a driver remembers to drop resent keys; ~1.3 MB at the default.
DEFAULT_RECENT_IDS = 16_384


# Python's own keyed hash of the bytes (SipHash, a random key per process): it only has
# to tell accidental differences apart and never leaves the process, and it costs a tenth
# of a cryptographic digest per key at device rates. The builtin itself, not a wrapper:
# no Python call per key.
material_digest: Callable[[bytes], int] = hash


class RecentKeyIds:
    """Least-recently-added set of key IDs with a fixed capacity."""

    def __init__(self, capacity: int = DEFAULT_RECENT_IDS) -> None:
        if capacity < 1:
            raise ValueError("capacity must be at least 1")
        self.capacity = capacity
        self._ids: collections.OrderedDict[str, int] = collections.OrderedDict()

    def __len__(self) -> int:
        return len(self._ids)

    def __contains__(self, key_id: object) -> bool:
        return key_id in self._ids

    def holds_none_of(self, key_ids: Iterable[str]) -> bool:
        """Whether none of these IDs is remembered (the common case, checked at once)."""
        return self._ids.keys().isdisjoint(key_ids)

    def check(self, key_id: str, material: bytes) -> str:
        """Classify a received key: "new", "duplicate" (same ID, same material) or
        "conflict" (same ID, different material)."""
        digest = self._ids.get(key_id)
        if digest is None:
            return "new"
        if digest == material_digest(material):
            return "duplicate"
        return "conflict"

    def add(self, key_id: str, material: bytes) -> None:
        self.add_many([(key_id, material)])

    def add_many(self, keys: Iterable[tuple[str, bytes]]) -> None:
        """Remember many keys at once (one trim of the memory for all of them)."""
        ids = self._ids
        for key_id, material in keys:
            if key_id in ids:
                ids.move_to_end(key_id)
            ids[key_id] = material_digest(material)
        excess = len(ids) - self.capacity
        for _ in range(max(0, excess)):
            ids.popitem(last=False)
