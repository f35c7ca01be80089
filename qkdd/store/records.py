"""Records the key store hands to its callers and shares between its parts: a key handed
out, a key erased before anyone collected it, a sealed row set aside because it does not
open, and a new one-time pad."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class HybridKey:
    key_id: str
    material: bytes = field(repr=False)


@dataclass(frozen=True)
class ErasedKey:
    """A key erased before any application collected it (no material: only its identity)."""

    key_id: str
    master_sae: str
    slave_sae: str


@dataclass(frozen=True)
class Unopened:
    """A sealed row that did not open: its table, the values of the table's key columns,
    how the quarantine and the log name it, and the application keys it withdraws."""

    table: str
    key: tuple[object, ...]
    name: str
    withdrawn: tuple[ErasedKey, ...] = ()


@dataclass(frozen=True)
class NewHybridKey:
    """A one-time pad of a new batch (one row each; application keys come in blocks)."""

    key_id: str
    master_sae_id: str
    slave_sae_id: str
    size_bits: int
    material: bytes = field(repr=False)
