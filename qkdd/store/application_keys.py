"""Application keys wherever the key store holds them: agreed, in the chunks of a batch's
blocks (``qkdd.store.key_blocks``), or assigned (``qkdd.store.assigned_keys``).

A key asked for by ID is looked for among the agreed keys of the pair, then among the
assigned ones; it may still be pending (``take_by_ids`` says why that is safe). Several
keys are handed out all or nothing: one that is missing rolls back the taking of the
others. Keys nobody collected in time are erased from both tables at once and reported
(``erase_expired``, ``on_erased``). The pool's hand-outs of the oldest ready keys are
``key_blocks``.

``KeyStore`` inherits these methods; they share its database and transactions.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Sequence
from typing import TYPE_CHECKING

from qkdd.store.database import Database
from qkdd.store.records import ErasedKey, HybridKey


class _KeyMissing(Exception):
    """Internal: abort a hand-out transaction because a requested key is not held."""


class ApplicationKeys(Database):
    """Application keys by ID, agreed or assigned, and their expiry; mixed into
    ``KeyStore``."""

    if TYPE_CHECKING:
        # ``qkdd.store.key_blocks`` and ``qkdd.store.assigned_keys``.
        def _take_agreed_in(
            self, db: sqlite3.Connection, wanted: Sequence[str], master: str, slave: str
        ) -> list[HybridKey | None]: ...

        def _take_assigned_in(
            self, db: sqlite3.Connection, key_id: str, master: str, slave: str
        ) -> HybridKey | None: ...

        def _expire_chunks(
            self, db: sqlite3.Connection, created_before: float
        ) -> list[ErasedKey]: ...

    def take_by_ids(
        self, master_sae_id: str, slave_sae_id: str, key_ids: Sequence[str]
    ) -> list[HybridKey] | None:
        """Hand out exactly these keys of the pair and erase them; None if any is missing.

        A key asked for by ID may still be pending here: its ID reaches an application
        only through the other site, which hands a key out only once it has committed the
        batch, so the decision on its way here can only be "commit". Serving it now means
        a lost or late BATCH_DECISION never makes an application wait."""
        if len(set(key_ids)) != len(key_ids):
            return None
        try:
            with self.transaction() as db:
                found = self._take_keys_in(db, key_ids, master_sae_id, slave_sae_id)
                keys = [key for key in found if key is not None]
                if len(keys) < len(key_ids):
                    raise _KeyMissing  # rolls back what was taken
        except _KeyMissing:
            return None
        return keys

    def take_one_in(
        self, db: sqlite3.Connection, key_id: str, master: str, slave: str
    ) -> HybridKey | None:
        """Inside ``transaction()``: open and erase one key of the pair by ID (agreed or
        assigned; ready or pending); None if it is not held. Erased only if the caller's
        transaction commits."""
        return self._take_keys_in(db, [key_id], master, slave)[0]

    def _take_keys_in(
        self, db: sqlite3.Connection, key_ids: Sequence[str], master: str, slave: str
    ) -> list[HybridKey | None]:
        """Inside a transaction: these keys of the pair, agreed or assigned, each erased if
        the transaction commits; None in the place of each one not held."""
        found = self._take_agreed_in(db, key_ids, master, slave)
        for place, key in enumerate(found):
            if key is None:
                found[place] = self._take_assigned_in(db, key_ids[place], master, slave)
        return found

    def erase_expired(self, created_before: float) -> int:
        """Erase keys nobody collected in time; returns how many."""
        # RETURNING (SQLite 3.35): one pass deletes and names what went, for key events.
        with self.transaction() as db:
            gone = self._expire_chunks(db, created_before)
            gone += [
                ErasedKey(*row)
                for row in db.execute(
                    "DELETE FROM assigned_keys WHERE created_at < ?"
                    " RETURNING key_id, master_sae, slave_sae",
                    (created_before,),
                ).fetchall()
            ]
        self._tell_erased("expired", gone)
        return len(gone)
