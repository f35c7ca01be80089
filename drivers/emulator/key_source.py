"""Where the emulator's key material comes from.

A ``KeySource`` yields blocks of keys that both ends of an emulated QKD link receive
identically: the same 16-byte IDs with the same material, in the same order. Today's
``RandomKeySource`` simply draws random keys; a source that simulates BB84 (sifting, error
estimation, error correction, privacy amplification) can replace it without touching the
emulator, reporting its QBER through ``qber``. ``next_block`` is async so that such a source
can run its computation in a worker thread (``trio.to_thread.run_sync``).
"""

from __future__ import annotations

import secrets
import uuid
from typing import Protocol

from ..serial.serial_constants import MAX_KEY_MATERIAL_SIZE

__all__ = ["KeySource", "RandomKeySource"]


class KeySource(Protocol):
    #: Latest quantum bit error rate estimate (0..1), None if the source has none.
    qber: float | None

    async def next_block(self, max_keys: int) -> list[tuple[bytes, bytes]]:
        """Between 1 and ``max_keys`` keys as (16-byte UUID, material), shared by both ends."""
        ...


class RandomKeySource:
    """Uniformly random keys with random (version 4) UUIDs; no physics, no QBER."""

    qber: float | None = None

    def __init__(self, key_bits: int = 256) -> None:
        if key_bits % 8 or not 8 <= key_bits <= MAX_KEY_MATERIAL_SIZE * 8:
            raise ValueError("key size must be a multiple of 8 bits between 8 and 8192")
        self.key_bytes = key_bits // 8

    async def next_block(self, max_keys: int) -> list[tuple[bytes, bytes]]:
        n = self.key_bytes
        return [(uuid.uuid4().bytes, secrets.token_bytes(n)) for _ in range(max(1, max_keys))]
