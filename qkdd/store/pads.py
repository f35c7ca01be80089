"""One-time pads in the key store (``pad_keys``): raw QKD material for one-time-pad
messages, one sender -> recipient pair each, a row per pad. They follow the batch life
cycle of application keys (pending, then ready once the batch commits; erased with an
aborted batch), are never handed to an application as keys, and each byte is used once
(``take_pads``).

``KeyStore`` inherits these methods; they share its database and transactions.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Final

from qkdd.sealing import pad_row_aad as _pad_aad
from qkdd.store.database import Database
from qkdd.store.records import HybridKey, NewHybridKey

PADS_SCHEMA: Final = """
CREATE TABLE IF NOT EXISTS pad_keys (
    key_id        TEXT PRIMARY KEY,
    peer_site     TEXT NOT NULL,
    batch_id      INTEGER NOT NULL,
    sender_sae    TEXT NOT NULL,
    recipient_sae TEXT NOT NULL,
    size_bits     INTEGER NOT NULL,
    material      BLOB NOT NULL,
    state         TEXT NOT NULL CHECK (state IN ('pending', 'ready')),
    created_at    REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS pads_by_pair ON pad_keys (sender_sae, recipient_sae, state, created_at);
CREATE INDEX IF NOT EXISTS pads_by_batch ON pad_keys (peer_site, batch_id);
"""


class OneTimePads(Database):
    """One-time pads; mixed into ``KeyStore``."""

    if TYPE_CHECKING:
        on_keys_taken: Callable[[], None] | None

    def _insert_pads(
        self,
        db: sqlite3.Connection,
        peer_site: str,
        batch_id: int,
        pads: Sequence[NewHybridKey],
        now: float,
    ) -> None:
        """Inside a transaction: a batch's pads, pending."""
        db.executemany(
            "INSERT INTO pad_keys VALUES (?, ?, ?, ?, ?, ?, ?, 'pending', ?)",
            [
                (
                    k.key_id,
                    peer_site,
                    batch_id,
                    k.master_sae_id,
                    k.slave_sae_id,
                    k.size_bits,
                    self._sealer.seal(
                        _pad_aad(k.key_id, k.master_sae_id, k.slave_sae_id, k.size_bits),
                        k.material,
                    ),
                    now,
                )
                for k in pads
            ],
        )

    def pad_ready_bytes(self, sender_sae: str, recipient_sae: str) -> int:
        row = self._db.execute(
            "SELECT coalesce(sum(size_bits), 0) FROM pad_keys WHERE sender_sae=?"
            " AND recipient_sae=? AND state='ready'",
            (sender_sae, recipient_sae),
        ).fetchone()
        return int(row[0]) // 8

    def pad_ready_count(self, sender_sae: str, recipient_sae: str) -> int:
        row = self._db.execute(
            "SELECT count(*) FROM pad_keys WHERE sender_sae=? AND recipient_sae=?"
            " AND state='ready'",
            (sender_sae, recipient_sae),
        ).fetchone()
        return int(row[0])

    def take_pads(self, sender_sae: str, recipient_sae: str, nbytes: int) -> list[HybridKey]:
        """The oldest ready pads of the pair, enough to cover ``nbytes``, erased (all or
        none: an empty list if the stock is short). What a message leaves of the last pad
        is never used again."""
        with self.transaction() as db:
            taken: list[HybridKey] = []
            have = 0
            rows = db.execute(
                "SELECT key_id, size_bits, material FROM pad_keys WHERE sender_sae=?"
                " AND recipient_sae=? AND state='ready' ORDER BY created_at, rowid",
                (sender_sae, recipient_sae),
            )
            for key_id, size_bits, sealed in rows:
                if have >= nbytes:
                    break
                # A pad that does not open is quarantined and the next one used instead.
                material = self._open_pad(key_id, sender_sae, recipient_sae, size_bits, sealed)
                if material is not None:
                    taken.append(HybridKey(key_id, material))
                    have += len(material)
            if have < nbytes:
                return []
            db.executemany("DELETE FROM pad_keys WHERE key_id=?", [(k.key_id,) for k in taken])
        if self.on_keys_taken is not None:
            self.on_keys_taken()  # the link may make more pads
        return taken

    def take_pads_in(
        self, db: sqlite3.Connection, key_ids: Sequence[str], sender_sae: str, recipient_sae: str
    ) -> list[HybridKey] | None:
        """Inside ``transaction()``: these pads of the pair (ready or pending), erased if
        the caller's transaction commits; None if any is not held."""
        found = []
        for key_id in key_ids:
            row = db.execute(
                "SELECT size_bits, material FROM pad_keys"
                " WHERE key_id=? AND sender_sae=? AND recipient_sae=?",
                (key_id, sender_sae, recipient_sae),
            ).fetchone()
            if row is None:
                return None
            material = self._open_pad(key_id, sender_sae, recipient_sae, row[0], row[1])
            if material is None:
                return None
            found.append(HybridKey(key_id, material))
            db.execute("DELETE FROM pad_keys WHERE key_id=?", (key_id,))
        return found

    def _open_pad(
        self, key_id: str, sender_sae: str, recipient_sae: str, size_bits: int, sealed: bytes
    ) -> bytes | None:
        return self._open_row(
            "pad_keys", (key_id,), _pad_aad(key_id, sender_sae, recipient_sae, size_bits), sealed
        )
