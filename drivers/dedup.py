"""A bounded memory of key IDs the driver has already handed to the sink.

Devices resend every unacknowledged key after a reconnect or restart, so duplicates are
normal. The driver drops IDs it remembers here; IDs older than the memory reach the sink,
which must ignore keys it already holds (the daemon's key store does). Alongside each ID a
short digest of the material is kept, so a device that resends an ID with *different*
material is caught instead of silently trusted.
"""

from __future__ import annotations

import collections
import hashlib
import hmac

from .constants import DEFAULT_RECENT_IDS


def material_digest(material: bytes) -> bytes:
    # Keyed by nothing and truncated: it only has to tell accidental differences apart,
    # and it never leaves the process.
    return hashlib.blake2b(material, digest_size=16).digest()


class RecentKeyIds:
    """Least-recently-added set of key IDs with a fixed capacity."""

    def __init__(self, capacity: int = DEFAULT_RECENT_IDS) -> None:
        if capacity < 1:
            raise ValueError("capacity must be at least 1")
        self.capacity = capacity
        self._ids: collections.OrderedDict[str, bytes] = collections.OrderedDict()

    def __len__(self) -> int:
        return len(self._ids)

    def __contains__(self, key_id: object) -> bool:
        return key_id in self._ids

    def check(self, key_id: str, material: bytes) -> str:
        """Classify a received key: "new", "duplicate" (same ID, same material) or
        "conflict" (same ID, different material)."""
        digest = self._ids.get(key_id)
        if digest is None:
            return "new"
        if hmac.compare_digest(digest, material_digest(material)):
            return "duplicate"
        return "conflict"

    def add(self, key_id: str, material: bytes) -> None:
        self._ids[key_id] = material_digest(material)
        self._ids.move_to_end(key_id)
        while len(self._ids) > self.capacity:
            self._ids.popitem(last=False)
