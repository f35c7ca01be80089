"""Assigned keys in the key store (``assigned_keys``): a key of another size than the
site's, or for several slave SAEs, made by the master's site from whole ready keys of the
pair and confirmed to the slave's site (``assign_keys`` there). The slave's site erases
the constituent keys and holds the assigned key once per slave SAE, sealed, until each
collects it by ID.

``KeyStore`` inherits these methods; they share its database and transactions.
"""

from __future__ import annotations

import sqlite3
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Final

from qkdd.sealing import StoreError
from qkdd.sealing import assigned_row_aad as _assigned_aad
from qkdd.store.database import Database
from qkdd.store.records import ErasedKey, HybridKey

ASSIGNED_KEYS_SCHEMA: Final = """
CREATE TABLE IF NOT EXISTS assigned_keys (
    key_id     TEXT NOT NULL,
    slave_sae  TEXT NOT NULL,
    master_sae TEXT NOT NULL,
    size_bits  INTEGER NOT NULL,
    material   BLOB NOT NULL,
    created_at REAL NOT NULL,
    PRIMARY KEY (key_id, slave_sae)
) WITHOUT ROWID;
"""


def compose_key(materials: Sequence[bytes], size_bits: int) -> bytes:
    """An assigned key: the first ``size_bits`` of its constituents' material, in order.
    Each constituent is a full hybrid key, so no QKD or ML-KEM input is stretched."""
    joined = b"".join(materials)
    if size_bits % 8 or size_bits // 8 > len(joined):
        raise ValueError(f"{len(materials)} keys cannot make a key of {size_bits} bits")
    return joined[: size_bits // 8]


@dataclass(frozen=True)
class Assignment:
    """How the master's site made one key (see ``KeyStore.assign_keys``)."""

    key_id: str
    size_bits: int
    master_sae: str
    slave_saes: tuple[str, ...]
    constituent_ids: tuple[str, ...]


class AssignedKeys(Database):
    """Assigned keys; mixed into ``KeyStore``."""

    if TYPE_CHECKING:

        def _take_keys_in(
            self, db: sqlite3.Connection, key_ids: Sequence[str], master: str, slave: str
        ) -> list[HybridKey | None]: ...

    def _take_assigned_in(
        self, db: sqlite3.Connection, key_id: str, master: str, slave: str
    ) -> HybridKey | None:
        row = db.execute(
            "SELECT material, size_bits FROM assigned_keys"
            " WHERE key_id=? AND master_sae=? AND slave_sae=?",
            (key_id, master, slave),
        ).fetchone()
        if row is None:
            return None
        material = self._open_row(
            "assigned_keys",
            (key_id, slave),
            _assigned_aad(key_id, master, slave, row[1]),
            row[0],
            ErasedKey(key_id, master, slave),
        )
        if material is None:
            return None
        db.execute("DELETE FROM assigned_keys WHERE key_id=? AND slave_sae=?", (key_id, slave))
        return HybridKey(key_id, material)

    def assign_keys(self, assignments: Sequence[Assignment]) -> None:
        """At the slave's site: make each assigned key from its constituents (ready or
        pending keys of the pair master -> first slave, erased here) and hold it for every
        slave SAE. All or nothing: StoreError names the first constituent that is missing."""
        now = time.time()
        with self.transaction() as db:
            # The constituents of all assignments of a pair in one go: each chunk is
            # opened and sealed again once (a constituent named twice is missing twice).
            wanted: dict[tuple[str, str], list[str]] = {}
            for a in assignments:
                wanted.setdefault((a.master_sae, a.slave_saes[0]), []).extend(a.constituent_ids)
            taken: dict[tuple[str, str], Iterator[HybridKey | None]] = {
                pair: iter(self._take_keys_in(db, ids, *pair)) for pair, ids in wanted.items()
            }
            for a in assignments:
                parts = taken[(a.master_sae, a.slave_saes[0])]
                materials = []
                for cid in a.constituent_ids:
                    key = next(parts)
                    if key is None:
                        raise StoreError(
                            f"key {cid} of {a.master_sae} -> {a.slave_saes[0]} is not held here"
                        )
                    materials.append(key.material)
                try:
                    material = compose_key(materials, a.size_bits)
                except ValueError as exc:
                    raise StoreError(f"key {a.key_id}: {exc}") from None
                for slave in a.slave_saes:
                    if db.execute(
                        "SELECT 1 FROM assigned_keys WHERE key_id=? AND slave_sae=?",
                        (a.key_id, slave),
                    ).fetchone():
                        raise StoreError(f"key {a.key_id} is already assigned")
                    db.execute(
                        "INSERT INTO assigned_keys VALUES (?, ?, ?, ?, ?, ?)",
                        (
                            a.key_id,
                            slave,
                            a.master_sae,
                            a.size_bits,
                            self._sealer.seal(
                                _assigned_aad(a.key_id, a.master_sae, slave, a.size_bits), material
                            ),
                            now,
                        ),
                    )
